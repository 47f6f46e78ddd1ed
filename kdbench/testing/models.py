"""``check_model``: a model builds for the input shapes it serves, its taps follow the convention
and fire, forward and backward passes reach every parameter, and building is deterministic."""
from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch
from torch import nn

from kdbench.contracts import Model
from kdbench.core import engine, metrics, plugins
from kdbench.core.taps import Tapped
from kdbench.errors import KdbenchError
from kdbench.testing.common import Fail, find_registered, single_threaded

_TAP_NAME = re.compile(r"^(stem|stage\d+|stage\d+_pre|pool)$")
#: Samples in the random batch each built network is checked on.
_BATCH = 4


@single_threaded
def check_model(
    name: str | Model,
    *,
    input_shapes: Sequence[Sequence[int]] | None = None,
    num_classes: int = 10,
    require_taps: Sequence[str] = ("stage1", "pool"),
    seed: int = 0,
) -> None:
    """Check a model's contract; raise AssertionError saying what to fix.

    ``input_shapes`` (per sample, e.g. ``[(1, 40), (3, 32, 32)]``): shapes the model must build
    for. Default: the input shape of every registered dataset — the model must build for at least
    one and refuse the others with :class:`KdbenchError`. For each shape: logits ``[B,
    num_classes]``; every tap names a module of the built network and fires in a forward pass
    (read by forward hooks through :class:`kdbench.core.taps.Tapped`); tap names follow the convention
    (``stem``, ``stage1..N`` numbered without gaps, ``stageK_pre``, ``pool`` a ``[B, D]`` vector)
    and include ``require_taps``; forward/backward give every parameter a finite gradient;
    building is deterministic under a seed; FLOPs are countable; a ``fuse`` (the inference form of a
    frozen teacher) gives the eval-mode network's logits and the taps it keeps in float32.
    """
    reg = plugins.registry()
    model = name if isinstance(name, Model) else find_registered(reg, "models", name)
    fail = Fail(f"model {model.name!r}")
    fail.require(isinstance(model, Model), f"registered {type(model).__name__}, expected kdbench.contracts.Model")
    fail.require(callable(model.build), "build is not callable — give build=(num_classes, input_shape, **kwargs) -> nn.Module")
    explicit = input_shapes is not None
    shapes = [tuple(shape) for shape in input_shapes] if explicit else _dataset_shapes(reg)
    built = 0
    refused = []
    for shape in shapes:
        net, refusal = _build(fail, model, shape, num_classes, seed, explicit)
        if net is None:
            refused.append(refusal)
            continue
        _check_built(fail, model, net, shape, num_classes, require_taps, seed)
        built += 1
    fail.require(
        built > 0,
        f"builds for none of the input shapes {shapes} ({'; '.join(refused)}) — pass "
        "check_model(..., input_shapes=[...]) with the shapes it is meant for",
    )


def _dataset_shapes(reg: plugins.Registry) -> list[tuple]:
    """The input shape of every registered dataset, each once."""
    return sorted({tuple(entry.obj.input_shape) for entry in reg.datasets.values()})


def _build(fail: Fail, model: Model, shape, num_classes: int, seed: int, explicit: bool) -> tuple[nn.Module | None, str]:
    """(the network built for ``shape``, "") or, where the model refuses a shape it was not asked
    for explicitly, (None, "shape: why")."""
    torch.manual_seed(seed)
    try:
        net = model.make(num_classes, shape)
    except KdbenchError as exc:
        if explicit:
            raise fail(f"cannot be built for input {shape}: {exc}") from None
        return None, f"{shape}: {exc}"
    except Exception as exc:
        raise fail(
            f"build for input {shape} raised {type(exc).__name__}: {exc} — raise KdbenchError "
            "with a message for inputs the model cannot take"
        ) from exc
    fail.require(isinstance(net, nn.Module), f"build returned {type(net).__name__}, not an nn.Module")
    return net, ""


def _check_built(fail: Fail, model: Model, net: nn.Module, shape, num_classes: int, require_taps, seed: int) -> None:
    where = f"for input {shape}"
    taps = _check_taps(fail, model, net, where, require_taps)
    x = torch.randn((_BATCH, *shape), generator=torch.Generator().manual_seed(seed))
    _check_forward_backward(fail, model, net, taps, x, where, num_classes)
    _check_rebuilt(fail, model, shape, num_classes, seed, x, where)
    _check_fused(fail, model, net, taps, shape, where)


def _check_fused(fail: Fail, model: Model, net: nn.Module, taps: dict, shape, where: str) -> None:
    """``Model.fuse`` on an eval-mode copy: the original's logits and the taps it keeps, in float32,
    as the engine checks it before a run uses it (:func:`kdbench.core.engine.fusion_mismatch`)."""
    if model.fuse is None:
        return
    net.eval().requires_grad_(False)
    try:
        fused_net = model.fuse(copy.deepcopy(net), torch.float32)
    except Exception as exc:
        raise fail(f"fuse {where} raised {type(exc).__name__}: {exc}") from exc
    if fused_net is None:
        return
    fail.require(isinstance(fused_net, nn.Module), f"fuse {where} returned {type(fused_net).__name__}, not an nn.Module or None")
    modules = dict(fused_net.named_modules())
    kept = [name for name, tap in taps.items() if tap.module in modules]
    original = Tapped(net, taps, kept, f"model {model.name!r}")
    fused = Tapped(fused_net, taps, kept, f"model {model.name!r} fused")
    problem = engine.fusion_mismatch(original, fused, shape, torch.device("cpu"), "fp32")
    original.remove()
    fused.remove()
    fail.require(not problem, f"fuse {where}: {problem} — a fused network must compute the original's logits, "
                              "and its taps must read what the original's read (or name a module it no longer has)")


def _check_taps(fail: Fail, model: Model, net: nn.Module, where: str, require_taps) -> dict:
    """The model's taps on ``net``: each names one of its modules, and the names follow the convention."""
    try:
        taps = model.taps_of(net)
    except Exception as exc:
        raise fail(f"taps {where} raised {type(exc).__name__}: {exc}") from exc
    modules = dict(net.named_modules())
    for tap_name, tap in taps.items():
        fail.require(
            tap.module in modules,
            f"tap {tap_name!r} names module {tap.module!r}, which the built network {where} does not have "
            f"(its modules: {', '.join(list(modules)[1:8])}, …) — use names from named_modules()",
        )
    odd = [tap_name for tap_name in taps if not _TAP_NAME.match(tap_name)]
    fail.require(not odd, f"tap names {odd} are not conventional — use stem, stage1..stageN, stageK_pre, pool")
    stages = sorted(int(tap_name[5:]) for tap_name in taps if re.fullmatch(r"stage\d+", tap_name))
    fail.require(stages == list(range(1, len(stages) + 1)), f"stage taps {['stage%d' % stage for stage in stages]} must be numbered 1..N without gaps")
    pres = [tap_name for tap_name in taps if tap_name.endswith("_pre")]
    orphan = [tap_name for tap_name in pres if tap_name[:-4] not in taps]
    fail.require(not orphan, f"taps {orphan} have no matching stage tap")
    missing = [tap_name for tap_name in require_taps if tap_name not in taps]
    fail.require(not missing, f"has no tap {missing} {where} — methods that read features ask for them (declare Tap(...) for them)")
    return taps


def _check_forward_backward(fail: Fail, model: Model, net: nn.Module, taps: dict, x: torch.Tensor, where: str, num_classes: int) -> None:
    """A tapped forward pass in train mode gives logits and features; backward reaches every parameter."""
    tapped = Tapped(net, taps, list(taps), f"model {model.name!r}")
    tapped.train()
    try:
        out = tapped(x)
    except Exception as exc:
        raise fail(f"forward {where} raised {type(exc).__name__}: {exc}") from exc
    _check_outputs(fail, out, where, num_classes)
    total = out.logits.float().pow(2).mean() + sum(feat.float().pow(2).mean() for feat in out.feats.values())
    total.backward()
    params = [(name, param) for name, param in net.named_parameters() if param.requires_grad]
    idle = [name for name, param in params if param.grad is None]
    fail.require(not idle, f"parameters {idle[:5]} {where} get no gradient from the logits or taps — remove unused layers (they inflate the parameter count)")
    bad = [name for name, param in params if not torch.isfinite(param.grad).all()]
    fail.require(not bad, f"non-finite gradients {where} in {bad[:3]}")
    tapped.remove()


def _check_outputs(fail: Fail, out, where: str, num_classes: int) -> None:
    fail.require(
        isinstance(out.logits, torch.Tensor) and tuple(out.logits.shape) == (_BATCH, num_classes),
        f"forward {where} must return logits of shape [batch, num_classes] = ({_BATCH}, {num_classes}), got "
        f"{getattr(out.logits, 'shape', type(out.logits).__name__)}",
    )
    for tap_name, feat in out.feats.items():
        fail.require(isinstance(feat, torch.Tensor), f"tap {tap_name!r} {where} read a {type(feat).__name__}, not a tensor — tap a module that outputs one tensor")
        fail.require(feat.shape[0] == _BATCH, f"tap {tap_name!r} {where} has shape {tuple(feat.shape)}: the batch axis must come first")
    if "pool" in out.feats:
        fail.require(out.feats["pool"].dim() == 2, f"tap 'pool' {where} must be a [batch, features] vector, got {tuple(out.feats['pool'].shape)}")


def _check_rebuilt(fail: Fail, model: Model, shape, num_classes: int, seed: int, x: torch.Tensor, where: str) -> None:
    """Two builds under one seed are equal; a build's FLOPs count; it runs one sample in eval mode."""
    torch.manual_seed(seed)
    again = model.make(num_classes, shape)
    torch.manual_seed(seed)
    twice = model.make(num_classes, shape)
    first, second = again.state_dict(), twice.state_dict()
    same = first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    fail.require(same, f"two builds {where} under the same seed differ — initialise with torch's RNG (seeded by the harness)")
    try:
        flops = metrics.flops_per_sample(again, shape)
    except Exception as exc:
        raise fail(f"FLOPs {where} cannot be counted by torch.utils.flop_counter: {type(exc).__name__}: {exc}") from exc
    fail.require(flops > 0, f"FLOPs {where} counted as {flops} — the forward must run torch ops on its input")
    again.eval()
    with torch.no_grad():
        single = again(x[:1])
    single = single.logits if hasattr(single, "logits") else single
    fail.require(tuple(single.shape) == (1, num_classes), f"eval-mode forward of one sample {where} gives {tuple(single.shape)}")
