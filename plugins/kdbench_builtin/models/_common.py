"""Shared helpers for the image models (a module starting with ``_`` is not scanned for MODELS)."""
from __future__ import annotations

from typing import Callable, Sequence

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
