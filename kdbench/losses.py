"""Loss pieces for distillation methods (public API): the built-in methods are made of these, and a
plugin's method may use them too.

* logits: :func:`kd_term` (Hinton's KD term), :func:`hinton_kd`, :func:`ce_plus_optional_kd`,
  :func:`ce` with its :func:`ce_weight` hyperparameter;
* tensors: :func:`frozen` (a teacher tensor as a constant), :func:`as_vectors`;
* feature maps: :func:`attention`, :func:`match_size`, :func:`adaptive_pool`;
* stages: :data:`STAGE_TAPS`, :func:`stage_names`, :func:`stage_outputs`;
* pair checks, for a ``Method.check``: :func:`check_stages`, :func:`check_pool`,
  :func:`check_classes` (each raises a one-line :class:`~kdbench.errors.KdbenchError` naming the
  method);
* connectors (the method's extra modules): :func:`conv`, :func:`batch_norm`,
  :func:`conv_regressor` (RepDistiller's ConvReg), :func:`spatial_ratio`, :func:`set_identity`.

Conventions: ``z`` are logits [B, classes]; a feature map is [B, C, L] (1-D) or [B, C, H, W]
(2-D) and ``dims`` is its number of spatial axes; ``step`` is a :class:`kdbench.contracts.Step`,
``probe`` a :class:`kdbench.contracts.Probe`.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.contracts import HParam
from kdbench.errors import KdbenchError

__all__ = [
    "ATTENTION_MAPPINGS", "STAGE_TAPS", "adaptive_pool", "as_vectors", "attention", "batch_norm", "ce",
    "ce_plus_optional_kd", "ce_weight", "check_classes", "check_pool", "check_stages", "conv", "conv_regressor",
    "frozen",
    "hinton_kd", "kd_term", "match_size", "set_identity", "spatial_ratio", "stage_names", "stage_outputs",
]

# --------------------------------------------------------------------------- logits


def kd_term(z_s: torch.Tensor, z_t: torch.Tensor, T: float, per_sample: bool = False) -> torch.Tensor:
    """Hinton's KD term T²·KL(p_t ‖ p_s) with p = softmax(z/T), summed over classes and averaged
    over the batch (a scalar), or one value per sample ([B]) when ``per_sample``. Pass the
    teacher's logits through :func:`frozen`."""
    log_p_s = F.log_softmax(z_s / T, dim=1)
    log_p_t = F.log_softmax(z_t / T, dim=1)
    if per_sample:
        return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1) * T * T
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T


def hinton_kd(step) -> dict[str, torch.Tensor]:
    """Hinton KD: ``{"ce": (1 − hp.alpha)·CE(z_s, y), "kd": hp.alpha·kd_term(z_s, z_t, hp.T)}``."""
    hp = step.hp
    return {
        "ce": (1 - hp.alpha) * F.cross_entropy(step.student.logits, step.y),
        "kd": hp.alpha * kd_term(step.student.logits, frozen(step.teacher.logits), hp.T),
    }


def ce_plus_optional_kd(step, **terms: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"ce": CE(z_s, y), **terms, "kd": hp.alpha·kd_term(z_s, z_t, hp.T)}``, the KD term only when
    ``hp.alpha > 0``: the loss of a method whose own terms (``terms``, already weighted) come with
    plain cross-entropy and an optional KD term. Alone (no ``terms``) it is the main-stage loss of a
    method that distils in a pre-stage only."""
    hp = step.hp
    out = {"ce": F.cross_entropy(step.student.logits, step.y), **terms}
    if hp.alpha > 0:
        out["kd"] = hp.alpha * kd_term(step.student.logits, frozen(step.teacher.logits), hp.T)
    return out


def ce(step) -> torch.Tensor:
    """Cross-entropy on the labels weighted by ``hp.ce_weight`` (declare it with :func:`ce_weight`)."""
    return step.hp.ce_weight * F.cross_entropy(step.student.logits, step.y)


def ce_weight(default: float = 1.0) -> HParam:
    """The ``ce_weight`` hyperparameter read by :func:`ce` (not tuned)."""
    return HParam("ce_weight", default, "weight of cross-entropy on the labels", low=0.0, tune=False)


# --------------------------------------------------------------------------- tensors


def frozen(f: torch.Tensor) -> torch.Tensor:
    """A tensor as a float32 constant: how a loss reads a teacher's outputs (a teacher may run in
    bf16), so that no gradient ever flows into the teacher."""
    return f.detach().float()


def as_vectors(f: torch.Tensor) -> torch.Tensor:
    """One float32 vector per sample: [B, *] → [B, D] (a pooled vector stays, a map is flattened)."""
    return f.float().flatten(1)


# --------------------------------------------------------------------------- feature maps

#: The channel mappings of :func:`attention`.
ATTENTION_MAPPINGS = ("mean_p", "sum_abs", "sum_p", "max_p")


def attention(f: torch.Tensor, p: float, mapping: str = "mean_p") -> torch.Tensor:
    """Spatial attention map of a feature map (Zagoruyko & Komodakis 2017): the channels reduced by
    ``mapping`` — mean_p = mean_c |f|^p, sum_abs = Σ_c |f|, sum_p = Σ_c |f|^p, max_p = max_c |f|^p —
    then flattened and L2-normalised: [B, C, *spatial] → [B, prod(spatial)]."""
    if mapping == "mean_p":
        a = f.abs().pow(p).mean(1)
    elif mapping == "sum_abs":
        a = f.abs().sum(1)
    elif mapping == "sum_p":
        a = f.abs().pow(p).sum(1)
    elif mapping == "max_p":
        a = f.abs().pow(p).amax(1)
    else:
        raise KdbenchError(f"unknown attention mapping {mapping!r} (one of {', '.join(ATTENTION_MAPPINGS)})")
    return F.normalize(a.flatten(1), dim=1)


def adaptive_pool(f: torch.Tensor, size) -> torch.Tensor:
    """Adaptive average pooling of a 1-D or 2-D feature map to spatial ``size``."""
    return (F.adaptive_avg_pool1d if f.dim() == 3 else F.adaptive_avg_pool2d)(f, size)


def match_size(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two feature maps at one spatial size: the larger is average-pooled to the other's."""
    if a.shape[2:] == b.shape[2:]:
        return a, b
    if a.shape[2:].numel() > b.shape[2:].numel():
        return adaptive_pool(a, b.shape[2:]), b
    return a, adaptive_pool(b, a.shape[2:])


# --------------------------------------------------------------------------- stages

#: ``Method.taps`` for every stage output ``stage1`` … ``stage99``.
STAGE_TAPS = ("stage[0-9]", "stage[0-9][0-9]")
_STAGE = re.compile(r"stage(\d+)$")


def stage_names(names) -> list[str]:
    """The ``stageN`` names among ``names``, shallow to deep (by N: ``stage10`` after ``stage9``)."""
    hits = [(int(match.group(1)), n) for n in names if (match := _STAGE.match(n))]
    return [n for _, n in sorted(hits)]


def stage_outputs(feats) -> list[torch.Tensor]:
    """The stage outputs of an ``Outputs.feats`` dict, shallow to deep."""
    return [feats[n] for n in stage_names(feats)]


# --------------------------------------------------------------------------- pair checks


def check_stages(probe, method: str, minimum: int = 1, equal: bool = True) -> tuple[list[str], list[str]]:
    """Refuse a pair with fewer than ``minimum`` stage taps on either network or, when ``equal``
    (stages paired one to one), with different stage counts. Returns the (student, teacher) stage
    names, shallow to deep."""
    s_names, t_names = stage_names(probe.student_shapes), stage_names(probe.teacher_shapes)
    if len(s_names) < minimum or len(t_names) < minimum:
        raise KdbenchError(f"{method} needs at least {minimum} stage tap(s) on each network: "
                           f"student has {s_names}, teacher {t_names}")
    if equal and len(s_names) != len(t_names):
        raise KdbenchError(f"{method} pairs stages one to one: the student has {len(s_names)} ({s_names}), "
                           f"the teacher {len(t_names)} ({t_names})")
    return s_names, t_names


def check_pool(probe, method: str) -> None:
    """Refuse a pair unless both networks offer the ``pool`` tap (the pooled feature vector)."""
    for who, taps in (("student", probe.student_taps), ("teacher", probe.teacher_taps)):
        if "pool" not in taps:
            raise KdbenchError(f"{method} needs the 'pool' tap (the pooled feature vector), which the {who} does not provide")


def check_classes(probe, method: str, minimum: int = 2) -> None:
    """Refuse a dataset with fewer than ``minimum`` classes."""
    if probe.num_classes < minimum:
        raise KdbenchError(f"{method} needs at least {minimum} classes, the dataset has {probe.num_classes}")


# --------------------------------------------------------------------------- connectors


def conv(dims: int, c_in: int, c_out: int, k: int = 1, stride: int = 1, padding: int = 0, bias: bool = False) -> nn.Module:
    """A ``dims``-D convolution (Conv1d or Conv2d), 1×1 and bias-free by default."""
    return (nn.Conv1d if dims == 1 else nn.Conv2d)(c_in, c_out, k, stride, padding, bias=bias)


def batch_norm(dims: int, c: int) -> nn.Module:
    """A ``dims``-D BatchNorm (BatchNorm1d or BatchNorm2d) over ``c`` channels."""
    return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(c)


def spatial_ratio(s_size, t_size):
    """Integer per-axis ratio r with s = r·t (>1: the student map is larger), 1/r when smaller,
    or None when the sizes are not integer multiples on every axis in the same direction."""
    if tuple(s_size) == tuple(t_size):
        return 1
    pairs = list(zip(s_size, t_size))
    if all(s_len % t_len == 0 for s_len, t_len in pairs):
        ratios = {s_len // t_len for s_len, t_len in pairs}
        return ratios.pop() if len(ratios) == 1 else None
    if all(t_len % s_len == 0 for s_len, t_len in pairs):
        ratios = {t_len // s_len for s_len, t_len in pairs}
        return 1 / ratios.pop() if len(ratios) == 1 else None
    return None


def set_identity(module: nn.Module) -> None:
    """Set a convolution to pass channel c to channel c (weight 1 at kernel position 0, all else and
    the bias 0): for a 1×1 conv with C_in == C_out, the identity map. For tests and initialisation."""
    w = module.weight.data
    w.zero_()
    for c in range(min(w.shape[0], w.shape[1])):
        w[(c, c) + (0,) * (w.dim() - 2)] = 1.0
    if module.bias is not None:
        module.bias.data.zero_()


def conv_regressor(s_shape, t_shape, relu: bool = True) -> nn.Module:
    """RepDistiller's convolutional regressor (``models/util.py`` ConvReg) from a student map of
    per-sample shape ``s_shape`` [C_s, *spatial] to the teacher's ``t_shape``: a conv with bias, then
    BN (then ReLU when ``relu``). Same size: 1×1; student 2× larger: 3×3 stride 2 (padding 1);
    2× smaller: 4×4 stride-2 transposed conv (padding 1); otherwise larger: a valid conv of kernel
    1 + s − t per axis; r× smaller (integer r ≠ 2, a kdbench extension): an r×r stride-r transposed
    conv. Raises :class:`KdbenchError` for any other pair of sizes."""
    dims = len(s_shape) - 1
    c_s, c_t = s_shape[0], t_shape[0]
    s_size, t_size = tuple(s_shape[1:]), tuple(t_shape[1:])
    conv_cls = nn.Conv1d if dims == 1 else nn.Conv2d
    transposed = nn.ConvTranspose1d if dims == 1 else nn.ConvTranspose2d
    ratio = spatial_ratio(s_size, t_size)
    if s_size == t_size:
        layer = conv_cls(c_s, c_t, 1)
    elif ratio == 2:
        layer = conv_cls(c_s, c_t, 3, 2, 1)
    elif ratio == 0.5:
        layer = transposed(c_s, c_t, 4, 2, 1)
    elif all(s >= t for s, t in zip(s_size, t_size)):
        layer = conv_cls(c_s, c_t, tuple(1 + s - t for s, t in zip(s_size, t_size)))
    elif ratio is not None and ratio < 1:
        k = round(1 / ratio)
        layer = transposed(c_s, c_t, k, k)
    else:
        raise KdbenchError(f"no regressor maps a {tuple(s_shape)} student map onto a {tuple(t_shape)} teacher map")
    return nn.Sequential(layer, batch_norm(dims, c_t), *([nn.ReLU()] if relu else []))
