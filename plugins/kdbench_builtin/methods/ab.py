"""ab: Heo et al. 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons".
Settings against the reference code: docs/FIDELITY.md.

Init stage (``ab_epochs``: 30 of a 240-epoch run, scaled to the recipe) only: each student pre-ReLU
stage map s goes through a connector as RepDistiller's (``models/util.py`` Connector): the identity
where the student map already has the teacher map's shape, else a conv (with bias) + BN regressor
(:func:`kdbench.losses.conv_regressor` without ReLU); with t the teacher's pre-ReLU map and margin m,
  ℓ = Σ (s + m)²·[s > −m ∧ t ≤ 0] + (s − m)²·[s ≤ m ∧ t > 0]
per stage, weighted 2^(i−n) (deepest 1), divided by the batch size and scaled by 3/1000 as in
RepDistiller. Main stage: CE (RepDistiller runs AB with -a 0, so no KD), plus ``alpha``·KD if set.
"""
from torch import nn

from kdbench.contracts import HParam, Method, Stage
from kdbench.errors import KdbenchError
from kdbench.losses import ce_plus_optional_kd, conv_regressor, frozen, match_size

#: RepDistiller's run length, in which ``ab_epochs`` is given
REF_EPOCHS = 240


def pre_names(names):
    return [n for n in names if n.startswith("stage") and n.endswith("_pre") and n[5:-4].isdigit()]


def _pairs(probe):
    s_names, t_names = pre_names(probe.student_shapes), pre_names(probe.teacher_shapes)
    if not s_names or len(s_names) != len(t_names):
        raise KdbenchError(f"ab needs the same number (>= 1) of pre-ReLU stage taps on both networks "
                           f"(student {s_names}, teacher {t_names})")
    return s_names, t_names


def boundary_loss(f_s, f_t, margin):
    """The AB margin loss summed over all elements (no batch division)."""
    return ((f_s + margin) ** 2 * ((f_s > -margin) & (f_t <= 0))
            + (f_s - margin) ** 2 * ((f_s <= margin) & (f_t > 0))).sum()


def connector(s_shape, t_shape):
    """The identity where the shapes match, else conv (bias) + BN to the teacher's shape."""
    if tuple(s_shape) == tuple(t_shape):
        return nn.Identity()
    return conv_regressor(s_shape, t_shape, relu=False)


def build(probe):
    s_names, t_names = _pairs(probe)
    return nn.ModuleList(connector(probe.student_shapes[s_name], probe.teacher_shapes[t_name])
                         for s_name, t_name in zip(s_names, t_names))


def ab_term(step):
    s_names, t_names = pre_names(step.student.feats), pre_names(step.teacher.feats)
    n, total = len(s_names), 0
    for i, (conn, s_name, t_name) in enumerate(zip(step.modules, s_names, t_names)):
        f_s, f_t = match_size(conn(step.student.feats[s_name]), frozen(step.teacher.feats[t_name]))
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
        stages=lambda hp: [Stage("init", "ab_epochs", init_loss, ref_epochs=REF_EPOCHS)],
        hparams=(
            HParam("ab_epochs", 30, f"epochs of the AB init stage in a {REF_EPOCHS}-epoch run (scaled to the recipe; "
                   "a value set explicitly is used as is; 0 skips it)", low=0, high=1000, space=(1, 60)),
            HParam("margin", 1.0, "margin m of the boundary loss", low=0.0, space=(0.1, 4.0), log=True),
            HParam("beta", 1.0, "weight of the AB term in the init stage", low=0.0, open_low=True, space=(0.1, 10.0), log=True),
            HParam("alpha", 0.0, "weight of an optional KD term in the main stage (reference: 0)", low=0.0, space=(0.0, 1.0)),
            HParam("T", 4.0, "KD temperature (when alpha > 0)", low=0.0, open_low=True, space=(1.0, 20.0), log=True),
        ),
    )
]
