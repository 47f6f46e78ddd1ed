"""logits: Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?" — regress the teacher's logits.

loss = ce_weight·CE(z_s, y) + weight·mean((z_s − z_t)²), the mean over batch and classes of the
raw pre-softmax logits (no temperature).

Defaults and settings against the reference code: docs/FIDELITY.md.
"""
import torch.nn.functional as F

from kdbench.contracts import HParam, Method
from kdbench.losses import ce, ce_weight, check_classes, frozen


def logits_term(z_s, z_t):
    return F.mse_loss(z_s.float(), frozen(z_t))


def loss(step):
    return {"ce": ce(step), "logits": step.hp.weight * logits_term(step.student.logits, step.teacher.logits)}


METHODS = [
    Method(
        name="logits",
        loss=loss,
        description="logit regression: MSE between student and teacher pre-softmax logits",
        citation="Ba & Caruana, NIPS 2014",
        check=lambda probe: check_classes(probe, "logits"),
        hparams=(
            HParam("weight", 1.0, "weight of the logit MSE", low=0.0, space=(0.01, 10.0), log=True),
            ce_weight(),
        ),
    )
]
