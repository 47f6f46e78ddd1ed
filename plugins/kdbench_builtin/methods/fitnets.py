"""fitnets: Romero et al. 2015, "FitNets: Hints for Thin Deep Nets".

Stage "hint" (``hint_epochs``): the student's guided stage, through a regressor r, regresses the
teacher's hint stage: hint_weight·MSE(r(f_s), f_t); only the layers below the guided stage get
gradients. Main stage: Hinton KD (1−α)·CE + α·T²·KL, plus ``hint_main``·MSE (0 = the paper's
stage 2). r = conv + BN + ReLU: 1×1 where spatial sizes match, a stride-r conv (kernel r) when the
student map is r× larger, a transposed conv (kernel r, stride r) when it is r× smaller.
``hint``/``guided`` = stage index (1-based); 0 = the middle stage, ceil(N/2): stage2 of three as
in the reference (f2), stage1 of the two-stage embedded CNNs (stage2 feeds the classifier
directly, so hinting it would leave nothing for stage 2 to teach).
"""
import math

import torch.nn.functional as F
from torch import nn

from kdbench.contracts import HParam, Method, Stage
from kdbench.errors import KdbenchError
from kdbench.losses import STAGE_TAPS, batch_norm, conv, frozen, hinton_kd, spatial_ratio, stage_names


def _pick(names, index, what):
    if index == 0:
        index = math.ceil(len(names) / 2)
    if not 1 <= index <= len(names):
        raise KdbenchError(f"fitnets {what}={index} but the network has stages 1..{len(names)}")
    return names[index - 1]


def pair(hp, s_names, t_names):
    return _pick(stage_names(s_names), hp.guided, "guided"), _pick(stage_names(t_names), hp.hint, "hint")


def regressor(s_shape, t_shape):
    dims = len(s_shape) - 1
    r = spatial_ratio(s_shape[1:], t_shape[1:])
    c_s, c_t = s_shape[0], t_shape[0]
    if r is None:
        raise KdbenchError(f"fitnets cannot regress a {tuple(s_shape)} student map onto a {tuple(t_shape)} hint")
    if r == 1:
        layer = conv(dims, c_s, c_t, 1)
    elif r > 1:
        layer = conv(dims, c_s, c_t, int(r), int(r))
    else:
        k = round(1 / r)
        layer = (nn.ConvTranspose1d if dims == 1 else nn.ConvTranspose2d)(c_s, c_t, k, k, bias=False)
    return nn.Sequential(layer, batch_norm(dims, c_t), nn.ReLU())


def check(probe):
    g, h = pair(probe.hp, probe.student_shapes, probe.teacher_shapes)
    regressor(probe.student_shapes[g], probe.teacher_shapes[h])


def build(probe):
    g, h = pair(probe.hp, probe.student_shapes, probe.teacher_shapes)
    return nn.ModuleDict({"reg": regressor(probe.student_shapes[g], probe.teacher_shapes[h])})


def hint_term(step):
    g, h = pair(step.hp, step.student.feats, step.teacher.feats)
    return F.mse_loss(step.modules["reg"](step.student.feats[g]), frozen(step.teacher.feats[h]))


def hint_loss(step):
    return {"hint": step.hp.hint_weight * hint_term(step)}


def loss(step):
    terms = hinton_kd(step)
    if step.hp.hint_main > 0:
        terms["hint"] = step.hp.hint_main * hint_term(step)
    return terms


METHODS = [
    Method(
        name="fitnets",
        loss=loss,
        description="FitNets: a hint stage regressing a teacher stage through a conv regressor, then KD",
        citation="Romero et al., ICLR 2015",
        taps=STAGE_TAPS,
        check=check,
        build=build,
        stages=lambda hp: [Stage("hint", "hint_epochs", hint_loss)],
        hparams=(
            HParam("hint_epochs", 3, "epochs of the hint stage (reference 30 of 240; 0 skips it)", low=0, high=1000, space=(0, 10)),
            HParam("hint_weight", 100.0, "weight of the hint MSE in the hint stage", low=0.0, open_low=True, space=(1.0, 1000.0), log=True),
            HParam("hint_main", 0.0, "weight of the hint MSE in the main stage (0: KD only, as in the paper)", low=0.0, space=(0.0, 100.0)),
            HParam("hint", 0, "teacher hint stage, 1-based (0: middle stage)", low=0, high=99, tune=False),
            HParam("guided", 0, "student guided stage, 1-based (0: middle stage)", low=0, high=99, tune=False),
            HParam("T", 4.0, "softmax temperature of the KD stage", low=0.0, open_low=True, space=(1.0, 20.0), log=True),
            HParam("alpha", 0.9, "weight of the KD term; CE gets 1 − alpha", low=0.0, high=1.0, space=(0.1, 0.99)),
        ),
    )
]
