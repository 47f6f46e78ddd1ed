"""vid: Ahn et al. 2019, "Variational Information Distillation for Knowledge Transfer". Settings
against the reference code: docs/FIDELITY.md.

As RepDistiller's VIDLoss (``distiller_zoo/VID.py``, built as VIDLoss(C_s, C_t, C_t)), per stage
pair: first the larger of the two maps is average-pooled to the other's size, then
μ = 1×1 conv → ReLU → 1×1 conv → ReLU → 1×1 conv, all without bias (student → teacher channels,
hidden = teacher channels), σ²_c = softplus(θ_c) + eps per teacher channel (θ set so σ² starts
at ``init_var``); term = mean ½[(μ(f_s) − f_t)²/σ² + log σ²] (the Gaussian negative log-likelihood
without its constant). loss = CE + beta·Σ_stages term.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.contracts import HParam, Method
from kdbench.losses import STAGE_TAPS, check_stages, conv, frozen, match_size, stage_outputs


class VIDRegressor(nn.Module):
    def __init__(self, dims, c_s, c_t, init_var, eps):
        super().__init__()
        self.eps = eps
        self.mu = nn.Sequential(conv(dims, c_s, c_t), nn.ReLU(), conv(dims, c_t, c_t), nn.ReLU(), conv(dims, c_t, c_t))
        self.theta = nn.Parameter(torch.full((c_t,), math.log(math.expm1(init_var - eps))))

    def var(self):
        return F.softplus(self.theta) + self.eps

    def nll(self, f_s, f_t):
        f_s, f_t = match_size(f_s, f_t)
        mu = self.mu(f_s)
        var = self.var().view(1, -1, *([1] * (f_t.dim() - 2)))
        return (0.5 * ((mu - f_t) ** 2 / var + torch.log(var))).mean()


def build(probe):
    s_names, t_names = check_stages(probe, "vid")
    hp = probe.hp
    return nn.ModuleList(
        VIDRegressor(len(probe.student_shapes[s_name]) - 1, probe.student_shapes[s_name][0],
                     probe.teacher_shapes[t_name][0], hp.init_var, hp.eps)
        for s_name, t_name in zip(s_names, t_names)
    )


def vid_term(step):
    f_s, f_t = stage_outputs(step.student.feats), stage_outputs(step.teacher.feats)
    return sum(reg.nll(s_map, frozen(t_map)) for reg, s_map, t_map in zip(step.modules, f_s, f_t))


def loss(step):
    return {"ce": F.cross_entropy(step.student.logits, step.y), "vid": step.hp.beta * vid_term(step)}


METHODS = [
    Method(
        name="vid",
        loss=loss,
        description="VID: maximise a Gaussian lower bound on teacher/student stage mutual information",
        citation="Ahn et al., CVPR 2019",
        taps=STAGE_TAPS,
        check=lambda probe: check_stages(probe, "vid"),
        build=build,
        hparams=(
            HParam("beta", 1.0, "weight of the VID term", low=0.0, space=(0.1, 10.0), log=True),
            HParam("init_var", 5.0, "initial per-channel variance", low=0.0, open_low=True, space=(0.5, 10.0), log=True),
            HParam("eps", 1e-5, "variance floor", low=0.0, open_low=True, high=1.0, tune=False),
        ),
    )
]
