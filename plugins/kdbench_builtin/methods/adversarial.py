"""adversarial: Xu et al. 2018, "Training Shallow and Thin Networks for Acceleration via Knowledge
Distillation with Conditional Adversarial Networks".

A discriminator D (MLP: 2·classes → ``hidden`` → ``hidden`` → 1, LeakyReLU) sees
[softmax(z), one-hot(y)] and outputs a logit "this came from the teacher". One summed loss trains
both players, by detaching:
* d_loss = BCE(D(p_t), 1) + BCE(D(p_s.detach()), 0): gradients reach D only;
* adv = BCE(D'(p_s), 1) with D' = D evaluated on detached copies of its parameters
  (torch.func.functional_call): gradients reach the student only (non-saturating generator loss).
loss = CE + weight·adv + d_weight·d_loss (+ alpha·KD when alpha > 0).

Defaults and settings against the reference code: docs/FIDELITY.md.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kdbench.contracts import HParam, Method
from kdbench.losses import ce_plus_optional_kd, check_classes, frozen


def build(probe):
    c, h = probe.num_classes, probe.hp.hidden
    return nn.ModuleDict({"disc": nn.Sequential(
        nn.Linear(2 * c, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2), nn.Linear(h, 1))})


def disc_input(logits, y):
    p = F.softmax(logits.float(), dim=1)
    return torch.cat([p, F.one_hot(y, p.shape[1]).to(p.dtype)], 1)


def adversarial_terms(step):
    disc = step.modules["disc"]
    x_s, x_t = disc_input(step.student.logits, step.y), disc_input(frozen(step.teacher.logits), step.y)
    d_t, d_s = disc(x_t.detach()), disc(x_s.detach())
    d_loss = (F.binary_cross_entropy_with_logits(d_t, torch.ones_like(d_t))
              + F.binary_cross_entropy_with_logits(d_s, torch.zeros_like(d_s)))
    fixed = {k: v.detach() for k, v in disc.named_parameters()}
    d_fooled = functional_call(disc, fixed, (x_s,))
    adv = F.binary_cross_entropy_with_logits(d_fooled, torch.ones_like(d_fooled))
    return adv, d_loss


def loss(step):
    adv, d_loss = adversarial_terms(step)
    return ce_plus_optional_kd(step, adv=step.hp.weight * adv, disc=step.hp.d_weight * d_loss)


METHODS = [
    Method(
        name="adversarial",
        loss=loss,
        description="conditional adversarial KD: the student learns to fool a label-conditioned teacher/student discriminator",
        citation="Xu et al., ICLR-W 2018",
        check=lambda probe: check_classes(probe, "adversarial"),  # one class: a constant softmax for D
        build=build,
        hparams=(
            HParam("weight", 1.0, "weight of the student's adversarial (fool-D) term", low=0.0, space=(0.01, 10.0), log=True),
            HParam("d_weight", 1.0, "weight of the discriminator's loss (trains D only)", low=0.0, open_low=True, space=(0.1, 10.0), log=True),
            HParam("alpha", 0.0, "weight of an optional KD term", low=0.0, space=(0.0, 1.0)),
            HParam("T", 4.0, "KD temperature (when alpha > 0)", low=0.0, open_low=True, space=(1.0, 20.0), log=True),
            HParam("hidden", 128, "width of the discriminator's hidden layers", low=1, high=4096, tune=False),
        ),
    )
]
