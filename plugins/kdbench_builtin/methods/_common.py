"""Helpers shared by the built-in methods (a leading ``_`` keeps this module out of the registry)."""
import re

import torch.nn.functional as F

from kdbench.errors import KdbenchError

from .at import match_size  # noqa: F401  (re-exported: pool the larger map to the smaller)

STAGE_TAPS = ("stage[0-9]", "stage[0-9][0-9]")
_STAGE = re.compile(r"stage(\d+)$")


def stage_names(names):
    """The ``stageN`` names among ``names``, shallow to deep (by N, not by string order)."""
    hits = [(int(m.group(1)), n) for n in names if (m := _STAGE.match(n))]
    return [n for _, n in sorted(hits)]


def stages(feats):
    """Stage outputs of an Outputs.feats dict, shallow to deep."""
    return [feats[n] for n in stage_names(feats)]


def check_stages(probe, method, minimum=1, equal=True):
    s, t = stage_names(probe.student_shapes), stage_names(probe.teacher_shapes)
    if len(s) < minimum or len(t) < minimum:
        raise KdbenchError(
            f"{method} needs at least {minimum} stage tap(s) on each network: student has {s}, teacher {t}"
        )
    if equal and len(s) != len(t):
        raise KdbenchError(f"{method} pairs stages one to one: the student has {len(s)} ({s}), the teacher {len(t)} ({t})")
    return s, t


def check_pool(probe, method):
    for who, shapes in (("student", probe.student_shapes), ("teacher", probe.teacher_shapes)):
        if "pool" not in shapes:
            raise KdbenchError(f"{method} needs the 'pool' tap, which the {who} does not provide")


def check_classes(probe, method, minimum=2):
    if probe.num_classes < minimum:
        raise KdbenchError(f"{method} needs at least {minimum} classes, the dataset has {probe.num_classes}")


def ce(step):
    return step.hp.ce_weight * F.cross_entropy(step.student.logits, step.y)


def flat(f):
    """[B, *] → [B, D] in float32 (teacher features may be bf16)."""
    return f.float().flatten(1)


def tea(f):
    """A teacher tensor as a float32 constant: never a path for gradients into the teacher."""
    return f.detach().float()


def ce_weight(default=1.0):
    from kdbench.contracts import HParam

    return HParam("ce_weight", default, "weight of cross-entropy on the labels", low=0.0, tune=False)
