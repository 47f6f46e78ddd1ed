"""wsld: Weighted Soft Label Distillation.

Zhou, Song, Chen, Zhou, Wang, Yuan, Zhang: "Rethinking Soft Labels for Knowledge Distillation:
A Bias-Variance Tradeoff Perspective", ICLR 2021 (https://arxiv.org/abs/2102.00650).

Hinton KD with a per-sample weight on the soft-label term. Where the teacher fits a sample much
better than the student, the soft label is mostly useful ("variance reduction"); where the
student already fits it better than the teacher, the teacher's soft label mostly adds bias, so
it is down-weighted:

    w_i   = 1 − exp(−CE(z_s,i, y_i) / CE(z_t,i, y_i))           (no gradient through w)
    loss  = CE(z_s, y) + α · mean_i( w_i · T² · KL(softmax(z_t,i/T) ‖ softmax(z_s,i/T)) )

The paper's ImageNet setting is T = 2, α = 2.25. The KD term is kdbench's own
(:func:`kdbench.losses.kd_term`, per sample).
"""
import torch
import torch.nn.functional as F

from kdbench import hookimpl
from kdbench.contracts import HParam, Method
from kdbench.losses import frozen, kd_term

KDBENCH_API = 1  # the kdbench plugin API this module targets

EPS = 1e-7


def sample_weights(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """w_i = 1 − exp(−CE_s,i / CE_t,i), in [0, 1): near 1 where the student is much worse."""
    with torch.no_grad():
        ce_s = F.cross_entropy(z_s.detach().float(), y, reduction="none")
        ce_t = F.cross_entropy(z_t.detach().float(), y, reduction="none")
        return 1 - torch.exp(-ce_s / (ce_t + EPS))


def loss(step):
    hp = step.hp
    z_s = step.student.logits.float()  # float32 even under bf16 autocast
    z_t = frozen(step.teacher.logits)
    kl = kd_term(z_s, z_t, hp.T, per_sample=True)  # T²·KL(p_t ‖ p_s) of each sample
    w = sample_weights(z_s, z_t, step.y)
    return {
        "ce": F.cross_entropy(z_s, step.y),
        "wsl": hp.alpha * (w * kl).mean(),
    }


METHOD = Method(
    name="wsld",
    loss=loss,
    description="weighted soft labels: KD with each sample's KL weighted by 1 − exp(−CE_s/CE_t)",
    citation="Zhou et al., ICLR 2021",
    hparams=(
        HParam("T", 4.0, "softmax temperature", low=0.0, open_low=True, space=(1.0, 10.0), log=True),
        HParam("alpha", 2.25, "weight of the weighted soft-label term", low=0.0, space=(0.1, 5.0)),
    ),
)


@hookimpl
def register_methods(register):
    register(METHOD)
