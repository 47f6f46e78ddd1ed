"""Numeric precision of a run: networks under autocast, every loss term in float32.

``bf16``: the networks (teachers, student, peers, evaluation) run under bfloat16 autocast — on
CUDA, and on the CPU through CPU autocast so that CI exercises the same code path. ``fp32``: no
autocast at all. Either way a method's loss sees float32 tensors with autocast *off*: the logits
and taps are cast once, at the boundary between the networks and the loss
(:func:`float32_outputs`), and the loss runs inside :func:`loss_region`. Gram matrices,
similarities and softmaxes of the losses (PKT, RKD, SP, …) are then never computed in bf16.

The default is ``bf16`` on CUDA and ``fp32`` elsewhere (:func:`default_precision`). A run at its
device's default precision keeps the config hash it had before precision was an option.
"""
from __future__ import annotations

import contextlib

import torch

from kdbench.contracts import Outputs
from kdbench.errors import KdbenchError

PRECISIONS = ("bf16", "fp32")


def check_precision(name: str | None) -> str | None:
    """``name`` if it is a precision (or None: the device's default); else a one-line error."""
    if name is None or name in PRECISIONS:
        return name
    raise KdbenchError(f"unknown precision {name!r}; choose one of: {', '.join(PRECISIONS)}")


def default_precision(device: torch.device | str | None) -> str:
    """``bf16`` on CUDA, ``fp32`` elsewhere; ``device`` None or "auto" means the one a run picks."""
    if device in (None, "", "auto"):
        return "bf16" if torch.cuda.is_available() else "fp32"
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return "bf16" if kind == "cuda" else "fp32"


def resolve_precision(name: str | None, device: torch.device | str | None) -> str:
    """The precision a run uses: ``name``, or the device's default when None."""
    return check_precision(name) or default_precision(device)


def non_default(name: str | None, device: torch.device | str | None) -> str | None:
    """``name`` when it differs from ``device``'s default, else None (what a config hash keeps)."""
    name = check_precision(name)
    return None if name is None or name == default_precision(device) else name


def autocast(device: torch.device, precision: str, cache: bool = True):
    """The networks' region: bf16 autocast on ``device`` under ``bf16``; a no-op under ``fp32``
    (no autocast state is toggled per step). ``cache=False`` for a step captured as a CUDA graph
    (autocast's weight-cast cache must not outlive the capture)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    if not cache:
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def loss_region(device: torch.device, precision: str):
    """The loss's region: autocast off (only needed when the networks ran under it)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _f32(t):
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def float32_outputs(out: Outputs | None) -> Outputs | None:
    """``out`` with its logits and taps in float32 (the same tensors when they already are)."""
    if out is None:
        return None
    return Outputs(_f32(out.logits), {k: _f32(v) for k, v in out.feats.items()})
