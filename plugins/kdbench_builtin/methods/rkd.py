"""rkd: Park et al. 2019, "Relational Knowledge Distillation", on the pooled feature.

Distance: ψ_D = pairwise Euclidean distances divided by their mean over distinct pairs;
angle: ψ_A(i, j, k) = cos∠(e_i − e_j, e_k − e_j) over all triplets; each matched with smooth-L1
(Huber, δ=1, mean). loss = ce_weight·CE + w_dist·L_D + w_angle·L_A. Needs a batch of ≥ 2 (≥ 3 for
angles to carry anything): a batch of one contributes 0.

Defaults and settings against the reference code: docs/FIDELITY.md.
"""
import torch
import torch.nn.functional as F

from kdbench.contracts import HParam, Method
from kdbench.losses import as_vectors, ce, ce_weight, check_pool, frozen


def pdist(e, eps=1e-12):
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * e @ e.t()).clamp_min(eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def positive_mean(d):
    """Mean of the positive entries (the off-diagonal distances) with a fixed shape — no boolean
    indexing, so the step can be captured as a CUDA graph."""
    positive = d > 0
    return torch.where(positive, d, 0).sum() / positive.sum().clamp_min(1)


def distance_term(f_s, f_t):
    if len(f_s) < 2:
        return f_s.sum() * 0
    with torch.no_grad():
        d_t = pdist(f_t)
        d_t = d_t / positive_mean(d_t)
    d_s = pdist(f_s)
    d_s = d_s / positive_mean(d_s)
    return F.smooth_l1_loss(d_s, d_t)


def angles(e):
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # [j, i] = e_i − e_j
    return diff @ diff.transpose(1, 2)  # [j, i, k] = cos of angle at e_j


def angle_term(f_s, f_t):
    with torch.no_grad():
        a_t = angles(f_t)
    return F.smooth_l1_loss(angles(f_s), a_t)


def loss(step):
    f_s, f_t = as_vectors(step.student.feats["pool"]), as_vectors(frozen(step.teacher.feats["pool"]))
    hp = step.hp
    return {
        "ce": ce(step),
        "rkd_dist": hp.w_dist * distance_term(f_s, f_t),
        "rkd_angle": hp.w_angle * angle_term(f_s, f_t),
    }


METHODS = [
    Method(
        name="rkd",
        loss=loss,
        description="relational KD: match pairwise distances and triplet angles of the pooled features",
        citation="Park et al., CVPR 2019",
        taps=("pool",),
        check=lambda probe: check_pool(probe, "rkd"),
        hparams=(
            HParam("w_dist", 25.0, "weight of the distance term", low=0.0, space=(1.0, 100.0), log=True),
            HParam("w_angle", 50.0, "weight of the angle term", low=0.0, space=(1.0, 200.0), log=True),
            ce_weight(),
        ),
    )
]
