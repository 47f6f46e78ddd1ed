"""Helpers shared by the methods-b plugins (not a method: the leading underscore keeps it unregistered).

Feature maps are [B, C, L] (1-D) or [B, C, H, W] (2-D); ``dims`` is the number of spatial axes.
"""
import math
import re

import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError

_STAGE = re.compile(r"stage(\d+)$")
STAGE_TAPS = ("stage[0-9]", "stage[0-9][0-9]")


def stage_names(names):
    """The ``stageN`` names among ``names``, shallow to deep (``stage10`` after ``stage9``)."""
    return sorted((n for n in names if _STAGE.match(n)), key=lambda n: int(_STAGE.match(n).group(1)))


def conv(dims, c_in, c_out, k=1, stride=1, padding=0, bias=False):
    return (nn.Conv1d if dims == 1 else nn.Conv2d)(c_in, c_out, k, stride, padding, bias=bias)


def bn(dims, c):
    return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(c)


def adaptive_pool(f, size):
    return (F.adaptive_avg_pool1d if f.dim() == 3 else F.adaptive_avg_pool2d)(f, size)


def flat(f):
    """A tap as [B, D] (a pooled vector stays; a map is flattened)."""
    return f.float().flatten(1)


def set_identity(module):
    """Make a 1×1 conv (C_in == C_out) the identity map; used by tests and connectors."""
    w = module.weight.data
    w.zero_()
    for c in range(min(w.shape[0], w.shape[1])):
        w[(c, c) + (0,) * (w.dim() - 2)] = 1.0
    if module.bias is not None:
        module.bias.data.zero_()


def need_stages(probe, method, at_least=1):
    s, t = stage_names(probe.student_shapes), stage_names(probe.teacher_shapes)
    if len(s) < at_least or len(t) < at_least:
        raise KdbenchError(f"{method} needs >= {at_least} stage taps on both networks (student {s}, teacher {t})")
    return s, t


def same_stage_count(probe, method):
    s, t = need_stages(probe, method)
    if len(s) != len(t):
        raise KdbenchError(f"{method} pairs stages one to one: the student has {len(s)} ({s}), the teacher {len(t)} ({t})")
    return s, t


def spatial_ratio(s_size, t_size):
    """Integer per-axis ratio r with s = r·t (>1: the student map is larger), 1/r when smaller,
    or None when the sizes are not integer multiples on every axis in the same direction."""
    if tuple(s_size) == tuple(t_size):
        return 1
    if all(s % t == 0 for s, t in zip(s_size, t_size)):
        r = {s // t for s, t in zip(s_size, t_size)}
        return r.pop() if len(r) == 1 else None
    if all(t % s == 0 for s, t in zip(s_size, t_size)):
        r = {t // s for s, t in zip(s_size, t_size)}
        return 1 / r.pop() if len(r) == 1 else None
    return None


def prod(xs):
    return math.prod(xs)
