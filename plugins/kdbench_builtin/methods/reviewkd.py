"""reviewkd: Chen et al. 2021, "Distilling Knowledge via Knowledge Review". Settings against the
reference code (mdistiller ``mdistiller/distillers/ReviewKD.py``, ``configs/cifar100/reviewkd.yaml``):
docs/FIDELITY.md.

The student's stage outputs and, with ``review_pool``, its pooled feature vector (as a 1×1 map) are
fused deep → shallow by attention-based fusion (ABF): each is reduced (1×1 conv + BN, no bias) to
``mid`` channels (0: min(512, channels of the deepest input), as mdistiller), fused with the
(nearest-upsampled) fused map of the next deeper input by two sigmoid attention weights from a
1×1 conv over both, resized (nearest) to the paired teacher map's size where it differs, then
mapped (3×3 conv + BN, no bias) to the teacher map's channels. The teacher maps are its stage
outputs *before* the final activation (``stageN_pre`` taps; the post-activation output where a
model has none; ``teacher_preact``) and its pooled vector. Hierarchical context loss (HCL) per
pair: MSE at full size plus MSE of adaptive-average-pooled maps at levels 4, 2, 1 (levels not below
the map size are skipped) weighted 1/2, 1/4, …, normalised by the weight sum.
loss = CE + beta·w·Σ HCL with w = min((epoch+1)/W, 1): ``warmup`` is in epochs of the reference
240-epoch run, W = warmup·epochs/240 (mdistiller: 20 epochs, counted from 1); beta 5 as
mdistiller's CIFAR-100 config.
"""
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.contracts import HParam, Method
from kdbench.losses import (STAGE_TAPS, adaptive_pool, batch_norm, check_stages, conv, frozen, match_size,
                            stage_names)

REF_EPOCHS = 240


class ABF(nn.Module):
    def __init__(self, dims, c_in, mid, c_out, fuse):
        super().__init__()
        self.reduce = nn.Sequential(conv(dims, c_in, mid), batch_norm(dims, mid))
        self.att = nn.Sequential(conv(dims, 2 * mid, 2, bias=True), nn.Sigmoid()) if fuse else None
        self.out = nn.Sequential(conv(dims, mid, c_out, 3, 1, 1), batch_norm(dims, c_out))
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)  # as mdistiller's ABF
        nn.init.kaiming_uniform_(self.out[0].weight, a=1)

    def forward(self, x, residual=None, out_size=None):
        x = self.reduce(x)
        if self.att is not None:
            residual = F.interpolate(residual, size=x.shape[2:], mode="nearest")
            weights = self.att(torch.cat([x, residual], 1))
            x = x * weights[:, :1] + residual * weights[:, 1:]
        fused = x
        if out_size is not None and tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.out(x), fused


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


def _as_map(v, dims):
    """A pooled vector [B, C] as a [B, C, 1(, 1)] map."""
    return v.flatten(1).reshape(v.shape[0], -1, *([1] * dims))


def pairs(hp, s_shapes, t_shapes):
    """(student name, teacher name, is_pool) per reviewed pair, shallow to deep."""
    s_names, t_names = stage_names(s_shapes), stage_names(t_shapes)
    out = []
    for s_name, t_name in zip(s_names, t_names):
        pre = t_name + "_pre"
        out.append((s_name, pre if hp.teacher_preact and pre in t_shapes else t_name, False))
    if hp.review_pool and "pool" in s_shapes and "pool" in t_shapes:
        out.append(("pool", "pool", True))
    return out


def _channels(shape, is_pool):
    return shape[0] if not is_pool else int(torch.Size(shape).numel())


def build(probe):
    check_stages(probe, "reviewkd")
    hp = probe.hp
    found = pairs(hp, probe.student_shapes, probe.teacher_shapes)
    dims = len(probe.student_shapes[found[0][0]]) - 1
    deepest = _channels(probe.student_shapes[found[-1][0]], found[-1][2])
    mid = hp.mid or min(512, deepest)
    return nn.ModuleList(
        ABF(dims, _channels(probe.student_shapes[s], is_pool), mid, _channels(probe.teacher_shapes[t], is_pool),
            i < len(found) - 1)
        for i, (s, t, is_pool) in enumerate(found)
    )


def review_term(step):
    s_feats, t_feats = step.student.feats, step.teacher.feats
    found = pairs(step.hp, s_feats, t_feats)
    dims = s_feats[found[0][0]].dim() - 2
    total, residual = 0, None
    for i in reversed(range(len(found))):
        s_name, t_name, is_pool = found[i]
        f_s, f_t = s_feats[s_name], frozen(t_feats[t_name])
        if is_pool:
            f_s, f_t = _as_map(f_s, dims), _as_map(f_t, dims)
        out, residual = step.modules[i](f_s, residual, f_t.shape[2:])
        total = total + hcl(out, f_t)
    return total


def loss(step):
    hp = step.hp
    ramp = step.ramp(hp.warmup * step.epochs / REF_EPOCHS)
    return {"ce": F.cross_entropy(step.student.logits, step.y), "review": hp.beta * ramp * review_term(step)}


METHODS = [
    Method(
        name="reviewkd",
        loss=loss,
        description="ReviewKD: fuse student stages deep to shallow (ABF), match teacher stages with a pyramid loss",
        citation="Chen et al., CVPR 2021",
        # patterns: the pre-activation taps and the pooled vector where a model offers them
        taps=STAGE_TAPS + ("stage[0-9]_pre", "stage[0-9][0-9]_pre", "[p]ool"),
        check=lambda probe: check_stages(probe, "reviewkd"),
        build=build,
        hparams=(
            HParam("beta", 5.0, "weight of the review (HCL) term (mdistiller CIFAR-100: 5)", low=0.0,
                   space=(0.1, 10.0), log=True),
            HParam("warmup", 20.0, f"warm-up length in epochs of a {REF_EPOCHS}-epoch run (scaled to the run)",
                   low=0.0, tune=False),
            HParam("mid", 0, "channels of the fused maps (0: min(512, channels of the deepest input))", low=0,
                   high=4096, tune=False),
            HParam("teacher_preact", True, "review the teacher's pre-activation stage maps (mdistiller)"),
            HParam("review_pool", True, "review the pooled feature vector too (mdistiller)"),
        ),
    )
]
