"""at: attention transfer, Zagoruyko & Komodakis 2017, "Paying More Attention to Attention".

a(f) = L2-normalise(flatten(F(f))); loss = CE + β·Σ_stages mean((a_s − a_t)²), where the channel
mapping F is ``mapping``: mean_p = mean_c |f|^p (default), sum_abs = Σ_c |f|, sum_p = Σ_c |f|^p,
max_p = max_c |f|^p (the paper's three maps; after the L2 normalisation sum_p equals mean_p and
sum_abs equals mean_p with p=1 — kept as named options for fidelity to the paper).
Stage outputs are paired one to one, shallow to deep; where spatial sizes differ the larger
attention map is average-pooled to the smaller.
"""
import torch.nn.functional as F

from kdbench.contracts import HParam, Method
from kdbench.errors import KdbenchError


MAPPINGS = ("mean_p", "sum_abs", "sum_p", "max_p")


def attention(f, p, mapping="mean_p"):
    """Spatial attention map of a feature map [B, C, *spatial]: [B, C, ...] → [B, prod(spatial)]."""
    if mapping == "mean_p":
        a = f.abs().pow(p).mean(1)
    elif mapping == "sum_abs":
        a = f.abs().sum(1)
    elif mapping == "sum_p":
        a = f.abs().pow(p).sum(1)
    elif mapping == "max_p":
        a = f.abs().pow(p).amax(1)
    else:
        raise KdbenchError(f"at: unknown mapping {mapping!r} (one of {', '.join(MAPPINGS)})")
    return F.normalize(a.flatten(1), dim=1)


def match_size(a, b):
    """Average-pool the larger of two feature maps to the other's spatial size."""
    if a.shape[2:] == b.shape[2:]:
        return a, b
    pool = F.adaptive_avg_pool1d if a.dim() == 3 else F.adaptive_avg_pool2d
    if a.shape[2:].numel() > b.shape[2:].numel():
        return pool(a, b.shape[2:]), b
    return a, pool(b, a.shape[2:])


def at_term(feats_s, feats_t, p, mapping="mean_p"):
    total = 0
    for f_s, f_t in zip(feats_s, feats_t):
        f_s, f_t = match_size(f_s, f_t.detach().float())
        total = total + (attention(f_s, p, mapping) - attention(f_t, p, mapping)).pow(2).mean()
    return total


def loss(step):
    hp = step.hp
    return {
        "ce": hp.ce_weight * F.cross_entropy(step.student.logits, step.y),
        "at": hp.beta * at_term(list(step.student.feats.values()), list(step.teacher.feats.values()), hp.p, hp.mapping),
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
            HParam("mapping", "mean_p", "channel mapping of the attention map (see the module doc)",
                   choices=MAPPINGS, tune=False),
            HParam("ce_weight", 1.0, "weight of cross-entropy", low=0.0, tune=False),
        ),
    )
]
