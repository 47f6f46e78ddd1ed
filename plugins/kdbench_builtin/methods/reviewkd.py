"""reviewkd: Chen et al. 2021, "Distilling Knowledge via Knowledge Review".

Student stage outputs are fused deep → shallow by attention-based fusion (ABF): each stage is
reduced (1×1 conv + BN) to ``mid`` channels, fused with the (nearest-upsampled) fused map of the
next deeper stage by two sigmoid attention weights from a 1×1 conv over both, then mapped
(3×3 conv + BN) to the paired teacher stage's channels. Hierarchical context loss (HCL) per pair:
MSE at full size plus MSE of adaptive-average-pooled maps at levels 4, 2, 1 (levels not below the
map size are skipped) weighted 1/2, 1/4, …, normalised by the weight sum.
loss = CE + beta·min((epoch+1)/warmup, 1)·Σ HCL.
Simplifications: stage outputs only (the reference also reviews the pooled vector); one ``mid``
for all stages; where sizes differ, the larger map is pooled to the smaller.
"""
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.contracts import HParam, Method

from ._common_b import STAGE_TAPS, adaptive_pool, bn, conv, same_stage_count, stage_names
from .at import match_size


class ABF(nn.Module):
    def __init__(self, dims, c_in, mid, c_out, fuse):
        super().__init__()
        self.reduce = nn.Sequential(conv(dims, c_in, mid), bn(dims, mid))
        self.att = nn.Sequential(conv(dims, 2 * mid, 2, bias=True), nn.Sigmoid()) if fuse else None
        self.out = nn.Sequential(conv(dims, mid, c_out, 3, 1, 1), bn(dims, c_out))

    def forward(self, x, residual=None):
        x = self.reduce(x)
        if self.att is not None:
            residual = F.interpolate(residual, size=x.shape[2:], mode="nearest")
            a = self.att(torch.cat([x, residual], 1))
            x = x * a[:, :1] + residual * a[:, 1:]
        return self.out(x), x


def hcl(f_s, f_t, levels=(4, 2, 1)):
    f_s, f_t = match_size(f_s, f_t)
    total, weight, w = F.mse_loss(f_s, f_t), 1.0, 1.0
    for level in levels:
        if level >= min(f_s.shape[2:]):
            continue
        w /= 2
        size = (level,) * (f_s.dim() - 2)
        total = total + w * F.mse_loss(adaptive_pool(f_s, size), adaptive_pool(f_t, size))
        weight += w
    return total / weight


def build(probe):
    s, t = same_stage_count(probe, "reviewkd")
    mid = probe.hp.mid
    return nn.ModuleList(
        ABF(len(probe.student_shapes[a]) - 1, probe.student_shapes[a][0], mid, probe.teacher_shapes[b][0], i < len(s) - 1)
        for i, (a, b) in enumerate(zip(s, t))
    )


def review_term(step):
    s = [step.student.feats[n] for n in stage_names(step.student.feats)]
    t = [step.teacher.feats[n].detach().float() for n in stage_names(step.teacher.feats)]
    total, residual = 0, None
    for i in reversed(range(len(s))):
        out, residual = step.modules[i](s[i], residual)
        total = total + hcl(out, t[i])
    return total


def loss(step):
    hp = step.hp
    ramp = min((step.epoch + 1) / hp.warmup, 1.0) if hp.warmup > 0 else 1.0
    return {"ce": F.cross_entropy(step.student.logits, step.y), "review": hp.beta * ramp * review_term(step)}


METHODS = [
    Method(
        name="reviewkd",
        loss=loss,
        description="ReviewKD: fuse student stages deep to shallow (ABF), match teacher stages with a pyramid loss",
        citation="Chen et al., CVPR 2021",
        taps=STAGE_TAPS,
        check=lambda probe: same_stage_count(probe, "reviewkd"),
        build=build,
        hparams=(
            HParam("beta", 1.0, "weight of the review (HCL) term", low=0.0, space=(0.1, 10.0), log=True),
            HParam("warmup", 2, "epochs over which the review weight ramps up (reference 20 of 240)", low=0, high=1000, space=(0, 5)),
            HParam("mid", 64, "channels of the fused maps", low=1, high=4096, tune=False),
        ),
    )
]
