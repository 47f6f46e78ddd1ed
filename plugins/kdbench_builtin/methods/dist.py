"""dist: Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher" (DIST). Settings against
the reference code (the official loss, hunto/DIST_KD ``dist_kd.py``): docs/FIDELITY.md.

y = softmax(z/T). inter = 1 − mean_i pearson(y_s[i, :], y_t[i, :]) (each sample's class
distribution); intra = 1 − mean_c pearson(y_s[:, c], y_t[:, c]) (each class over the batch).
loss = ce_weight·CE + T²·(β·inter + γ·intra), as the official loss. pearson(a, b) = a'·b' /
(‖a'‖·‖b'‖ + 1e-8) with a', b' the centred vectors (ε added to the product of the norms, as the
official code). Defaults β=γ=1 are the official loss's; its default temperature is τ=1, kdbench's
T=4 is the KD temperature of the CIFAR recipe (see docs/FIDELITY.md). A batch of one has no
intra-class relation: kdbench makes that term 0 (the official code gives 1·τ² there).
"""
from kdbench.contracts import HParam, Method
from kdbench.losses import ce, ce_weight, check_classes, frozen

EPS = 1e-8


def pearson_rows(a, b):
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


def dist_terms(z_s, z_t, T):
    y_s, y_t = (z_s / T).softmax(1), (frozen(z_t) / T).softmax(1)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean() if len(y_s) > 1 else y_s.sum() * 0
    return T * T * inter, T * T * intra


def loss(step):
    hp = step.hp
    inter, intra = dist_terms(step.student.logits.float(), step.teacher.logits, hp.T)
    return {"ce": ce(step), "inter": hp.beta * inter, "intra": hp.gamma * intra}


METHODS = [
    Method(
        name="dist",
        loss=loss,
        description="DIST: Pearson correlation of softened outputs, across classes and across the batch",
        citation="Huang et al., NeurIPS 2022",
        check=lambda probe: check_classes(probe, "dist"),
        hparams=(
            HParam("beta", 1.0, "weight of the inter-class term", low=0.0, space=(0.25, 4.0), log=True),
            HParam("gamma", 1.0, "weight of the intra-class term", low=0.0, space=(0.25, 4.0), log=True),
            HParam("T", 4.0, "softmax temperature", low=0.0, open_low=True, space=(1.0, 8.0)),
            ce_weight(),
        ),
    )
]
