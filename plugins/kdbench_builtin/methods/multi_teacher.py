"""multi_teacher: several teachers (survey note 004; Hinton et al. 2015; You et al. 2017).

The soft target is the average of the teachers' softened outputs, q = 1/M Σ_m softmax(z_m/T),
over the main teacher and the run's extra teachers (``--teachers a,b``); the target is
a·onehot(y) + b·q and the loss the cross-entropy of the student's softened output against it,
scaled by T² (Hinton's factor, so the gradients keep their size at T = 20):

    loss = T² · CE(a·onehot + b·q, softmax(z_s/T)) = a·T²·CE(y, p_s^T) + b·T²·CE(q, p_s^T).

Terms: ``ce`` = the one-hot part, ``kd`` = the soft part (their sum is the loss above).
Defaults from the seed note: T = 20, a = 0.1, b = 0.9. With no extra teachers it is Hinton KD
with cross-entropy (not KL) against the main teacher's target.

Defaults and settings against the reference code: docs/FIDELITY.md.
"""
import torch
import torch.nn.functional as F

from kdbench.contracts import HParam, Method
from kdbench.losses import frozen


def soft_target(teacher_logits, T):
    """Mean over teachers of softmax(z/T), in float32 (a teacher may run in bf16)."""
    return torch.stack([F.softmax(frozen(z) / T, dim=1) for z in teacher_logits]).mean(0)


def loss(step):
    hp = step.hp
    teachers = [step.teacher.logits] + [o.logits for o in (step.teachers or [])]
    q = soft_target(teachers, hp.T)
    log_p = F.log_softmax(step.student.logits.float() / hp.T, dim=1)
    scale = hp.T * hp.T
    return {
        "ce": hp.a * scale * F.nll_loss(log_p, step.y),
        "kd": hp.b * scale * -(q * log_p).sum(1).mean(),
    }


METHODS = [
    Method(
        name="multi_teacher",
        loss=loss,
        description="several teachers: match a·onehot + b·(mean softened teacher outputs) at temperature T",
        citation="Hinton et al. 2015; You et al., KDD 2017 (survey note 004)",
        uses_teachers=True,
        hparams=(
            HParam("T", 20.0, "softmax temperature", low=0.0, open_low=True, space=(1.0, 30.0), log=True),
            HParam("a", 0.1, "weight of the one-hot target", low=0.0, space=(0.0, 1.0)),
            HParam("b", 0.9, "weight of the averaged soft target", low=0.0, space=(0.0, 1.0)),
        ),
    )
]
