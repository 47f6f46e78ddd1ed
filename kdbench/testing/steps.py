"""``make_step``: a :class:`~kdbench.contracts.Step` for a method's own unit tests, without a
dataset, networks or a run."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from kdbench.contracts import Method, Outputs, Step, resolve_hparams
from kdbench.core import plugins
from kdbench.testing.common import find_registered


def make_step(
    method: Method | str | None = None,
    *,
    hp: Mapping[str, Any] | None = None,
    batch: int = 8,
    num_classes: int = 10,
    input_shape: Sequence[int] = (1, 40),
    feats: Mapping[str, Sequence[int]] | None = None,
    teacher_feats: Mapping[str, Sequence[int]] | None = None,
    teacher: bool = True,
    teachers: int = 0,
    modules: nn.Module | None = None,
    epoch: int = 0,
    epochs: int = 1,
    stage: str = "main",
    seed: int = 0,
) -> Step:
    """A Step of random tensors, shaped as the harness would pass them to ``method``'s loss.

    * ``method`` (a :class:`Method` or a registered name; ``DIST:NAME`` works): ``step.hp`` holds
      its defaults with ``hp`` on top, checked against its declaration; without a method,
      ``step.hp`` is just ``hp``.
    * the student's logits ``[batch, num_classes]`` and features (``feats``: tap name → per-sample
      shape, e.g. ``{"stage1": (32, 20)}``) are leaf tensors that require grad: after
      ``sum(loss(step).values()).backward()``, ``step.student.logits.grad`` shows what the loss
      trains; the teacher's (same taps and shapes unless ``teacher_feats`` is given) carry no
      graph, as the harness's frozen teacher. ``teacher=False``: ``step.teacher`` is None.
    * ``teachers``: that many extra teachers in ``step.teachers`` (for ``Method.uses_teachers``).
    * ``x`` is ``[batch, *input_shape]``, ``y`` labels in ``[0, num_classes)``, ``index`` the
      sample indices ``0 … batch-1``; ``modules``, ``epoch``, ``epochs``, ``stage`` as given.

    The values are drawn from a ``torch.Generator`` seeded with ``seed``: the same arguments give
    the same Step. ``student_net``/``teacher_net`` are None: a loss that re-runs the networks
    needs a real run (``check_method``)."""
    params = dict(hp or {})
    if method is not None:
        if isinstance(method, str):
            method = find_registered(plugins.registry(), "methods", method)
        params = resolve_hparams(method.hparams, params, f"method {method.name!r}")
    generator = torch.Generator().manual_seed(seed)
    feats = dict(feats or {})
    teacher_shapes = dict(feats if teacher_feats is None else teacher_feats)

    def draw(*shape) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    def outputs(shapes: Mapping[str, Sequence[int]], trainable: bool) -> Outputs:
        out = Outputs(draw(batch, num_classes), {name: draw(batch, *shape) for name, shape in shapes.items()})
        if trainable:
            out.logits.requires_grad_()
            for value in out.feats.values():
                value.requires_grad_()
        return out

    student = outputs(feats, trainable=True)
    main = outputs(teacher_shapes, trainable=False) if teacher else None
    extra = [outputs(teacher_shapes, trainable=False) for _ in range(teachers)] or None
    return Step(
        x=draw(batch, *input_shape),
        y=torch.randint(0, num_classes, (batch,), generator=generator),
        student=student, teacher=main, hp=SimpleNamespace(**params), modules=modules,
        epoch=epoch, epochs=epochs, stage=stage, index=torch.arange(batch), teachers=extra,
    )
