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
from kdbench.losses import STAGE_TAPS, ce_plus_optional_kd, check_stages, conv, frozen, match_size, stage_outputs


def fsp_matrix(f1, f2):
    f1, f2 = match_size(f1, f2)
    return torch.bmm(f1.flatten(2), f2.flatten(2).transpose(1, 2)) / f1.shape[2:].numel()


def check(probe):
    s_names, t_names = check_stages(probe, "fsp", minimum=2)  # consecutive stages make the pairs
    if not probe.hp.connector:
        for s_name, t_name in zip(s_names, t_names):
            if probe.student_shapes[s_name][0] != probe.teacher_shapes[t_name][0]:
                raise KdbenchError(
                    f"fsp needs equal channels: student {s_name} has {probe.student_shapes[s_name][0]}, teacher "
                    f"{t_name} {probe.teacher_shapes[t_name][0]}; set connector=true to add 1x1 connectors")


def build(probe):
    if not probe.hp.connector:
        return None
    s_names, t_names = check_stages(probe, "fsp")
    return nn.ModuleList(
        conv(len(probe.student_shapes[s_name]) - 1, probe.student_shapes[s_name][0], probe.teacher_shapes[t_name][0])
        for s_name, t_name in zip(s_names, t_names)
    )


def fsp_term(step):
    f_s = stage_outputs(step.student.feats)
    f_t = [frozen(f) for f in stage_outputs(step.teacher.feats)]
    if step.modules is not None:
        f_s = [conn(f) for conn, f in zip(step.modules, f_s)]
    return sum(F.mse_loss(fsp_matrix(f_s[i], f_s[i + 1]), fsp_matrix(f_t[i], f_t[i + 1])) for i in range(len(f_s) - 1))


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
