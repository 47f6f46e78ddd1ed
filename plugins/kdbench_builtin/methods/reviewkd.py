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
from kdbench.losses import (STAGE_TAPS, adaptive_pool, batch_norm, check_stages, conv, frozen, match_size,
                            stage_outputs)


class ABF(nn.Module):
    def __init__(self, dims, c_in, mid, c_out, fuse):
        super().__init__()
        self.reduce = nn.Sequential(conv(dims, c_in, mid), batch_norm(dims, mid))
        self.att = nn.Sequential(conv(dims, 2 * mid, 2, bias=True), nn.Sigmoid()) if fuse else None
        self.out = nn.Sequential(conv(dims, mid, c_out, 3, 1, 1), batch_norm(dims, c_out))

    def forward(self, x, residual=None):
        x = self.reduce(x)
        if self.att is not None:
            residual = F.interpolate(residual, size=x.shape[2:], mode="nearest")
            weights = self.att(torch.cat([x, residual], 1))
            x = x * weights[:, :1] + residual * weights[:, 1:]
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
    s_names, t_names = check_stages(probe, "reviewkd")
    mid = probe.hp.mid
    return nn.ModuleList(
        ABF(len(probe.student_shapes[s_name]) - 1, probe.student_shapes[s_name][0], mid,
            probe.teacher_shapes[t_name][0], i < len(s_names) - 1)
        for i, (s_name, t_name) in enumerate(zip(s_names, t_names))
    )


def review_term(step):
    f_s = stage_outputs(step.student.feats)
    f_t = [frozen(f) for f in stage_outputs(step.teacher.feats)]
    total, residual = 0, None
    for i in reversed(range(len(f_s))):
        out, residual = step.modules[i](f_s[i], residual)
        total = total + hcl(out, f_t[i])
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
        check=lambda probe: check_stages(probe, "reviewkd"),
        build=build,
        hparams=(
            HParam("beta", 1.0, "weight of the review (HCL) term", low=0.0, space=(0.1, 10.0), log=True),
            HParam("warmup", 2, "epochs over which the review weight ramps up (reference 20 of 240)", low=0, high=1000, space=(0, 5)),
            HParam("mid", 64, "channels of the fused maps", low=1, high=4096, tune=False),
        ),
    )
]
