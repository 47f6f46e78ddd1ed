"""Shared helpers for the image models (a module starting with ``_`` is not scanned for MODELS)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

from kdbench.errors import KdbenchError


def check_image(name: str, input_shape: Sequence[int], ok: Callable[[int, int], bool], need: str) -> None:
    """Raise a one-line KdbenchError unless ``input_shape`` is ``(3, H, W)`` with ``ok(H, W)``."""
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[0] != 3 or not ok(shape[1], shape[2]):
        raise KdbenchError(f"model {name!r} takes {need} RGB images (3, H, W), not input shape {shape}")


def cifar_only(name: str, input_shape: Sequence[int]) -> None:
    check_image(name, input_shape, lambda h, w: h == w == 32, "32x32")


def stage_taps(prefix: str, count: int, first: int = 1) -> dict:
    """``stage1..stageN`` on modules ``prefix{first}..``."""
    from kdbench.contracts import Tap

    return {f"stage{i + 1}": Tap(f"{prefix}{first + i}") for i in range(count)}


def he_init(net: nn.Module, linear_std: float | None = 0.01) -> None:
    """The reference CIFAR initialisation: convs normal(0, sqrt(2 / (k·k·out))) with zero bias,
    BN weight 1 / bias 0, linear weights normal(0, ``linear_std``) (None: left at PyTorch's
    default) with zero bias. Modules are visited in ``modules()`` order, so draws match the reference."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


def kaiming_init(net: nn.Module) -> None:
    """The torchvision-style ResNet initialisation: convs Kaiming-normal (fan_out, relu), BN weight 1 /
    bias 0, linears left at PyTorch's default; modules visited in ``modules()`` order."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
