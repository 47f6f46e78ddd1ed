"""``check_method``: a method's declarations, its losses on real forward and backward passes, its
extra modules, and a short training run repeated under the same seed."""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from kdbench.contracts import Augment, Dataset, Method, Stage, Step
from kdbench.core import engine, plugins
from kdbench.core.plan import RunConfig, make_plan
from kdbench.errors import KdbenchError
from kdbench.testing.common import Fail, find_registered, single_threaded
from kdbench.testing.hparams import check_hparam, sample_hparams

#: Metrics that measure time or memory: excluded from the determinism comparison.
_UNSTABLE = re.compile(r"(seconds|throughput|peak_mem)")
#: Samples of the real batch each loss is checked on (fewer when the subset is smaller).
_BATCH = 64


@single_threaded
def check_method(
    name: str | Method,
    *,
    dataset: str | None = None,
    teacher: str | None = None,
    student: str | None = None,
    options: Mapping[str, Any] | None = None,
    hparams: Mapping[str, Any] | None = None,
    trials: int = 50,
    loss_trials: int = 3,
    samples: int = 512,
    seed: int = 0,
    run: bool = True,
) -> None:
    """Check a method's contract; raise AssertionError saying what to fix.

    ``name`` is a registered method name, ``DIST:NAME`` to insist that your distribution ``DIST``
    provides it (or a :class:`Method` not registered yet). It is checked
    on ``dataset``/``teacher``/``student`` (default: the embedded dataset and its default pair,
    MNIST-1D with cnn1d_4x32 → cnn1d_2x16), with an *untrained* teacher; ``options`` are the
    dataset's load options (e.g. ``{"data_dir": "~/data"}``, as ``--data-dir``):

    * declaration: every hyperparameter's default, valid range and search space; ``trials``
      Optuna trials sampled from the search space, each value checked;
    * losses (main and every stage) on real forward passes of a real batch, with the defaults
      and with ``loss_trials`` of the sampled settings: a dict of finite scalar terms whose sum
      is differentiable and sends finite gradients to the student;
    * the teacher gets no gradient and its weights and buffers never change;
    * extra modules from ``build``: their parameters are what ``params_extra`` counts, share
      nothing with the student or the teacher, and each receives a gradient in some stage; the
      loss uses no trainable tensor outside the student and these modules;
    * ``run``: a one-epoch run (plus the method's stages) on ``samples`` training samples through
      :func:`kdbench.core.engine.run_student`, twice with the same seed: metrics must be identical.
    """
    method, reg = _method_and_registry(name)
    fail = Fail(f"method {method.name!r}")
    _check_declaration(fail, method)
    sampled = sample_hparams(fail, method, trials, seed)

    def plan_for(setting: Mapping[str, Any]):
        config = RunConfig(method=name if isinstance(name, str) else method.name, dataset=dataset, teacher=teacher, student=student,
                           hparams=dict(setting), recipe={"epochs": 1}, seed=seed, device="cpu",
                           data_options=dict(options or {}))
        return _small_plan(fail, config, reg, samples)

    device = torch.device("cpu")
    base = dict(hparams or {})
    settings = [base] + [{**setting, **base} for setting in sampled[:loss_trials]]
    for i, setting in enumerate(settings):
        label = "the default hyperparameters" if i == 0 else f"sampled hyperparameters {setting}"
        _check_losses(fail, method, plan_for(setting), device, label)
    if run:
        _check_runs(fail, method, plan_for(base), device)


# --------------------------------------------------------------------------- declaration and plan


def _method_and_registry(name: str | Method) -> tuple[Method, plugins.Registry]:
    """The method to check and a registry that holds it (a :class:`Method` object is added)."""
    reg = plugins.registry()
    if not isinstance(name, Method):
        return find_registered(reg, "methods", name), reg
    entry = plugins.Entry(obj=name, plugin="-", dist="-", version="-")
    return name, dataclasses.replace(reg, methods={**reg.methods, name.name: entry})


def _check_declaration(fail: Fail, method: Method) -> None:
    fail.require(isinstance(method, Method), f"registered {type(method).__name__}, expected kdbench.contracts.Method")
    fail.require(callable(method.loss), "loss is not callable — give loss=a function of a kdbench.contracts.Step")
    names = [hparam.name for hparam in method.hparams]
    fail.require(len(set(names)) == len(names), f"duplicate hyperparameter names {names}")
    for hparam in method.hparams:
        check_hparam(fail, hparam)


def _small_plan(fail: Fail, config: RunConfig, reg: plugins.Registry, samples: int):
    """The run's plan, its dataset cut to ``samples`` training samples."""
    try:
        plan = make_plan(config, reg)
    except KdbenchError as exc:
        raise fail(f"cannot plan a run: {exc}") from None
    dataset_entry = dataclasses.replace(plan.dataset, obj=_subset(plan.dataset_obj, samples))
    return dataclasses.replace(plan, dataset=dataset_entry)


def _subset(dataset: Dataset, samples: int) -> Dataset:
    """The dataset with its first ``samples`` training (and a quarter as many val) samples."""
    load = dataset.load

    def small_load(split, **options):
        x, y = load(split, **options)
        count = samples if split == "train" else max(1, samples // 4)
        return x[:count], y[:count]

    return dataclasses.replace(dataset, load=small_load)


def _set_up(fail: Fail, method: Method, plan, device, label: str):
    """(teacher network or None, the student's setup, "teacher → student") for ``plan``."""
    teacher_net = engine.build_teacher(plan, device) if method.needs_teacher else None
    pair = f"{plan.teacher_obj.name if teacher_net is not None else '(no teacher)'} → {plan.student_obj.name}"
    try:
        setup = engine.setup_student(plan, teacher_net, device)
    except KdbenchError as exc:
        raise fail(f"cannot be set up on {plan.dataset_obj.name} {pair} with {label}: {exc}") from None
    except Exception as exc:
        raise fail(
            f"check/build/taps raised {type(exc).__name__}: {exc} on {plan.dataset_obj.name} {pair} "
            f"with {label} — raise KdbenchError with a message for pairs you cannot serve"
        ) from exc
    return teacher_net, setup, pair


def _state(net: nn.Module | None) -> dict:
    if net is None:
        return {}
    return {key: value.detach().clone() for key, value in net.state_dict().items()}


def _changed(net: nn.Module, before: dict) -> list[str]:
    """Names of the weights and buffers of ``net`` that differ from the ``before`` state."""
    return [key for key, value in _state(net).items() if not torch.equal(value, before[key])]


# --------------------------------------------------------------------------- extra modules


def _check_modules(fail: Fail, setup, teacher_net) -> list[nn.Parameter]:
    """The parameters of build()'s module: counted by params_extra, shared with no network."""
    modules = setup.trainee.modules
    if modules is None:
        fail.require(setup.info["params_extra"] == 0, "params_extra is non-zero but build() returned no module")
        return []
    fail.require(isinstance(modules, nn.Module), f"build() returned {type(modules).__name__}; return an nn.Module (e.g. nn.ModuleDict) or None")
    params = list(modules.parameters())
    count = sum(param.numel() for param in params)
    fail.require(
        setup.info["params_extra"] == count,
        f"params_extra is {setup.info['params_extra']} but build()'s module has {count} parameters",
    )
    student_ids = {id(param) for param in setup.trainee.student.parameters()}
    teacher_ids = {id(param) for param in teacher_net.parameters()} if teacher_net is not None else set()
    shared = [name for name, param in modules.named_parameters() if id(param) in student_ids]
    fail.require(not shared, f"build()'s module holds student parameters {shared[:3]} — they are trained once as the student; don't put them in the module")
    leaked = [name for name, param in modules.named_parameters() if id(param) in teacher_ids]
    fail.require(not leaked, f"build()'s module holds teacher parameters {leaked[:3]} — the teacher must stay frozen; copy what you need instead")
    return params


# --------------------------------------------------------------------------- losses


def _check_losses(fail: Fail, method: Method, plan, device, label: str) -> None:
    """Every stage's loss (the method's stages, then the main one) on one real batch."""
    teacher_net, setup, pair = _set_up(fail, method, plan, device, label)
    label = f"{label} on {plan.dataset_obj.name} {pair}"
    extra = _check_modules(fail, setup, teacher_net)
    student_params = dict(setup.trainee.student.model.named_parameters())
    known = {id(param) for param in student_params.values()} | {id(param) for param in extra}
    got_grad: set[int] = set()
    for stage, epochs in _stages(method, plan, setup):
        before = _state(teacher_net)
        terms, leaves = _one_step(fail, setup, stage.loss, stage.name, epochs, label, plan.config.seed)
        _check_no_stray(fail, stage, label, leaves - known)
        if teacher_net is not None:
            _check_teacher_untouched(fail, stage, teacher_net, before)
        _check_student_grads(fail, stage, label, terms, student_params)
        got_grad |= _module_grads(fail, stage, extra)
    if extra:
        idle = [name for name, param in setup.trainee.modules.named_parameters() if id(param) not in got_grad]
        fail.require(
            not idle,
            f"parameters {idle[:5]} of build()'s module get no gradient from any stage's loss with {label}: "
            "they are counted in params_extra but never trained — use them in a loss or don't build them",
        )


def _stages(method: Method, plan, setup) -> list[tuple[Stage, int]]:
    """(stage, its epochs): the method's stages before the main one, then the main one."""
    main = Stage(name="main", epochs=plan.recipe.epochs, loss=method.loss)
    return [(stage, epochs) for stage, epochs in setup.pre_stages] + [(main, plan.recipe.epochs)]


def _one_step(fail: Fail, setup, loss_fn, stage: str, epochs: int, label: str, seed: int):
    """Run ``loss_fn`` on a real batch through the tapped networks; backward; return (terms, graph leaves)."""
    step = _real_step(setup, stage, epochs, seed)
    what = f"the {stage!r} loss with {label}"
    try:
        raw = loss_fn(step)
    except Exception as exc:
        raise fail(f"{what} raised {type(exc).__name__}: {exc}") from exc
    terms = _terms(fail, what, raw)
    total = sum(terms.values())
    fail.require(
        total.requires_grad,
        f"{what} is not differentiable (no term depends on the student or the method's modules) — "
        "don't .detach()/.item() the student's outputs or wrap the loss in torch.no_grad()",
    )
    leaves = _leaf_params(terms.values())
    try:
        total.backward()
    except Exception as exc:
        raise fail(f"{what}: backward() raised {type(exc).__name__}: {exc}") from exc
    return terms, leaves


def _real_step(setup, stage: str, epochs: int, seed: int) -> Step:
    """A training batch through the tapped student and teacher, gradients cleared, as a Step."""
    trainee = setup.trainee
    train = setup.splits["train"]
    generator = torch.Generator().manual_seed(seed)
    x, y, index = next(train.shuffled(min(len(train), _BATCH), generator, Augment()))
    trained = [trainee.student] + ([trainee.modules] if trainee.modules is not None else [])
    for net in trained:
        net.train()
    for net in trained:
        for param in net.parameters():
            param.grad = None
    if trainee.teacher is not None:
        with torch.no_grad():
            teacher_out = trainee.teacher(x)
    else:
        teacher_out = None
    student_out = trainee.student(x)
    return Step(
        x=x, y=y, student=student_out, teacher=teacher_out, hp=trainee.hp, modules=trainee.modules,
        epoch=0, epochs=epochs, stage=stage, index=index,
        student_net=trainee.student, teacher_net=trainee.teacher,
    )


def _terms(fail: Fail, what: str, terms: Any) -> dict[str, torch.Tensor]:
    """The loss's result, checked to be a non-empty dict of finite floating-point scalars."""
    fail.require(
        isinstance(terms, Mapping) and len(terms) > 0,
        f"{what} returned {type(terms).__name__}; it must return a non-empty dict of named loss "
        "terms, e.g. {'ce': ..., 'kd': ...}",
    )
    for key, value in terms.items():
        fail.require(isinstance(key, str), f"{what}: term names must be strings, got {key!r}")
        fail.require(
            isinstance(value, torch.Tensor),
            f"{what}: term {key!r} is a {type(value).__name__}, not a tensor — build it with torch ops",
        )
        fail.require(
            value.dim() == 0,
            f"{what}: term {key!r} has shape {tuple(value.shape)} — reduce it to a scalar (e.g. mean over the batch)",
        )
        fail.require(value.is_floating_point(), f"{what}: term {key!r} has dtype {value.dtype}, not floating point")
        fail.require(
            bool(torch.isfinite(value.detach())),
            f"{what}: term {key!r} is {value.item()} on a real batch — guard logs/divisions (eps) and check the weights",
        )
    return dict(terms)


def _leaf_params(tensors: Iterable[torch.Tensor]) -> set[int]:
    """ids of the parameters (``nn.Parameter`` leaves) the autograd graph of ``tensors`` reaches
    (other leaves, such as an input made to require grad, are the method's business)."""
    seen, found = set(), set()
    stack = [tensor.grad_fn for tensor in tensors if tensor.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if isinstance(variable, nn.Parameter):
            found.add(id(variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


def _check_no_stray(fail: Fail, stage: Stage, label: str, stray: set[int]) -> None:
    """The loss reaches no parameter outside the student and build()'s module."""
    fail.require(
        not stray,
        f"the {stage.name!r} loss with {label} uses {len(stray)} parameter(s) that are neither "
        "the student's nor in build()'s module: they are never trained nor counted in params_extra — "
        "create them in build(probe) and read them from step.modules",
    )


def _check_teacher_untouched(fail: Fail, stage: Stage, teacher_net: nn.Module, before: dict) -> None:
    graded = [name for name, param in teacher_net.named_parameters() if param.grad is not None]
    fail.require(not graded, f"gradients reached the teacher ({graded[:3]}) in the {stage.name!r} loss — the teacher must stay frozen")
    changed = _changed(teacher_net, before)
    fail.require(not changed, f"the {stage.name!r} loss changed the teacher's {changed[:3]} — don't run the teacher in train mode")


def _check_student_grads(fail: Fail, stage: Stage, label: str, terms: dict, student_params: dict) -> None:
    grads = [(name, param.grad) for name, param in student_params.items() if param.grad is not None]
    if stage.train_student:
        fail.require(
            bool(grads),
            f"the {stage.name!r} loss with {label} sends no gradient to the student: {sorted(terms)} "
            "must depend on step.student",
        )
    bad = [name for name, grad in grads if not torch.isfinite(grad).all()]
    fail.require(not bad, f"the {stage.name!r} loss with {label} gives non-finite gradients to {bad[:3]}")


def _module_grads(fail: Fail, stage: Stage, extra: list[nn.Parameter]) -> set[int]:
    """ids of the module parameters that got a gradient (each checked finite)."""
    got_grad = set()
    for param in extra:
        if param.grad is not None:
            fail.require(bool(torch.isfinite(param.grad).all()), f"the {stage.name!r} loss gives non-finite gradients to the method's modules")
            got_grad.add(id(param))
    return got_grad


# --------------------------------------------------------------------------- runs


class _Run(NamedTuple):
    """What two runs under one seed must share."""

    metrics: dict
    curve: list
    student: dict


def _stable(metrics: Mapping[str, float]) -> dict:
    return {key: value for key, value in metrics.items() if not _UNSTABLE.search(key)}


def _check_runs(fail: Fail, method: Method, plan, device) -> None:
    """Two one-epoch runs under the same seed: the same metrics, curves and student weights."""
    first, second = [_one_run(fail, method, plan, device) for _attempt in range(2)]
    if first.curve != second.curve or first.metrics != second.metrics:
        keys = set(first.metrics) | set(second.metrics)
        diff = sorted(key for key in keys if first.metrics.get(key) != second.metrics.get(key)) or ["per-epoch losses"]
        raise fail(
            f"two runs with seed {plan.config.seed} differ in {diff[:5]} — draw randomness from torch "
            "(seeded by the harness) or a torch.Generator, not from random/numpy or the clock"
        )
    for key in first.student:
        fail.require(
            torch.equal(first.student[key], second.student[key]),
            f"two runs with seed {plan.config.seed} end with different student weights ({key})",
        )


def _one_run(fail: Fail, method: Method, plan, device) -> _Run:
    teacher_net, setup, pair = _set_up(fail, method, plan, device, "the default hyperparameters")
    before = _state(teacher_net)
    logs: list = []
    try:
        result = engine.run_student(plan, setup, device, logs.append, with_test=False)
    except KdbenchError as exc:
        raise fail(f"a one-epoch run on {plan.dataset_obj.name} {pair} failed: {exc}") from None
    except Exception as exc:
        raise fail(f"a one-epoch run on {plan.dataset_obj.name} {pair} raised {type(exc).__name__}: {exc}") from exc
    if teacher_net is not None:
        changed = _changed(teacher_net, before)
        fail.require(not changed, f"training changed the teacher's {changed[:3]} — the teacher must stay frozen (eval mode, no gradients)")
    for key in ("final_val_top1", "best_val_top1"):
        fail.require(math.isfinite(result.metrics.get(key, float("nan"))), f"a one-epoch run recorded no finite {key}")
    curve = [(entry.stage, entry.epoch, _stable(entry.metrics)) for entry in logs]
    return _Run(metrics=_stable(result.metrics), curve=curve, student=_state(setup.trainee.student.model))
