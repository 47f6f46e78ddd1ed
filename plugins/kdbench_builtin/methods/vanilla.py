"""vanilla: the student alone, cross-entropy on the labels; the baseline every method is compared to.

Defaults and settings against the reference code: docs/FIDELITY.md.
"""
import torch.nn.functional as F

from kdbench.contracts import Method


def loss(step):
    return {"ce": F.cross_entropy(step.student.logits, step.y)}


METHODS = [
    Method(
        name="vanilla",
        loss=loss,
        description="no distillation: the student trained on the labels alone",
        citation="baseline",
        needs_teacher=False,
    )
]
