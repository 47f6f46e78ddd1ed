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
from torch import nn

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


#: the layers whose weight and bias bf16 autocast casts whole at every call (CPU and CUDA: their
#: standard forwards call conv*/conv_transpose*/linear, which autocast runs in bf16)
_CAST_WHOLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
               nn.Linear)


def cast_weights(net: nn.Module) -> dict[str, nn.Parameter]:
    """The float32 parameters of ``net`` that bf16 autocast casts whole at every call — the weight
    and bias of its convolutions and linear layers — by name. A layer may use its weight otherwise,
    and is left out, when its class has a ``forward`` or ``_conv_forward`` of its own (weight
    standardisation, …) or its weight is not a plain parameter (a parametrization, the older
    weight norm). A parameter shared by several layers is named once, by its first (what
    :func:`torch.func.functional_call` needs to keep it tied)."""
    out: dict[str, nn.Parameter] = {}
    for name, module in net.named_modules():
        base = next((cls for cls in _CAST_WHOLE if isinstance(module, cls)), None)
        if base is None or any(getattr(type(module), fn, None) is not getattr(base, fn, None)
                               for fn in ("forward", "_conv_forward")) \
                or not isinstance(module._parameters.get("weight"), nn.Parameter):
            continue
        for key in ("weight", "bias"):
            tensor = module._parameters.get(key)
            if isinstance(tensor, nn.Parameter) and tensor.dtype == torch.float32 \
                    and all(tensor is not seen for seen in out.values()):
                out[f"{name}.{key}" if name else key] = tensor
    return out


def bf16_weights(net: nn.Module) -> dict[str, torch.Tensor]:
    """bf16 copies of a frozen network's weights that bf16 autocast would cast at every forward
    (:func:`cast_weights`), for :meth:`kdbench.core.taps.Tapped.use_weights`. Under bf16 autocast
    the network then gives the same outputs, bitwise (autocast's cast is the same rounding), with
    no cast per layer and call: about 35 kernels of a resnet32x4 forward's 153 on CUDA, each of
    them replayed at every step of a captured one."""
    return {name: p.detach().to(torch.bfloat16) for name, p in cast_weights(net).items()}


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
