"""rocket: Zhou et al. 2018, "Rocket Launching: A Universal and Efficient Framework for Training
Well-performing Light Net".

No pre-trained teacher: a booster head (two 3×3 conv + BN + ReLU layers of ``width`` channels,
global average pooling, linear) shares the student's lower layers up to stage ``tap`` and is
trained jointly with the light net (the student). loss = CE(light) + CE(booster)
+ hint·MSE(z_light, z_booster.detach()): the gradient block keeps the hint from pulling the
booster toward the light net (the booster's CE still trains the shared layers).

Defaults and settings against the reference code: docs/FIDELITY.md.
"""
import torch.nn.functional as F
from torch import nn

from kdbench.contracts import HParam, Method
from kdbench.errors import KdbenchError
from kdbench.losses import batch_norm, conv


def tap_name(hp):
    return f"stage{hp.tap}"


def booster(shape, width, num_classes):
    dims = len(shape) - 1
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    return nn.Sequential(
        conv(dims, shape[0], width, 3, 1, 1), batch_norm(dims, width), nn.ReLU(),
        conv(dims, width, width, 3, 1, 1), batch_norm(dims, width), nn.ReLU(),
        pool, nn.Flatten(), nn.Linear(width, num_classes),
    )


def check(probe):
    name = tap_name(probe.hp)
    if name not in probe.student_shapes:
        raise KdbenchError(f"rocket shares the student up to {name!r}, which it does not have (taps: {', '.join(probe.student_taps)})")
    if len(probe.student_shapes[name]) < 2:
        raise KdbenchError(f"rocket needs a feature map at {name!r}, got shape {probe.student_shapes[name]}")


def build(probe):
    return nn.ModuleDict({"booster": booster(probe.student_shapes[tap_name(probe.hp)], probe.hp.width, probe.num_classes)})


def loss(step):
    z_light = step.student.logits
    z_boost = step.modules["booster"](step.student.feats[tap_name(step.hp)])
    return {
        "ce": F.cross_entropy(z_light, step.y),
        "ce_booster": F.cross_entropy(z_boost, step.y),
        "hint": step.hp.hint * F.mse_loss(z_light, z_boost.detach()),
    }


METHODS = [
    Method(
        name="rocket",
        loss=loss,
        description="Rocket Launching: a wider booster head shares the student's lower layers; logit hint with gradient block",
        citation="Zhou et al., AAAI 2018",
        taps=lambda hp, s_taps, t_taps: [tap_name(hp)] if tap_name(hp) in s_taps else [],
        check=check,
        build=build,
        needs_teacher=False,
        hparams=(
            HParam("hint", 1.0, "weight of the logit hint MSE(light, booster.detach())", low=0.0, space=(0.01, 10.0), log=True),
            HParam("tap", 1, "the booster branches off after this student stage (1-based)", low=1, high=99, tune=False),
            HParam("width", 64, "channels of the booster's conv layers", low=1, high=4096, space=(16, 256), log=True),
        ),
    )
]
