"""at: attention transfer, Zagoruyko & Komodakis 2017, "Paying More Attention to Attention".

a(f) = L2-normalise(flatten(mean_c |f|^p)); loss = CE + β·Σ_stages mean((a_s − a_t)²).
Stage outputs are paired one to one, shallow to deep; where spatial sizes differ the larger
attention map is average-pooled to the smaller.
"""
import torch.nn.functional as F

from kdbench.contracts import HParam, Method
from kdbench.errors import KdbenchError


def attention(f, p):
    """Spatial attention map of a feature map [B, C, *spatial]: [B, C, ...] → [B, prod(spatial)]."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


def match_size(a, b):
    """Average-pool the larger of two feature maps to the other's spatial size."""
    if a.shape[2:] == b.shape[2:]:
        return a, b
    pool = F.adaptive_avg_pool1d if a.dim() == 3 else F.adaptive_avg_pool2d
    if a.shape[2:].numel() > b.shape[2:].numel():
        return pool(a, b.shape[2:]), b
    return a, pool(b, a.shape[2:])


def at_term(feats_s, feats_t, p):
    total = 0
    for f_s, f_t in zip(feats_s, feats_t):
        f_s, f_t = match_size(f_s, f_t.float())
        total = total + (attention(f_s, p) - attention(f_t, p)).pow(2).mean()
    return total


def loss(step):
    hp = step.hp
    return {
        "ce": hp.ce_weight * F.cross_entropy(step.student.logits, step.y),
        "at": hp.beta * at_term(list(step.student.feats.values()), list(step.teacher.feats.values()), hp.p),
    }


def check(probe):
    s, t = list(probe.student_shapes), list(probe.teacher_shapes)
    if len(s) != len(t):
        raise KdbenchError(f"at pairs stages one to one: the student has {len(s)} ({s}), the teacher {len(t)} ({t})")


METHODS = [
    Method(
        name="at",
        loss=loss,
        description="attention transfer: match spatial attention maps of the stage outputs",
        citation="Zagoruyko & Komodakis, ICLR 2017",
        taps=("stage[0-9]", "stage[0-9][0-9]"),
        check=check,
        hparams=(
            HParam("p", 2.0, "exponent of the attention map", low=0.0, open_low=True, space=(1.0, 4.0)),
            HParam("beta", 1000.0, "weight of the attention term", low=0.0, space=(10.0, 1e4), log=True),
            HParam("ce_weight", 1.0, "weight of cross-entropy", low=0.0, tune=False),
        ),
    )
]
