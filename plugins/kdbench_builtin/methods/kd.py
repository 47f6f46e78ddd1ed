"""kd: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

loss = (1 − α)·CE(z_s, y) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), KL averaged over the batch.
"""
import torch.nn.functional as F

from kdbench.contracts import HParam, Method


def kd_term(z_s, z_t, T):
    """T²·KL(p_t ‖ p_s) with p = softmax(z/T), summed over classes and averaged over the batch."""
    log_p_s = F.log_softmax(z_s / T, dim=1)
    log_p_t = F.log_softmax(z_t / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T


def ce_plus_optional_kd(step):
    """The main stage of init-stage methods (ab, fsp): CE, plus hp.alpha·KD when alpha > 0."""
    hp = step.hp
    terms = {"ce": F.cross_entropy(step.student.logits, step.y)}
    if hp.alpha > 0:
        terms["kd"] = hp.alpha * kd_term(step.student.logits, step.teacher.logits.detach().float(), hp.T)
    return terms


def loss(step):
    hp = step.hp
    return {
        "ce": (1 - hp.alpha) * F.cross_entropy(step.student.logits, step.y),
        "kd": hp.alpha * kd_term(step.student.logits, step.teacher.logits.float(), hp.T),
    }


METHODS = [
    Method(
        name="kd",
        loss=loss,
        description="Hinton KD: match the teacher's temperature-softened outputs",
        citation="Hinton et al., NIPS-W 2015",
        hparams=(
            HParam("T", 4.0, "softmax temperature", low=0.0, open_low=True, space=(1.0, 20.0), log=True),
            HParam("alpha", 0.9, "weight of the KD term; CE gets 1 − alpha", low=0.0, high=1.0, space=(0.1, 0.99)),
        ),
    )
]
