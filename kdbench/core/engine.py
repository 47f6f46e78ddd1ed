"""The training engine: teacher and student training loops, evaluation, stages.

It knows the contracts, never a method, model or dataset by name, and never the tracker: it
reports each epoch to an ``on_epoch`` callback. The hot loop keeps everything on the device and
reads losses and accuracy once per epoch.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import math
import resource
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.core import metrics
from kdbench.contracts import Dataset, Method, Model, Probe, Recipe, Stage, Step
from kdbench.core.splits import DeviceSplit, load_split
from kdbench.errors import KdbenchError, NonFiniteLoss
from kdbench.core.taps import Tapped, expand


@dataclass
class EpochLog:
    role: str  # "teacher" | "student"
    stage: str
    epoch: int  # 1-based within the stage
    epochs: int
    metrics: dict[str, float]


OnEpoch = Callable[[EpochLog], None]


@dataclass
class FitResult:
    """What one training run measured. ``metrics`` holds the final, flat numbers."""

    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[float] = field(default_factory=list)  # validation top-1 per main-stage epoch
    seconds: list[float] = field(default_factory=list)  # cumulative training seconds
    state_dict: dict | None = None
    peer_val: dict[str, float] = field(default_factory=dict)


def select_device(name: str | None = None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KdbenchError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdbenchError("--device cuda asked for, but PyTorch sees no CUDA device; use --device cpu")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op elsewhere (no autocast state toggled per step on CPU)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def lr_at(recipe: Recipe, epoch: int) -> float:
    """Learning rate for 0-based ``epoch`` under the recipe's schedule."""
    if recipe.schedule == "multistep":
        return recipe.lr * recipe.gamma ** sum(epoch >= m for m in recipe.milestones)
    if recipe.schedule == "cosine":
        return 0.5 * recipe.lr * (1 + math.cos(math.pi * epoch / recipe.epochs))
    if recipe.schedule == "constant":
        return recipe.lr
    raise KdbenchError(f"unknown lr schedule {recipe.schedule!r} (multistep, cosine or constant)")


def make_optimizer(params, recipe: Recipe) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=recipe.lr, momentum=recipe.momentum,
            weight_decay=recipe.weight_decay, nesterov=recipe.nesterov,
        )
    if recipe.optimizer in ("adam", "adamw"):
        cls = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    raise KdbenchError(f"unknown optimizer {recipe.optimizer!r} (sgd, adam or adamw)")


def build_model(model: Model, dataset: Dataset, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    try:
        net = model.make(dataset.num_classes, dataset.input_shape)
    except KdbenchError:
        raise
    except Exception as exc:
        raise KdbenchError(
            f"model {model.name!r} could not be built for dataset {dataset.name!r} "
            f"(input {tuple(dataset.input_shape)}, {dataset.num_classes} classes): {exc}"
        ) from None
    if device.type == "cuda" and len(dataset.input_shape) == 3:
        net = net.to(memory_format=torch.channels_last)
    return net.to(device)


def load_checkpoint(net: nn.Module, path: str, owner: str) -> None:
    """Load ``{'model': state_dict}`` or a bare state dict; name the first mismatch."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KdbenchError(f"teacher checkpoint {path!r} does not exist") from None
    except Exception as exc:
        raise KdbenchError(f"teacher checkpoint {path!r} could not be read: {exc}") from None
    state = blob.get("model", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise KdbenchError(f"teacher checkpoint {path!r} holds no state dict")
    own = net.state_dict()
    for key, value in own.items():
        if key not in state:
            raise KdbenchError(f"teacher checkpoint {path!r} does not fit {owner}: missing key {key!r}")
        if tuple(state[key].shape) != tuple(value.shape):
            raise KdbenchError(
                f"teacher checkpoint {path!r} does not fit {owner}: {key!r} has shape "
                f"{tuple(state[key].shape)}, the model needs {tuple(value.shape)}"
            )
    extra = [k for k in state if k not in own]
    if extra:
        raise KdbenchError(f"teacher checkpoint {path!r} does not fit {owner}: unexpected key {extra[0]!r}")
    net.load_state_dict(state)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(net: nn.Module, split: DeviceSplit, batch_size: int, device: torch.device) -> dict:
    """Top-1 and top-5 accuracy (fractions) of ``net`` (returning logits or Outputs)."""
    was = net.training
    net.eval()
    correct = torch.zeros(2, device=device, dtype=torch.long)
    with autocast(device):
        for x, y in split.batches(batch_size):
            out = net(x)
            logits = out.logits if hasattr(out, "logits") else out
            correct += metrics.topk_correct(logits.float(), y)
    net.train(was)
    top1, top5 = (correct.double() / max(len(split), 1)).tolist()
    return {"top1": top1, "top5": top5}


# --------------------------------------------------------------------------- training


def cross_entropy(step: Step) -> dict[str, torch.Tensor]:
    return {"ce": F.cross_entropy(step.student.logits, step.y)}


@dataclass
class Trainee:
    """What is optimised: the student (tapped), the method's extra modules, a frozen teacher."""

    student: Tapped
    teacher: Tapped | None
    modules: nn.Module | None
    hp: SimpleNamespace
    teachers: list[Tapped] = field(default_factory=list)  # extra frozen teachers (Step.teachers)
    peers: list[nn.Module] = field(default_factory=list)  # extra evaluated networks (Method.peers)


def train_stage(
    t: Trainee,
    stage: Stage,
    epochs: int,
    recipe: Recipe,
    train: DeviceSplit,
    generator: torch.Generator,
    augment,
    device: torch.device,
    after_epoch: Callable[[int, dict], None],
    scheduled: bool,
) -> float:
    """Run one stage; returns its training seconds. ``after_epoch(epoch0, metrics)`` is called
    with the epoch's mean loss terms and training accuracy (one host read per epoch)."""
    params = list(t.modules.parameters()) if t.modules is not None else []
    if stage.train_student:
        params = list(t.student.parameters()) + params
    if not params:
        raise KdbenchError(f"stage {stage.name!r} has no parameters to train")
    opt = make_optimizer(params, recipe)
    loss_fn = stage.loss
    total_seconds = 0.0
    t.student.train()
    if t.modules is not None:
        t.modules.train()
    for epoch in range(epochs):
        lr = lr_at(recipe, epoch) if scheduled else recipe.lr
        for group in opt.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        sums: torch.Tensor | None = None
        names: list[str] = []
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for x, y, index in train.shuffled(recipe.batch_size, generator, augment):
            with autocast(device):
                if t.teacher is not None:
                    with torch.no_grad():
                        t_out = t.teacher(x)
                else:
                    t_out = None
                extra = None
                if t.teachers:
                    with torch.no_grad():
                        extra = [net(x) for net in t.teachers]
                s_out = t.student(x)
                terms = loss_fn(Step(x, y, s_out, t_out, t.hp, t.modules, epoch, epochs, stage.name,
                                     index, t.student, t.teacher, extra))
                values = list(terms.values())
                loss = functools.reduce(operator.add, values)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            batch_terms = torch.stack([v.detach().float() for v in values])
            if sums is None:
                names, sums = list(terms), batch_terms * len(y)
            else:
                sums.add_(batch_terms, alpha=len(y))
            correct.add_((s_out.logits.detach().argmax(1) == y).sum())
            seen += len(y)
        values = (sums / max(seen, 1)).tolist()  # the epoch's one host sync
        epoch_metrics = {f"loss_{n}": v for n, v in zip(names, values)}
        epoch_metrics["loss"] = sum(values)
        epoch_metrics["train_top1"] = correct.item() / max(seen, 1)
        epoch_metrics["lr"] = lr
        epoch_metrics["epoch_seconds"] = time.perf_counter() - start
        if not all(math.isfinite(v) for v in values):
            detail = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, values))
            raise NonFiniteLoss(
                f"loss became non-finite in stage {stage.name!r} epoch {epoch + 1} ({detail}); "
                "lower the lr or the method's weights"
            )
        total_seconds += epoch_metrics["epoch_seconds"]
        after_epoch(epoch, epoch_metrics)
    return total_seconds


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory: CUDA allocator peak on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def _snapshot(net: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def fit(
    t: Trainee,
    pre_stages: list[tuple[Stage, int]],
    main_loss,
    recipe: Recipe,
    dataset: Dataset,
    splits: dict[str, DeviceSplit],
    device: torch.device,
    seed: int,
    role: str,
    on_epoch: OnEpoch,
    load_test: Callable[[], DeviceSplit] | None,
) -> FitResult:
    """Pre-stages, then the main stage with per-epoch validation; test at the end (last epoch
    and best-on-validation weights) when ``load_test`` is given (never during tuning)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    result = FitResult()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train, val = splits["train"], splits["val"]
    pre_seconds = 0.0
    for stage, epochs in pre_stages:
        def log_pre(epoch, m, _stage=stage, _epochs=epochs):
            named = {f"{_stage.name}/{k}": v for k, v in m.items()}
            on_epoch(EpochLog(role, _stage.name, epoch + 1, _epochs, named))

        pre_seconds += train_stage(
            t, stage, epochs, recipe, train, generator, dataset.augment, device, log_pre, scheduled=False
        )

    best = {"top1": -1.0, "epoch": 0, "state": None}

    def after_epoch(epoch: int, m: dict) -> None:
        result.seconds.append((result.seconds[-1] if result.seconds else pre_seconds) + m["epoch_seconds"])
        val_acc = evaluate(t.student, val, recipe.eval_batch_size, device)
        result.curve.append(val_acc["top1"])
        if val_acc["top1"] > best["top1"]:
            best.update(top1=val_acc["top1"], epoch=epoch + 1, state=_snapshot(t.student.model))
        m = {**m, "val_top1": val_acc["top1"], "val_top5": val_acc["top5"]}
        if t.peers:
            m["peer0_val_top1"] = val_acc["top1"]
            for i, peer in enumerate(t.peers, 1):
                m[f"peer{i}_val_top1"] = evaluate(peer, val, recipe.eval_batch_size, device)["top1"]
            result.peer_val = {k: v for k, v in m.items() if k.startswith("peer")}
        on_epoch(EpochLog(role, "main", epoch + 1, recipe.epochs, m))

    main = Stage("main", recipe.epochs, main_loss, train_student=True)
    train_stage(t, main, recipe.epochs, recipe, train, generator, dataset.augment, device, after_epoch, scheduled=True)

    per_epoch = len(train) - len(train) % recipe.batch_size if len(train) > recipe.batch_size else len(train)
    m = result.metrics
    m["train_seconds"] = result.seconds[-1]
    m["throughput"] = per_epoch * (recipe.epochs + sum(e for _, e in pre_stages)) / max(m["train_seconds"], 1e-9)
    m["final_val_top1"] = result.curve[-1]
    m["best_val_top1"] = best["top1"]
    m["best_val_epoch"] = best["epoch"]
    m.update(metrics.convergence(result.curve, result.seconds))
    if load_test is not None:
        test = load_test()
        last = evaluate(t.student, test, recipe.eval_batch_size, device)
        m["test_top1"], m["test_top5"] = last["top1"], last["top5"]
        result.state_dict = _snapshot(t.student.model)
        t.student.model.load_state_dict(best["state"])
        at_best = evaluate(t.student, test, recipe.eval_batch_size, device)
        m["test_top1_bestval"], m["test_top5_bestval"] = at_best["top1"], at_best["top5"]
        t.student.model.load_state_dict(result.state_dict)
        if t.peers:
            m["peer0_test_top1"] = m["test_top1"]
            for i, peer in enumerate(t.peers, 1):
                m[f"peer{i}_test_top1"] = evaluate(peer, test, recipe.eval_batch_size, device)["top1"]
    else:
        result.state_dict = _snapshot(t.student.model)
    m.update(result.peer_val)  # last epoch's validation accuracy of each peer
    m["peak_mem_mb"] = peak_memory_mb(device)[0]
    return result


# --------------------------------------------------------------------------- teacher and student


def load_splits(dataset: Dataset, device: torch.device, options: dict, names=("train", "val")) -> dict:
    return {name: load_split(dataset, name, device, options) for name in names}


def run_teacher(plan, device: torch.device, on_epoch: OnEpoch) -> tuple[nn.Module, FitResult]:
    """Train the plan's teacher with the teacher recipe (plain cross-entropy)."""
    ds = plan.dataset_obj
    seed = plan.config.teacher_seed
    net = build_model(plan.teacher_obj, ds, device, seed)
    trainee = Trainee(Tapped(net, {}, [], "teacher"), None, None, SimpleNamespace())
    splits = load_splits(ds, device, plan.config.data_options)
    result = fit(
        trainee, [], cross_entropy, plan.teacher_recipe, ds, splits, device, seed, "teacher",
        on_epoch, lambda: load_split(ds, "test", device, plan.config.data_options),
    )
    net.eval().requires_grad_(False)
    return net, result


def build_teacher(plan, device: torch.device) -> nn.Module:
    """An untrained teacher network of the plan (to load a checkpoint or a cached state into)."""
    return build_model(plan.teacher_obj, plan.dataset_obj, device, plan.config.teacher_seed)


def _wanted(method: Method, hp, s_taps: list[str], t_taps: list[str]) -> tuple[list[str], list[str]]:
    if callable(method.taps):
        names = list(method.taps(hp, s_taps, t_taps))
        return names, (names if t_taps is not None else [])
    return expand(method.taps, s_taps), (expand(method.taps, t_taps) if t_taps is not None else [])


def _shapes(tapped: Tapped, input_shape, device) -> dict[str, tuple[int, ...]]:
    was = tapped.training
    tapped.eval()
    with torch.no_grad():
        out = tapped(torch.zeros((2, *input_shape), device=device))
    tapped.train(was)
    return {k: tuple(v.shape[1:]) for k, v in out.feats.items()}


@dataclass
class StudentSetup:
    trainee: Trainee
    pre_stages: list[tuple[Stage, int]]
    info: dict[str, float]
    splits: dict[str, DeviceSplit]


def setup_student(plan, teacher_net: nn.Module | None, device: torch.device,
                  extra_teachers: list[nn.Module] | tuple = ()) -> StudentSetup:
    """Build the student, tap both networks, probe shapes, check the pair, build the method's
    modules, and count parameters and FLOPs — everything that can fail before training.

    ``extra_teachers`` are the networks of ``plan.extra_teachers`` (tapped like the teacher). A
    method with ``train_data`` supplies the training inputs itself: the dataset's train split is
    then never loaded (``train_split_loaded`` = 0)."""
    method: Method = plan.method_obj
    ds: Dataset = plan.dataset_obj
    hp = SimpleNamespace(**plan.hp)
    s_model = plan.student_obj
    own_data = method.train_data is not None
    splits = load_splits(ds, device, plan.config.data_options, ("val",) if own_data else ("train", "val"))
    student_net = build_model(s_model, ds, device, plan.config.seed)
    s_taps = s_model.taps_of(student_net)
    t_taps = plan.teacher_obj.taps_of(teacher_net) if teacher_net is not None else None
    try:
        s_wanted, t_wanted = _wanted(method, hp, list(s_taps), list(t_taps) if t_taps is not None else None)
    except KdbenchError as exc:
        raise KdbenchError(f"method {method.name!r} cannot use this pair: {exc}") from None
    student = Tapped(student_net, s_taps, s_wanted, f"student {s_model.name!r}")
    teacher = None
    if teacher_net is not None:
        teacher_net.eval().requires_grad_(False)
        teacher = Tapped(teacher_net, t_taps, t_wanted, f"teacher {plan.teacher_obj.name!r}").eval()
    extra = []
    for entry, net in zip(plan.extra_teachers, extra_teachers):
        net.eval().requires_grad_(False)
        taps = entry.obj.taps_of(net)
        try:
            _, wanted = _wanted(method, hp, list(s_taps), list(taps))
        except KdbenchError as exc:
            raise KdbenchError(f"method {method.name!r} cannot use teacher {entry.obj.name!r}: {exc}") from None
        extra.append(Tapped(net, taps, wanted, f"teacher {entry.obj.name!r}").eval())
    seeds = iter(range(plan.config.seed + 1, plan.config.seed + 1_000_000))  # each new student differs
    probe = Probe(
        hp=hp,
        num_classes=ds.num_classes,
        input_shape=tuple(ds.input_shape),
        student_shapes=_shapes(student, ds.input_shape, device),
        teacher_shapes=_shapes(teacher, ds.input_shape, device) if teacher is not None else {},
        student_taps=list(s_taps),
        teacher_taps=list(t_taps or []),
        new_student=lambda: build_model(s_model, ds, device, next(seeds)),
        num_train=0 if own_data else len(splits["train"]),
        num_teachers=(teacher is not None) + len(extra),
    )
    if method.check is not None:
        method.check(probe)
    if own_data:
        x, y = method.train_data(probe, teacher_net, device)
        splits["train"] = DeviceSplit(x.detach().to(device), y.to(device).long(), None, None)
        probe.num_train = len(y)
    modules = method.build(probe) if method.build is not None else None
    if modules is not None:
        modules = modules.to(device)
    pre_stages = []
    for stage in method.stages(hp) if method.stages is not None else []:
        epochs = getattr(hp, stage.epochs) if isinstance(stage.epochs, str) else stage.epochs
        if epochs > 0:
            pre_stages.append((stage, int(epochs)))
    peers = list(method.peers(modules)) if method.peers is not None and modules is not None else []
    teacher_nets = ([teacher_net] if teacher_net is not None else []) + list(extra_teachers)
    info = {
        "params_student": metrics.count_params(student_net),
        "params_teacher": sum(metrics.count_params(n) for n in teacher_nets),  # all teachers
        "params_extra": metrics.count_params(modules),
        "flops_student": metrics.flops_per_sample(student_net, ds.input_shape, device),
        "train_split_loaded": 0 if own_data else 1,
    }
    if teacher_nets:
        info["flops_teacher"] = sum(metrics.flops_per_sample(n, ds.input_shape, device) for n in teacher_nets)
    if extra:
        info["num_teachers"] = len(teacher_nets)
    trainee = Trainee(student, teacher, modules, hp, extra, peers)
    return StudentSetup(trainee, pre_stages, info, splits)


def run_student(plan, setup: StudentSetup, device: torch.device, on_epoch: OnEpoch, with_test: bool = True) -> FitResult:
    """Train the student of ``setup`` with the plan's method; test only when ``with_test``."""
    ds = plan.dataset_obj
    load_test = (lambda: load_split(ds, "test", device, plan.config.data_options)) if with_test else None
    result = fit(
        setup.trainee, setup.pre_stages, plan.method_obj.loss, plan.recipe, ds, setup.splits, device,
        plan.config.seed, "student", on_epoch, load_test,
    )
    result.metrics.update(setup.info)
    return result
