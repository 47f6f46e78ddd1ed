"""fsp: Yim et al. 2017, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization
and Transfer Learning".

G(f1, f2) = f1ᵀ·f2 / (spatial size), a [C1, C2] matrix per sample between consecutive stage
outputs (the larger map pooled to the smaller). Init stage (``fsp_epochs``): beta·Σ_pairs
MSE(G_s, G_t); main stage: CE (plus ``alpha``·KD if set; the reference uses none). FSP needs equal
channel counts; with ``connector`` (default on, so mismatched pairs like the embedded 16→32-channel
one are served) a 1×1 conv per student stage maps student channels to the teacher's first.
"""
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.contracts import HParam, Method, Stage
from kdbench.errors import KdbenchError

from ._common_b import STAGE_TAPS, conv, same_stage_count, stage_names
from .at import match_size
from .kd import ce_plus_optional_kd


def fsp_matrix(f1, f2):
    f1, f2 = match_size(f1, f2)
    return torch.bmm(f1.flatten(2), f2.flatten(2).transpose(1, 2)) / f1.shape[2:].numel()


def check(probe):
    s, t = same_stage_count(probe, "fsp")
    if len(s) < 2:
        raise KdbenchError(f"fsp needs >= 2 stages to pair, the networks have {len(s)}")
    if not probe.hp.connector:
        for a, b in zip(s, t):
            if probe.student_shapes[a][0] != probe.teacher_shapes[b][0]:
                raise KdbenchError(
                    f"fsp needs equal channels: student {a} has {probe.student_shapes[a][0]}, teacher {b} "
                    f"{probe.teacher_shapes[b][0]}; set connector=true to add 1x1 connectors")


def build(probe):
    if not probe.hp.connector:
        return None
    s, t = same_stage_count(probe, "fsp")
    return nn.ModuleList(
        conv(len(probe.student_shapes[a]) - 1, probe.student_shapes[a][0], probe.teacher_shapes[b][0])
        for a, b in zip(s, t)
    )


def fsp_term(step):
    s = [step.student.feats[n] for n in stage_names(step.student.feats)]
    t = [step.teacher.feats[n].detach().float() for n in stage_names(step.teacher.feats)]
    if step.modules is not None:
        s = [c(f) for c, f in zip(step.modules, s)]
    return sum(F.mse_loss(fsp_matrix(s[i], s[i + 1]), fsp_matrix(t[i], t[i + 1])) for i in range(len(s) - 1))


def init_loss(step):
    return {"fsp": step.hp.beta * fsp_term(step)}


METHODS = [
    Method(
        name="fsp",
        loss=ce_plus_optional_kd,
        description="FSP: an init stage matching flow matrices between consecutive stages, then CE",
        citation="Yim et al., CVPR 2017",
        taps=STAGE_TAPS,
        check=check,
        build=build,
        stages=lambda hp: [Stage("init", "fsp_epochs", init_loss)],
        hparams=(
            HParam("fsp_epochs", 3, "epochs of the FSP init stage (0 skips it)", low=0, high=1000, space=(1, 10)),
            HParam("beta", 50.0, "weight of the FSP term", low=0.0, open_low=True, space=(1.0, 500.0), log=True),
            HParam("connector", True, "1x1 connectors when channel counts differ (off: such pairs are refused)"),
            HParam("alpha", 0.0, "weight of an optional KD term in the main stage (reference: 0)", low=0.0, space=(0.0, 1.0)),
            HParam("T", 4.0, "KD temperature (when alpha > 0)", low=0.0, open_low=True, space=(1.0, 20.0), log=True),
        ),
    )
]
