"""A conformance kit for plugin authors: call it from your own tests.

::

    from kdbench.testing import check_method

    def test_conformance():
        check_method("mymethod")

Each ``check_*`` loads the installed plugins (your package must be installed, e.g. ``pip install
-e .``), finds the thing by name and exercises its contract for real: declarations, real forward
and backward passes through the harness's own code paths (:func:`kdbench.core.engine.setup_student`,
:class:`kdbench.core.taps.Tapped`), a short training run and determinism under a seed. A violation
raises :class:`AssertionError` whose message says what is wrong and what to change. The checks
run on the CPU on a subset of the training data, so they take seconds, not a benchmark run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import re
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from kdbench.core import engine, metrics, plugins
from kdbench.contracts import Augment, Dataset, HParam, Method, Model, Recipe, Stage, Step
from kdbench.errors import KdbenchError
from kdbench.core.taps import Tapped

__all__ = ["check_method", "check_model", "check_dataset"]

#: Metrics that measure time or memory: excluded from the determinism comparison.
_UNSTABLE = re.compile(r"(seconds|throughput|peak_mem)")
_TAP_NAME = re.compile(r"^(stem|stage\d+|stage\d+_pre|pool)$")
_OPTIMIZERS = ("sgd", "adam", "adamw")
_SCHEDULES = ("multistep", "cosine", "constant")


@contextlib.contextmanager
def _one_thread():
    """Run on one CPU thread: the checked networks are tiny, and on a shared machine several
    threads mostly wait for each other (often 10x slower); one thread is also reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _single_threaded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _one_thread():
            return fn(*args, **kwargs)

    return wrapper


class _Fail:
    """Builds AssertionErrors prefixed with what is being checked."""

    def __init__(self, owner: str):
        self.owner = owner

    def __call__(self, message: str) -> AssertionError:
        return AssertionError(f"{self.owner}: {message}")

    def require(self, condition: bool, message: str) -> None:
        if not condition:
            raise self(message)


# --------------------------------------------------------------------------- lookup


def _find(kind: str, name: str, reg: plugins.Registry | None = None) -> tuple[plugins.Entry, plugins.Registry]:
    reg = reg or plugins.registry()
    table = getattr(reg, kind)
    if name in table:
        return table[name], reg
    singular = kind[:-1]
    related = [f for f in reg.failures if repr(name) in f.error or name in (f.plugin, f.dist)]
    failures = related or reg.failures
    if failures:
        lines = "; ".join(f.line() for f in failures)
        raise AssertionError(
            f"{singular} {name!r} is not registered because a plugin failed to load: {lines}"
        )
    known = ", ".join(sorted(table)) or "none"
    raise AssertionError(
        f"{singular} {name!r} is not registered (registered {kind}: {known}). Is your package "
        f"installed (`pip install -e .`) with an entry point in the `kdbench` group whose module "
        f"implements register_{kind}? Check with `kdbench plugins`."
    )


# --------------------------------------------------------------------------- hyperparameters


def _check_hparam(fail: _Fail, h: HParam) -> None:
    who = f"hyperparameter {h.name!r}"
    fail.require(isinstance(h, HParam), f"hparams must hold kdbench.contracts.HParam, got {h!r}")
    fail.require(h.name.isidentifier(), f"{who}: the name must be a Python identifier (it is read as step.hp.{h.name})")
    try:
        h.check(h.default)
    except KdbenchError as exc:
        raise fail(f"{who}: the default {h.default!r} is not valid ({exc}) — change the default or low/high") from None
    if h.low is not None and h.high is not None:
        fail.require(h.low <= h.high, f"{who}: valid range low={h.low} > high={h.high} — swap them")
    if not h.tune:
        return
    if h.choices is not None:
        fail.require(len(h.choices) > 0, f"{who}: choices=() is empty — list the values to search, or tune=False")
        for c in h.choices:
            try:
                h.check(c)
            except KdbenchError as exc:
                raise fail(f"{who}: choice {c!r} is not valid ({exc}) — keep choices within the valid range") from None
        return
    if h.kind in (bool, str):
        return  # searched only with choices
    if h.space is None:
        raise fail(f"{who} is tunable but has no search space — give space=(low, high), or tune=False")
    fail.require(
        isinstance(h.space, tuple) and len(h.space) == 2,
        f"{who}: space must be a (low, high) tuple, got {h.space!r}",
    )
    lo, hi = h.space
    fail.require(lo < hi, f"{who} search space {h.space} is empty — give space=(low, high) with low < high")
    if h.log:
        fail.require(lo > 0, f"{who}: log search space {h.space} must be positive — raise low above 0, or log=False")
    for end in (lo, hi):
        try:
            h.check(end)
        except KdbenchError as exc:
            raise fail(
                f"{who} search space {h.space} reaches {end}, which is not a valid value ({exc}) — "
                "keep space inside the valid range (low/high)"
            ) from None


def _sample_hparams(fail: _Fail, method: Method, trials: int, seed: int) -> list[dict]:
    """Sample ``trials`` Optuna trials of the method's search space; check each value."""
    import optuna

    space = method.search_space()
    if not space:
        return []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    sampled = []
    for _ in range(trials):
        trial = study.ask()
        values = {}
        for h in space:
            try:
                value = h.suggest(trial)
            except Exception as exc:
                raise fail(f"hyperparameter {h.name!r}: Optuna cannot sample its space {h.describe_space()} ({exc})") from None
            try:
                values[h.name] = h.check(value)
            except KdbenchError as exc:
                raise fail(
                    f"hyperparameter {h.name!r}: Optuna sampled {value!r} from its search space "
                    f"{h.describe_space()}, which is not valid ({exc}) — keep space inside the valid range"
                ) from None
        study.tell(trial, 0.0)
        sampled.append(values)
    return sampled


# --------------------------------------------------------------------------- helpers


def _subset(ds: Dataset, samples: int) -> Dataset:
    """The dataset with its first ``samples`` training (and a quarter as many val) samples."""
    load = ds.load

    def small_load(split, **options):
        x, y = load(split, **options)
        n = samples if split == "train" else max(1, samples // 4)
        return x[:n], y[:n]

    return dataclasses.replace(ds, load=small_load)


def _state(net: nn.Module | None) -> dict:
    if net is None:
        return {}
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _leaf_params(tensors: Iterable[torch.Tensor]) -> set[int]:
    """ids of the parameters (``nn.Parameter`` leaves) the autograd graph of ``tensors`` reaches
    (other leaves, such as an input made to require grad, are the method's business)."""
    seen, found = set(), set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
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


def _terms(fail: _Fail, what: str, terms: Any) -> dict[str, torch.Tensor]:
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


# --------------------------------------------------------------------------- methods


@_single_threaded
def check_method(
    name: str | Method,
    *,
    dataset: str | None = None,
    teacher: str | None = None,
    student: str | None = None,
    hparams: Mapping[str, Any] | None = None,
    trials: int = 50,
    loss_trials: int = 3,
    samples: int = 512,
    seed: int = 0,
    run: bool = True,
) -> None:
    """Check a method's contract; raise AssertionError saying what to fix.

    ``name`` is a registered method name (or a :class:`Method` not registered yet). It is checked
    on ``dataset``/``teacher``/``student`` (default: the embedded dataset and its default pair,
    MNIST-1D with cnn1d_4x32 → cnn1d_2x16), with an *untrained* teacher:

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
    reg = plugins.registry()
    if isinstance(name, Method):
        method = name
        reg = dataclasses.replace(reg, methods={**reg.methods, method.name: plugins.Entry(method, "-", "-", "-")})
    else:
        method = _find("methods", name, reg)[0].obj
    fail = _Fail(f"method {method.name!r}")
    fail.require(isinstance(method, Method), f"registered {type(method).__name__}, expected kdbench.contracts.Method")
    fail.require(callable(method.loss), "loss is not callable — give loss=a function of a kdbench.contracts.Step")
    names = [h.name for h in method.hparams]
    fail.require(len(set(names)) == len(names), f"duplicate hyperparameter names {names}")
    for h in method.hparams:
        _check_hparam(fail, h)
    sampled = _sample_hparams(fail, method, trials, seed)

    from kdbench.core.plan import RunConfig, make_plan

    def plan_for(hp: Mapping[str, Any]):
        config = RunConfig(method=method.name, dataset=dataset, teacher=teacher, student=student,
                           hparams=dict(hp), recipe={"epochs": 1}, seed=seed, device="cpu")
        try:
            plan = make_plan(config, reg)
        except KdbenchError as exc:
            raise fail(f"cannot plan a run: {exc}") from None
        ds_entry = dataclasses.replace(plan.dataset, obj=_subset(plan.dataset_obj, samples))
        return dataclasses.replace(plan, dataset=ds_entry)

    device = torch.device("cpu")
    base = dict(hparams or {})
    settings = [base] + [{**s, **base} for s in sampled[:loss_trials]]
    for i, hp in enumerate(settings):
        label = "the default hyperparameters" if i == 0 else f"sampled hyperparameters {hp}"
        plan = plan_for(hp)
        _check_losses(fail, method, plan, device, label)
    if run:
        _check_runs(fail, method, plan_for(base), device)


def _setup(fail: _Fail, method: Method, plan, device, label: str):
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


def _check_modules(fail: _Fail, setup, teacher_net) -> list[nn.Parameter]:
    modules = setup.trainee.modules
    if modules is None:
        fail.require(setup.info["params_extra"] == 0, "params_extra is non-zero but build() returned no module")
        return []
    fail.require(isinstance(modules, nn.Module), f"build() returned {type(modules).__name__}; return an nn.Module (e.g. nn.ModuleDict) or None")
    params = list(modules.parameters())
    count = sum(p.numel() for p in params)
    fail.require(
        setup.info["params_extra"] == count,
        f"params_extra is {setup.info['params_extra']} but build()'s module has {count} parameters",
    )
    student_ids = {id(p) for p in setup.trainee.student.parameters()}
    teacher_ids = {id(p) for p in teacher_net.parameters()} if teacher_net is not None else set()
    shared = [n for n, p in modules.named_parameters() if id(p) in student_ids]
    fail.require(not shared, f"build()'s module holds student parameters {shared[:3]} — they are trained once as the student; don't put them in the module")
    leaked = [n for n, p in modules.named_parameters() if id(p) in teacher_ids]
    fail.require(not leaked, f"build()'s module holds teacher parameters {leaked[:3]} — the teacher must stay frozen; copy what you need instead")
    return params


def _one_step(fail: _Fail, method: Method, setup, loss_fn, stage: str, epochs: int, label: str, seed: int):
    """Run ``loss_fn`` on a real batch through the tapped networks; backward; return (terms, graph leaves)."""
    t = setup.trainee
    train = setup.splits["train"]
    batch = min(len(train), 64)
    generator = torch.Generator().manual_seed(seed)
    x, y, index = next(train.shuffled(batch, generator, Augment()))
    t.student.train()
    if t.modules is not None:
        t.modules.train()
    for p in t.student.parameters():
        p.grad = None
    if t.modules is not None:
        for p in t.modules.parameters():
            p.grad = None
    if t.teacher is not None:
        with torch.no_grad():
            t_out = t.teacher(x)
    else:
        t_out = None
    s_out = t.student(x)
    step = Step(x, y, s_out, t_out, t.hp, t.modules, 0, epochs, stage, index, t.student, t.teacher)
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


def _check_losses(fail: _Fail, method: Method, plan, device, label: str) -> None:
    teacher_net, setup, pair = _setup(fail, method, plan, device, label)
    label = f"{label} on {plan.dataset_obj.name} {pair}"
    extra = _check_modules(fail, setup, teacher_net)
    t = setup.trainee
    student_params = dict(t.student.model.named_parameters())
    known = {id(p) for p in student_params.values()} | {id(p) for p in extra}
    stages = [(stage, n) for stage, n in setup.pre_stages] + [
        (Stage("main", plan.recipe.epochs, method.loss), plan.recipe.epochs)
    ]
    got_grad: set[int] = set()
    for stage, epochs in stages:
        before = _state(teacher_net)
        terms, leaves = _one_step(fail, method, setup, stage.loss, stage.name, epochs, label, plan.config.seed)
        stray = leaves - known
        fail.require(
            not stray,
            f"the {stage.name!r} loss with {label} uses {len(stray)} parameter(s) that are neither "
            "the student's nor in build()'s module: they are never trained nor counted in params_extra — "
            "create them in build(probe) and read them from step.modules",
        )
        if teacher_net is not None:
            graded = [n for n, p in teacher_net.named_parameters() if p.grad is not None]
            fail.require(not graded, f"gradients reached the teacher ({graded[:3]}) in the {stage.name!r} loss — the teacher must stay frozen")
            changed = [k for k, v in _state(teacher_net).items() if not torch.equal(v, before[k])]
            fail.require(not changed, f"the {stage.name!r} loss changed the teacher's {changed[:3]} — don't run the teacher in train mode")
        grads = [(n, p.grad) for n, p in student_params.items() if p.grad is not None]
        if stage.train_student:
            fail.require(
                bool(grads),
                f"the {stage.name!r} loss with {label} sends no gradient to the student: {sorted(terms)} "
                "must depend on step.student",
            )
        bad = [n for n, g in grads if not torch.isfinite(g).all()]
        fail.require(not bad, f"the {stage.name!r} loss with {label} gives non-finite gradients to {bad[:3]}")
        for p in extra:
            if p.grad is not None:
                fail.require(bool(torch.isfinite(p.grad).all()), f"the {stage.name!r} loss gives non-finite gradients to the method's modules")
                got_grad.add(id(p))
    if extra:
        idle = [n for n, p in t.modules.named_parameters() if id(p) not in got_grad]
        fail.require(
            not idle,
            f"parameters {idle[:5]} of build()'s module get no gradient from any stage's loss with {label}: "
            "they are counted in params_extra but never trained — use them in a loss or don't build them",
        )


def _check_runs(fail: _Fail, method: Method, plan, device) -> None:
    results, teacher_states = [], []
    for attempt in range(2):
        teacher_net, setup, pair = _setup(fail, method, plan, device, "the default hyperparameters")
        before = _state(teacher_net)
        logs: list = []
        try:
            result = engine.run_student(plan, setup, device, logs.append, with_test=False)
        except KdbenchError as exc:
            raise fail(f"a one-epoch run on {plan.dataset_obj.name} {pair} failed: {exc}") from None
        except Exception as exc:
            raise fail(f"a one-epoch run on {plan.dataset_obj.name} {pair} raised {type(exc).__name__}: {exc}") from exc
        if teacher_net is not None:
            changed = [k for k, v in _state(teacher_net).items() if not torch.equal(v, before[k])]
            fail.require(not changed, f"training changed the teacher's {changed[:3]} — the teacher must stay frozen (eval mode, no gradients)")
        for key in ("final_val_top1", "best_val_top1"):
            fail.require(math.isfinite(result.metrics.get(key, float("nan"))), f"a one-epoch run recorded no finite {key}")
        stable = {k: v for k, v in result.metrics.items() if not _UNSTABLE.search(k)}
        curve = [(e.stage, e.epoch, {k: v for k, v in e.metrics.items() if not _UNSTABLE.search(k)}) for e in logs]
        results.append((stable, curve, _state(setup.trainee.student.model)))
        teacher_states.append(before)
    (m1, c1, s1), (m2, c2, s2) = results
    if c1 != c2 or m1 != m2:
        diff = sorted(k for k in set(m1) | set(m2) if m1.get(k) != m2.get(k)) or ["per-epoch losses"]
        raise fail(
            f"two runs with seed {plan.config.seed} differ in {diff[:5]} — draw randomness from torch "
            "(seeded by the harness) or a torch.Generator, not from random/numpy or the clock"
        )
    for k in s1:
        fail.require(torch.equal(s1[k], s2[k]), f"two runs with seed {plan.config.seed} end with different student weights ({k})")


# --------------------------------------------------------------------------- models


@_single_threaded
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
    building is deterministic under a seed; FLOPs are countable.
    """
    reg = plugins.registry()
    model = name if isinstance(name, Model) else _find("models", name, reg)[0].obj
    fail = _Fail(f"model {model.name!r}")
    fail.require(isinstance(model, Model), f"registered {type(model).__name__}, expected kdbench.contracts.Model")
    fail.require(callable(model.build), "build is not callable — give build=(num_classes, input_shape, **kwargs) -> nn.Module")
    explicit = input_shapes is not None
    if explicit:
        shapes = [tuple(s) for s in input_shapes]
    else:
        shapes = sorted({tuple(e.obj.input_shape) for e in reg.datasets.values()})
    built = 0
    refused = []
    for shape in shapes:
        torch.manual_seed(seed)
        try:
            net = model.make(num_classes, shape)
        except KdbenchError as exc:
            if explicit:
                raise fail(f"cannot be built for input {shape}: {exc}") from None
            refused.append(f"{shape}: {exc}")
            continue
        except Exception as exc:
            raise fail(
                f"build for input {shape} raised {type(exc).__name__}: {exc} — raise KdbenchError "
                "with a message for inputs the model cannot take"
            ) from exc
        fail.require(isinstance(net, nn.Module), f"build returned {type(net).__name__}, not an nn.Module")
        _check_built(fail, model, net, shape, num_classes, require_taps, seed)
        built += 1
    fail.require(
        built > 0,
        f"builds for none of the input shapes {shapes} ({'; '.join(refused)}) — pass "
        "check_model(..., input_shapes=[...]) with the shapes it is meant for",
    )


def _check_built(fail, model: Model, net: nn.Module, shape, num_classes, require_taps, seed) -> None:
    where = f"for input {shape}"
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
    odd = [n for n in taps if not _TAP_NAME.match(n)]
    fail.require(not odd, f"tap names {odd} are not conventional — use stem, stage1..stageN, stageK_pre, pool")
    stages = sorted(int(n[5:]) for n in taps if re.fullmatch(r"stage\d+", n))
    fail.require(stages == list(range(1, len(stages) + 1)), f"stage taps {['stage%d' % s for s in stages]} must be numbered 1..N without gaps")
    pres = [n for n in taps if n.endswith("_pre")]
    orphan = [n for n in pres if n[:-4] not in taps]
    fail.require(not orphan, f"taps {orphan} have no matching stage tap")
    missing = [n for n in require_taps if n not in taps]
    fail.require(not missing, f"has no tap {missing} {where} — methods that read features ask for them (declare Tap(...) for them)")

    x = torch.randn((4, *shape), generator=torch.Generator().manual_seed(seed))
    tapped = Tapped(net, taps, list(taps), f"model {model.name!r}")
    tapped.train()
    try:
        out = tapped(x)
    except Exception as exc:
        raise fail(f"forward {where} raised {type(exc).__name__}: {exc}") from exc
    fail.require(
        isinstance(out.logits, torch.Tensor) and tuple(out.logits.shape) == (4, num_classes),
        f"forward {where} must return logits of shape [batch, num_classes] = (4, {num_classes}), got "
        f"{getattr(out.logits, 'shape', type(out.logits).__name__)}",
    )
    for tap_name, feat in out.feats.items():
        fail.require(isinstance(feat, torch.Tensor), f"tap {tap_name!r} {where} read a {type(feat).__name__}, not a tensor — tap a module that outputs one tensor")
        fail.require(feat.shape[0] == 4, f"tap {tap_name!r} {where} has shape {tuple(feat.shape)}: the batch axis must come first")
    if "pool" in out.feats:
        fail.require(out.feats["pool"].dim() == 2, f"tap 'pool' {where} must be a [batch, features] vector, got {tuple(out.feats['pool'].shape)}")
    total = out.logits.float().pow(2).mean() + sum(f.float().pow(2).mean() for f in out.feats.values())
    total.backward()
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    idle = [n for n, p in params if p.grad is None]
    fail.require(not idle, f"parameters {idle[:5]} {where} get no gradient from the logits or taps — remove unused layers (they inflate the parameter count)")
    bad = [n for n, p in params if not torch.isfinite(p.grad).all()]
    fail.require(not bad, f"non-finite gradients {where} in {bad[:3]}")
    tapped.remove()

    torch.manual_seed(seed)
    again = model.make(num_classes, shape)
    torch.manual_seed(seed)
    twice = model.make(num_classes, shape)
    s1, s2 = again.state_dict(), twice.state_dict()
    same = s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
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


# --------------------------------------------------------------------------- datasets


def _row_hashes(x: torch.Tensor) -> set[bytes]:
    flat = x.reshape(len(x), -1).contiguous()
    if flat.is_floating_point():
        flat = flat.float()
    data = flat.numpy()
    return {hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in data}


#: How many samples of a streamed split (a ``torch.utils.data.Dataset``) the kit decodes.
_MAX_SAMPLES = 256


def _kwargs(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def _sampled(fail, what: str, source, picks: torch.Tensor | None = None):
    """(indices, x, y) of up to :data:`_MAX_SAMPLES` samples of a streamed split, evenly spaced
    over it, stacked as a tensor split would be."""
    import pickle

    n = len(source)
    fail.require(n > 0, f"{what} is empty")
    if picks is None:
        picks = torch.linspace(0, n - 1, min(n, _MAX_SAMPLES)).round().long().unique()
        try:
            pickle.loads(pickle.dumps(source))
        except Exception as exc:
            raise fail(f"{what}: the dataset cannot be pickled ({type(exc).__name__}: {exc}) — DataLoader "
                       "workers started with 'spawn' (macOS, Windows) need a picklable dataset") from None
    xs, ys = [], []
    for i in picks.tolist():
        sample = source[i]
        fail.require(isinstance(sample, (tuple, list)) and len(sample) == 2, f"{what}: sample {i} is not an (x, y) pair")
        x, y = torch.as_tensor(sample[0]), torch.as_tensor(sample[1])
        fail.require(y.dim() == 0, f"{what}: sample {i} has a label of shape {tuple(y.shape)}; give one integer")
        fail.require(not xs or x.shape == xs[0].shape, f"{what}: sample {i} has shape {tuple(x.shape)}, sample {int(picks[0])} {tuple(xs[0].shape) if xs else ()}")
        xs.append(x)
        ys.append(y)
    return picks, torch.stack(xs), torch.stack(ys)


def _check_recipe(fail, label: str, r: Recipe) -> None:
    fail.require(isinstance(r, Recipe), f"{label} must be a kdbench.contracts.Recipe, got {type(r).__name__}")
    fail.require(isinstance(r.epochs, int) and r.epochs >= 1, f"{label}.epochs={r.epochs!r} must be an int >= 1")
    fail.require(isinstance(r.batch_size, int) and r.batch_size >= 1, f"{label}.batch_size={r.batch_size!r} must be an int >= 1")
    fail.require(r.lr > 0, f"{label}.lr={r.lr} must be > 0")
    fail.require(r.optimizer in _OPTIMIZERS, f"{label}.optimizer={r.optimizer!r} must be one of {_OPTIMIZERS}")
    fail.require(r.schedule in _SCHEDULES, f"{label}.schedule={r.schedule!r} must be one of {_SCHEDULES}")
    bad = [m for m in r.milestones if not 0 < m < r.epochs]
    fail.require(not bad, f"{label}.milestones {r.milestones} must lie strictly between 0 and epochs={r.epochs}")


@_single_threaded
def check_dataset(name: str | Dataset, *, options: Mapping[str, Any] | None = None, splits=("train", "val", "test")) -> None:
    """Check a dataset's contract; raise AssertionError saying what to fix.

    Every split loads (with ``options``, e.g. ``{"data_dir": ...}``) as ``(x, y)`` with x of shape
    ``[N, *input_shape]`` (uint8 or float, finite) and y integer labels in ``[0, num_classes)``;
    train holds every class; no validation sample is also a training sample; loading is
    deterministic; normalisation, augmentation and recipes are valid; default models exist and
    build for the input shape. A split returned as a ``torch.utils.data.Dataset`` (streamed by
    a DataLoader) must be picklable; up to 256 of its samples, evenly spaced, are decoded and
    checked (its ``targets``, when it has them, give every label). A dataset with ``resolve``
    is first resolved with ``options``, as a run is planned, and the concrete Dataset checked.
    """
    reg = plugins.registry()
    ds = name if isinstance(name, Dataset) else _find("datasets", name, reg)[0].obj
    fail = _Fail(f"dataset {ds.name!r}")
    fail.require(isinstance(ds, Dataset), f"registered {type(ds).__name__}, expected kdbench.contracts.Dataset")
    options = dict(options or {})
    if ds.resolve is not None:
        # a dataset shaped by its files: check the concrete Dataset for these options, as a run does
        try:
            concrete = ds.resolve(**options)
        except KdbenchError as exc:
            hint = "" if options else " — pass check_dataset(..., options={'data_dir': ...})"
            raise fail(f"resolve({_kwargs(options)}) raised: {exc}{hint}") from None
        except Exception as exc:
            raise fail(f"resolve({_kwargs(options)}) raised {type(exc).__name__}: {exc}; raise KdbenchError for unusable options") from exc
        fail.require(isinstance(concrete, Dataset), f"resolve() returned {type(concrete).__name__}, not a kdbench.contracts.Dataset")
        ds = concrete
    shape = tuple(ds.input_shape)
    fail.require(len(shape) >= 1 and all(isinstance(d, int) and d > 0 for d in shape), f"input_shape {shape} must be positive ints (channels first)")
    fail.require(isinstance(ds.num_classes, int) and ds.num_classes >= 2, f"num_classes={ds.num_classes!r} must be an int >= 2")
    for label, stats in (("mean", ds.mean), ("std", ds.std)):
        fail.require(len(stats) in (0, shape[0]), f"{label} has {len(stats)} values; give one per channel ({shape[0]}) or none")
    fail.require(bool(ds.mean) == bool(ds.std), "give both mean and std, or neither")
    fail.require(all(s > 0 for s in ds.std), f"std {ds.std} must be positive")
    _check_recipe(fail, "recipe", ds.recipe)
    if ds.teacher_recipe is not None:
        _check_recipe(fail, "teacher_recipe", ds.teacher_recipe)
    loaded = {}
    for split in splits:
        what = f"split {split!r}"
        try:
            source = ds.load(split, **options)
            if isinstance(source, torch.utils.data.Dataset):
                picks, x, y = _sampled(fail, what, source)
            else:
                picks, (x, y) = None, source
        except AssertionError:
            raise
        except FileNotFoundError as exc:
            raise fail(f"split {split!r} is missing its files ({exc}) — pass check_dataset(..., options={{'data_dir': ...}})") from None
        except Exception as exc:
            raise fail(f"load({split!r}) raised {type(exc).__name__}: {exc}") from exc
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        fail.require(len(x) > 0, f"{what} is empty")
        fail.require(tuple(x.shape[1:]) == shape, f"{what} has samples of shape {tuple(x.shape[1:])}, input_shape declares {shape}")
        fail.require(x.dtype == torch.uint8 or x.is_floating_point(), f"{what}: x has dtype {x.dtype}; use uint8 (scaled by 1/255) or float")
        if x.is_floating_point():
            fail.require(bool(torch.isfinite(x).all()), f"{what}: x holds NaN or inf")
        fail.require(y.dim() == 1 and len(y) == len(x), f"{what}: y has shape {tuple(y.shape)}; it must be [N] with N = len(x) = {len(x)}")
        fail.require(not y.is_floating_point() and y.dtype != torch.bool, f"{what}: labels have dtype {y.dtype}; use integers (int64)")
        lo, hi = int(y.min()), int(y.max())
        fail.require(
            lo >= 0 and hi < ds.num_classes,
            f"{what}: labels span {lo}..{hi} but num_classes={ds.num_classes} — labels must be 0..num_classes-1",
        )
        again = ds.load(split, **options)
        if picks is not None:
            fail.require(isinstance(again, torch.utils.data.Dataset) and len(again) == len(source),
                         f"{what} differs between two loads — list and carve the samples in a fixed order")
            again = _sampled(fail, what, again, picks)[1:]
        fail.require(
            torch.equal(torch.as_tensor(again[0]), x) and torch.equal(torch.as_tensor(again[1]), y),
            f"{what} differs between two loads — generate/carve with a fixed seed",
        )
        if picks is not None:
            # every label when the source lists them (``targets``, as torchvision's datasets do)
            targets = getattr(source, "targets", None)
            if targets is not None and len(targets) == len(source):
                targets = torch.as_tensor(targets)
                fail.require(torch.equal(targets[picks].long(), y.long()), f"{what}: targets disagree with the labels of the samples")
                fail.require(int(targets.min()) >= 0 and int(targets.max()) < ds.num_classes,
                             f"{what}: targets span {int(targets.min())}..{int(targets.max())} but num_classes={ds.num_classes}")
                y = targets
            elif len(picks) < len(source):
                y = None  # the class coverage below needs every label
        loaded[split] = (x, y)
    if "train" in loaded and loaded["train"][1] is not None:
        present = torch.unique(loaded["train"][1]).numel()
        fail.require(
            present == ds.num_classes,
            f"split 'train' holds {present} of num_classes={ds.num_classes} classes — fix num_classes or the labels",
        )
        if "val" in loaded:
            overlap = _row_hashes(loaded["train"][0]) & _row_hashes(loaded["val"][0])
            fail.require(
                not overlap,
                f"{len(overlap)} validation sample(s) also appear in 'train' — carve val from train with "
                "kdbench.data.carve_validation and return only the rest for 'train'",
            )
        from kdbench.core.splits import augment_batch, load_split

        split = load_split(ds, "train", torch.device("cpu"), options)
        x = next(iter(split.batches(8)))[0]
        out = augment_batch(x, ds.augment, torch.Generator().manual_seed(0))
        fail.require(out.shape == x.shape, f"augmentation {ds.augment} changes the batch shape {tuple(x.shape)} → {tuple(out.shape)}")
        fail.require(bool(torch.isfinite(out).all()), "normalised, augmented inputs hold NaN or inf — check mean/std")
    for role in ("default_teacher", "default_student"):
        model_name = getattr(ds, role)
        if model_name is None:
            continue
        fail.require(model_name in reg.models, f"{role}={model_name!r} is not a registered model (see `kdbench list models`)")
        try:
            reg.models[model_name].obj.make(ds.num_classes, shape)
        except Exception as exc:
            raise fail(f"{role}={model_name!r} cannot be built for input {shape}: {exc}") from None
    if ds.embedded:
        fail.require(not options, "embedded datasets must load with no options (no files)")
