"""Feature taps read with forward hooks, so any model works unchanged."""
from __future__ import annotations

import fnmatch
from copy import deepcopy
from collections.abc import Iterable, Sequence
from types import SimpleNamespace

import torch
from torch import nn

from kdbench.contracts import Method, Outputs, Tap
from kdbench.errors import KdbenchError


def expand(patterns: Iterable[str], available: Sequence[str]) -> list[str]:
    """Tap names matching ``patterns`` in the model's declared order, each once.

    A plain name must exist; an fnmatch pattern (``*?[``) may match nothing, but all of them
    together must match something."""
    out: list[str] = []
    patterns = list(patterns)
    for pattern in patterns:
        hits = [n for n in available if fnmatch.fnmatchcase(n, pattern)]
        if not hits and not any(ch in pattern for ch in "*?["):
            raise KdbenchError(f"the model has no tap {pattern!r} (it has: {', '.join(available) or 'none'})")
        out += [h for h in hits if h not in out]
    if patterns and not out:
        raise KdbenchError(
            f"the model has no tap matching {patterns} (it has: {', '.join(available) or 'none'})"
        )
    return [n for n in available if n in out]


def wanted_taps(method: Method, hp: SimpleNamespace, student_taps: list[str],
                teacher_taps: list[str] | None) -> tuple[list[str], list[str]]:
    """The taps ``method`` reads on the student and on the teacher, given the taps each model
    offers (``teacher_taps`` None: the run has no teacher, and the teacher list is empty).

    ``Method.taps`` is either patterns (expanded on each model by :func:`expand`) or a function
    ``(hp, student_taps, teacher_taps) -> names`` whose names apply to both networks."""
    if callable(method.taps):
        names = list(method.taps(hp, student_taps, teacher_taps))
        return names, (names if teacher_taps is not None else [])
    student = expand(method.taps, student_taps)
    return student, (expand(method.taps, teacher_taps) if teacher_taps is not None else [])


class Tapped(nn.Module):
    """Wraps a model: ``forward(x) -> Outputs`` with the requested taps filled in by hooks."""

    def __init__(self, model: nn.Module, taps: dict[str, Tap], wanted: Sequence[str], owner: str):
        super().__init__()
        self.model = model
        self.taps, self.owner = dict(taps), owner
        self.wanted = list(wanted)
        self._store: dict[str, torch.Tensor] = {}
        self._handles = []
        self.weights: dict[str, torch.Tensor] | None = None  # see use_weights
        self.inference: Tapped | None = None  # see use_inference
        for name in self.wanted:
            if name not in taps:
                raise KdbenchError(
                    f"{owner} has no tap {name!r} (it has: {', '.join(taps) or 'none'})"
                )
        self._attach()

    def _attach(self) -> None:
        modules = dict(self.model.named_modules())
        for name in self.wanted:
            tap = self.taps[name]
            if tap.module not in modules:
                raise KdbenchError(
                    f"{self.owner} declares tap {name!r} on module {tap.module!r}, which it does not have"
                )
            module = modules[tap.module]
            if tap.input:
                # A pre-hook sees the input before an in-place op (ReLU(inplace=True)) overwrites it.
                copy = bool(getattr(module, "inplace", False))
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name, copy)))
            else:
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _pre_hook(self, name: str, copy: bool):
        def hook(_module, args):
            self._store[name] = args[0].clone() if copy else args[0]

        return hook

    def _hook(self, name: str):
        def hook(_module, _args, output):
            self._store[name] = output

        return hook

    def use_weights(self, weights: dict[str, torch.Tensor] | None) -> None:
        """Run the model with these tensors in place of its own parameters of the same names
        (:func:`torch.func.functional_call`; the model itself is left as it is) — e.g. a frozen
        teacher's weights held in bf16 (:func:`kdbench.core.precision.bf16_weights`) — or, with
        None, with its own again."""
        self.weights = weights

    def copy_model(self) -> nn.Module:
        """A deep copy of the model without this wrapper's hooks (e.g. to fuse it)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        try:
            return deepcopy(self.model)
        finally:
            self._attach()

    def use_inference(self, tapped: Tapped | None) -> None:
        """Run ``tapped`` — an inference form of the model with the same taps, e.g. a frozen
        teacher fused (``Model.fuse``) — for every call without gradients, and the model itself
        for calls with them (a loss differentiating through the teacher); None: the model always.
        Not a submodule: its buffers are its own, outside this module's state and parameters."""
        object.__setattr__(self, "inference", tapped)

    def forward(self, x: torch.Tensor) -> Outputs:
        if self.inference is not None and not torch.is_grad_enabled():
            return self.inference(x)
        self._store = {}
        logits = self.model(x) if self.weights is None else torch.func.functional_call(self.model, self.weights, (x,))
        feats = {name: self._store[name] for name in self.wanted}
        self._store = {}
        return Outputs(logits, feats)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.weights = None
        if self.inference is not None:
            self.inference.remove()
            self.use_inference(None)
