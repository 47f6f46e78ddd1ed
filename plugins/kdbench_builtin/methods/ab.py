"""ab: Heo et al. 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons".

Init stage (``ab_epochs``) only: a connector (1×1 conv + BN, student → teacher channels) maps each
student pre-ReLU stage map s; with t the teacher's pre-ReLU map and margin m,
  ℓ = Σ (s + m)²·[s > −m ∧ t ≤ 0] + (s − m)²·[s ≤ m ∧ t > 0]
per stage, weighted 2^(i−n) (deepest 1), divided by the batch size and scaled by 3/1000 as in
RepDistiller. Main stage: CE (RepDistiller runs AB with -a 0, so no KD), plus ``alpha``·KD if set.
"""
from torch import nn

from kdbench.contracts import HParam, Method, Stage
from kdbench.errors import KdbenchError

from ._common_b import bn, conv
from .at import match_size
from .kd import ce_plus_optional_kd


def pre_names(names):
    return [n for n in names if n.startswith("stage") and n.endswith("_pre") and n[5:-4].isdigit()]


def _pairs(probe):
    s, t = pre_names(probe.student_shapes), pre_names(probe.teacher_shapes)
    if not s or len(s) != len(t):
        raise KdbenchError(f"ab needs the same number (>= 1) of pre-ReLU stage taps on both networks (student {s}, teacher {t})")
    return s, t


def boundary_loss(s, t, margin):
    """The AB margin loss summed over all elements (no batch division)."""
    return ((s + margin) ** 2 * ((s > -margin) & (t <= 0)) + (s - margin) ** 2 * ((s <= margin) & (t > 0))).sum()


def build(probe):
    s, t = _pairs(probe)
    return nn.ModuleList(
        nn.Sequential(conv(len(probe.student_shapes[a]) - 1, probe.student_shapes[a][0], probe.teacher_shapes[b][0]),
                      bn(len(probe.student_shapes[a]) - 1, probe.teacher_shapes[b][0]))
        for a, b in zip(s, t)
    )


def ab_term(step):
    s = pre_names(step.student.feats)
    t = pre_names(step.teacher.feats)
    n, total = len(s), 0
    for i, (conn, a, b) in enumerate(zip(step.modules, s, t)):
        f_s, f_t = match_size(conn(step.student.feats[a]), step.teacher.feats[b].detach().float())
        total = total + 2.0 ** (i - n + 1) * boundary_loss(f_s, f_t, step.hp.margin)
    return total / len(step.y) * 3 / 1000


def init_loss(step):
    return {"ab": step.hp.beta * ab_term(step)}


METHODS = [
    Method(
        name="ab",
        loss=ce_plus_optional_kd,
        description="activation boundaries: an init stage teaching the teacher's neuron on/off pattern, then CE",
        citation="Heo et al., AAAI 2019",
        taps=("stage[0-9]_pre", "stage[0-9][0-9]_pre"),
        check=_pairs,
        build=build,
        stages=lambda hp: [Stage("init", "ab_epochs", init_loss)],
        hparams=(
            HParam("ab_epochs", 3, "epochs of the AB init stage (reference 30 of 240; 0 skips it)", low=0, high=1000, space=(1, 10)),
            HParam("margin", 1.0, "margin m of the boundary loss", low=0.0, space=(0.1, 4.0), log=True),
            HParam("beta", 1.0, "weight of the AB term in the init stage", low=0.0, open_low=True, space=(0.1, 10.0), log=True),
            HParam("alpha", 0.0, "weight of an optional KD term in the main stage (reference: 0)", low=0.0, space=(0.0, 1.0)),
            HParam("T", 4.0, "KD temperature (when alpha > 0)", low=0.0, open_low=True, space=(1.0, 20.0), log=True),
        ),
    )
]
