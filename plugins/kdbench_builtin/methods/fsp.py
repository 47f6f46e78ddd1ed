"""fsp: Yim et al. 2017, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization
and Transfer Learning". Settings against the reference code: docs/FIDELITY.md.

G(f1, f2) = f1ᵀ·f2 / (spatial size), a [C1, C2] matrix per sample between consecutive maps of
[stem, stage1, …, stageN] (the stem where both networks offer it; the larger map pooled to the
smaller). As in RepDistiller (``helper/pretrain.py``, ``distiller_zoo/FSP.py``):

* init stage (``fsp_epochs``, 30 of a 240-epoch run, scaled to the recipe): the student minimises
  ``init_weight``·Σ_pairs MSE(G_s, G_t), the plain sum (init_weight 1);
* main stage: CE, plus ``beta``·(the same FSP sum) and ``alpha``·KD when set. RepDistiller's
  ``-b 50`` multiplies a main-stage term it sets to 0, so the reference main stage is CE alone:
  both default to 0 here.

FSP compares matrices, so each student map needs its teacher map's channels: where they match
the map is used as is; where they differ, with ``connector`` (default on, so pairs like the
embedded 16→32-channel one are served) a trainable 1×1 conv maps the student's channels to the
teacher's (RepDistiller refuses such pairs).
"""
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.contracts import Defaults, HParam, Method, Stage
from kdbench.errors import KdbenchError
from kdbench.losses import STAGE_TAPS, ce_plus_optional_kd, check_stages, conv, frozen, match_size, stage_names

#: RepDistiller's run length, in which ``fsp_epochs`` is given
REF_EPOCHS = 240


def fsp_matrix(f1, f2):
    f1, f2 = match_size(f1, f2)
    return torch.bmm(f1.flatten(2), f2.flatten(2).transpose(1, 2)) / f1.shape[2:].numel()


def map_names(s_names, t_names):
    """The paired maps, shallow to deep: the stem (when both have it), then the stages."""
    stem = ["stem"] if "stem" in s_names and "stem" in t_names else []
    return stem + stage_names(s_names), stem + stage_names(t_names)


def check(probe):
    check_stages(probe, "fsp", minimum=1 if "stem" in probe.student_shapes and "stem" in probe.teacher_shapes else 2)
    s_names, t_names = map_names(probe.student_shapes, probe.teacher_shapes)
    if not probe.hp.connector:
        for s_name, t_name in zip(s_names, t_names):
            if probe.student_shapes[s_name][0] != probe.teacher_shapes[t_name][0]:
                raise KdbenchError(
                    f"fsp needs equal channels: student {s_name} has {probe.student_shapes[s_name][0]}, teacher "
                    f"{t_name} {probe.teacher_shapes[t_name][0]}; set connector=true to add 1x1 connectors")


def build(probe):
    """1×1 connectors for the student maps whose channels differ from the teacher's (None if all match)."""
    if not probe.hp.connector:
        return None
    s_names, t_names = map_names(probe.student_shapes, probe.teacher_shapes)
    conns = {
        s_name: conv(len(probe.student_shapes[s_name]) - 1, probe.student_shapes[s_name][0],
                     probe.teacher_shapes[t_name][0])
        for s_name, t_name in zip(s_names, t_names)
        if probe.student_shapes[s_name][0] != probe.teacher_shapes[t_name][0]
    }
    return nn.ModuleDict(conns) if conns else None


def fsp_term(step):
    """Σ over consecutive map pairs of MSE(G_s, G_t) (unweighted)."""
    s_names, t_names = map_names(step.student.feats, step.teacher.feats)
    conns = step.modules if step.modules is not None else {}
    f_s = [conns[n](step.student.feats[n]) if n in conns else step.student.feats[n] for n in s_names]
    f_t = [frozen(step.teacher.feats[n]) for n in t_names]
    return sum(F.mse_loss(fsp_matrix(f_s[i], f_s[i + 1]), fsp_matrix(f_t[i], f_t[i + 1]))
               for i in range(len(f_s) - 1))


def init_loss(step):
    return {"fsp": step.hp.init_weight * fsp_term(step)}


def loss(step):
    terms = {"fsp": step.hp.beta * fsp_term(step)} if step.hp.beta > 0 else {}
    return ce_plus_optional_kd(step, **terms)


#: ShuffleNetV1 students of the CIFAR-100 suite: RepDistiller refuses FSP there (channel counts
#: differ); with kdbench's 1×1 connectors the unweighted init stage diverges at the reference lr
#: (resnet32x4 and wrn_40_2 teachers, lr 0.05: 8.5e8 and NaN within 6 steps), at weight 0.1 it
#: decreases and stays finite (docs/FIDELITY.md).
SHUFFLENETV1 = Defaults({"init_weight": 0.1}, dataset="cifar100", student="shufflenetv1",
                        source="kdbench: init weight 0.1 on ShuffleNetV1 students (the reference refuses the pair)")


METHODS = [
    Method(
        name="fsp",
        loss=loss,
        description="FSP: an init stage matching flow matrices between consecutive stages, then CE",
        citation="Yim et al., CVPR 2017",
        taps=("[s]tem",) + STAGE_TAPS,  # a pattern: the stem where a model offers it
        check=check,
        build=build,
        stages=lambda hp: [Stage("init", "fsp_epochs", init_loss, ref_epochs=REF_EPOCHS)],
        defaults_for=(SHUFFLENETV1,),
        hparams=(
            HParam("fsp_epochs", 30, f"epochs of the FSP init stage in a {REF_EPOCHS}-epoch run (scaled to the "
                   "recipe; a value set explicitly is used as is; 0 skips it)", low=0, high=1000, space=(1, 60)),
            HParam("init_weight", 1.0, "weight of the FSP sum in the init stage (RepDistiller: 1)", low=0.0,
                   open_low=True, space=(0.1, 100.0), log=True),
            HParam("beta", 0.0, "weight of the FSP sum in the main stage (RepDistiller: -b 50 on a zero term, i.e. 0)",
                   low=0.0, space=(0.0, 100.0)),
            HParam("connector", True, "1x1 connectors where channel counts differ (off: such pairs are refused)"),
            HParam("alpha", 0.0, "weight of an optional KD term in the main stage (reference: 0)", low=0.0, space=(0.0, 1.0)),
            HParam("T", 4.0, "KD temperature (when alpha > 0)", low=0.0, open_low=True, space=(1.0, 20.0), log=True),
        ),
    )
]
