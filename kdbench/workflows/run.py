"""One benchmark run, end to end: plan → teacher (cached) → student → MLflow.

This is the layer the CLI, tuning and leaderboards call. It owns the teacher cache and the
tracking; the engine below it knows neither.
"""
from __future__ import annotations

import hashlib
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kdbench import __version__
from kdbench.core import engine, metrics, plugins
from kdbench.core.splits import load_split
from kdbench.core.engine import EpochLog
from kdbench.errors import KdbenchError
from kdbench.data import cache_dir
from kdbench.core.plan import Plan, RunConfig, make_plan
from kdbench.workflows.tracking import Tracker


@dataclass
class Teacher:
    net: torch.nn.Module
    id: str  # cache key, or "ckpt:<sha>" for a checkpoint file
    run_id: str
    metrics: dict


@dataclass
class Outcome:
    plan: Plan
    run_id: str
    metrics: dict
    teacher: Teacher | None
    vanilla_top1: float | None = None
    curve: list[float] = field(default_factory=list)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def base_tags(plan: Plan, device: torch.device) -> dict:
    tags = {
        "dataset": plan.dataset_obj.name,
        "seed": plan.config.seed,
        "kdbench_version": __version__,
        "torch_version": torch.__version__,
        "device": _device_name(device),
        "plugin.dataset": plan.dataset.source,
        "recipe_hash": recipe_hash(plan),
    }
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    return {**tags, **plan.config.tags}


def recipe_hash(plan: Plan) -> str:
    return hashlib.sha256(repr(sorted(plan.recipe.as_dict().items())).encode()).hexdigest()[:12]


def _file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- teacher


def _teacher_run(tracker: Tracker, plan: Plan, teacher_id: str) -> str | None:
    runs = tracker.search(
        plan.dataset_obj.name,
        f"tags.role = 'teacher' AND tags.teacher_key = '{teacher_id}' AND attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _start_teacher_run(tracker, plan, device, teacher_id: str, source: str) -> str:
    """A teacher's own MLflow run: tagged with its cache key or checkpoint id and its source."""
    tags = {**base_tags(plan, device), "role": "teacher", "teacher_key": teacher_id,
            "model": plan.teacher_obj.name, "teacher": plan.teacher_obj.name,
            "plugin.model": plan.teacher.source, "source": source, "seed": plan.config.teacher_seed}
    params = {f"recipe.{k}": v for k, v in plan.teacher_recipe.as_dict().items()}
    return tracker.start(plan.dataset_obj.name, f"teacher-{plan.teacher_obj.name}", tags, params)


def _log_teacher(tracker, plan, device, teacher_id, source, tmetrics, curve=()) -> str:
    run_id = _start_teacher_run(tracker, plan, device, teacher_id, source)
    for i, acc in enumerate(curve):
        tracker.log_metrics(run_id, {"val_top1": acc}, step=i + 1)
    tracker.log_metrics(run_id, tmetrics)
    tracker.finish(run_id)
    return run_id


def obtain_teacher(plan: Plan, device, tracker: Tracker, on_epoch, with_test: bool = True) -> Teacher | None:
    """The plan's trained teacher: from a checkpoint file, the cache, or trained now (and cached)."""
    if plan.teacher is None:
        return None
    ds = plan.dataset_obj
    options = plan.config.data_options
    if plan.config.teacher_checkpoint:
        path = plan.config.teacher_checkpoint
        if not Path(path).is_file():
            raise KdbenchError(f"teacher checkpoint {path!r} does not exist")
        net = engine.build_teacher(plan, device)
        engine.load_checkpoint(net, path, f"teacher {plan.teacher_obj.name!r}")
        net.eval().requires_grad_(False)
        teacher_id = "ckpt:" + _file_sha(path)
        tmetrics = {}
        run_id = _teacher_run(tracker, plan, teacher_id)
        val = engine.evaluate(net, load_split(ds, "val", device, options), plan.recipe.eval_batch_size, device)
        tmetrics["val_top1"] = val["top1"]
        if with_test:
            test = engine.evaluate(net, load_split(ds, "test", device, options), plan.recipe.eval_batch_size, device)
            tmetrics.update(test_top1=test["top1"], test_top5=test["top5"])
        tmetrics["params"] = metrics.count_params(net)
        if run_id is None:
            run_id = _log_teacher(tracker, plan, device, teacher_id, "checkpoint", tmetrics)
        return Teacher(net, teacher_id, run_id, tmetrics)

    key = plan.teacher_key()
    path = cache_dir() / "teachers" / f"{key}.pt"
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net = engine.build_teacher(plan, device)
        net.load_state_dict(blob["model"])
        net.eval().requires_grad_(False)
        tmetrics = dict(blob.get("metrics", {}))
        run_id = _teacher_run(tracker, plan, key)
        if run_id is None:
            run_id = _log_teacher(tracker, plan, device, key, "cache", tmetrics, blob.get("curve", []))
        return Teacher(net, key, run_id, tmetrics)

    run_id = _start_teacher_run(tracker, plan, device, key, "trained")

    def log(e: EpochLog):
        tracker.log_metrics(run_id, e.metrics, step=e.epoch)
        on_epoch(e)

    try:
        net, result = engine.run_teacher(plan, device, log)
    except BaseException as exc:
        tracker.finish(run_id, "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    tmetrics = dict(result.metrics)
    tracker.log_metrics(run_id, tmetrics)
    tracker.finish(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    state = {k: v.cpu() for k, v in result.state_dict.items()}
    torch.save({"model": state, "metrics": tmetrics, "curve": result.curve, "key": key}, tmp)
    tmp.replace(path)
    return Teacher(net, key, run_id, tmetrics)


def obtain_teachers(plan: Plan, device, tracker: Tracker, on_epoch, with_test: bool = True) -> list[Teacher]:
    """The plan's extra teachers (``RunConfig.teachers``), each obtained like the main one:
    from the cache, or trained now and cached (one teacher run each)."""
    return [obtain_teacher(plan.for_teacher(e), device, tracker, on_epoch, with_test) for e in plan.extra_teachers]


def teacher_tags(plan: Plan, teacher: Teacher | None, extra: list[Teacher]) -> dict:
    """Tags naming every teacher of a run with extra teachers (nothing for one teacher)."""
    if not extra:
        return {}
    names = [plan.teacher_obj.name] + [e.obj.name for e in plan.extra_teachers]
    return {"teachers": ",".join(names), "teacher_keys": ",".join([teacher.id] + [t.id for t in extra]),
            "teacher_run_ids": ",".join([teacher.run_id] + [t.run_id for t in extra])}


# --------------------------------------------------------------------------- student


def vanilla_reference(tracker: Tracker, plan: Plan) -> float | None:
    """Mean test top-1 of finished vanilla runs with the same dataset, student and recipe."""
    runs = tracker.search(
        plan.dataset_obj.name,
        "tags.role = 'student' AND tags.method = 'vanilla' AND attributes.status = 'FINISHED' AND "
        f"tags.student = '{plan.student_obj.name}' AND tags.recipe_hash = '{recipe_hash(plan)}'",
    )
    accs = [r.data.metrics["test_top1"] for r in runs if "test_top1" in r.data.metrics]
    return statistics.mean(accs) if accs else None


def run(
    config: RunConfig,
    tracker: Tracker,
    on_epoch: Callable[[EpochLog], None] = lambda e: None,
    with_test: bool = True,
) -> Outcome:
    """Plan, get the teacher, train the student, record everything; return the outcome.

    Errors in the plan or the pair are raised before the student run is created; a failure
    during training marks the MLflow run FAILED with the reason and re-raises."""
    plan = make_plan(config, plugins.registry())
    device = engine.select_device(config.device)
    teacher = obtain_teacher(plan, device, tracker, on_epoch, with_test)
    extra = obtain_teachers(plan, device, tracker, on_epoch, with_test)
    setup = engine.setup_student(plan, teacher.net if teacher else None, device, [t.net for t in extra])
    method = plan.method_obj
    tags = {
        **base_tags(plan, device),
        "role": "student",
        "method": method.name,
        "student": plan.student_obj.name,
        "teacher": plan.teacher_obj.name if teacher else "",
        "config_hash": plan.config_hash(",".join([teacher.id] + [t.id for t in extra]) if teacher else None),
        "plugin.method": plan.method.source,
        "plugin.student": plan.student.source,
    }
    if teacher:
        tags.update({"teacher_run_id": teacher.run_id, "teacher_key": teacher.id,
                     "plugin.teacher": plan.teacher.source})
    tags.update(teacher_tags(plan, teacher, extra))
    tags["train_split_loaded"] = str(int(setup.info["train_split_loaded"]))
    name = f"{method.name}-{plan.student_obj.name}-s{config.seed}"
    run_id = tracker.start(plan.dataset_obj.name, name, tags, plan.params())

    def log(e: EpochLog):
        tracker.log_metrics(run_id, e.metrics, step=e.epoch)
        on_epoch(e)

    try:
        result = engine.run_student(plan, setup, device, log, with_test=with_test)
    except BaseException as exc:
        # An exception may say how its run ends (e.g. a pruned tuning trial: KILLED, tagged
        # trial_state=PRUNED) through marker attributes, so the runner needs no Optuna import.
        status = getattr(exc, "kdbench_run_status", None)
        if status is None:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            tags = {"trial_state": "FAILED"} if "mlflow.parentRunId" in config.tags else {}
        else:
            tags = dict(getattr(exc, "kdbench_run_tags", {}))
        if tags:
            tracker.set_tags(run_id, tags)
        tracker.finish(run_id, status, f"{type(exc).__name__}: {exc}")
        raise
    final = dict(result.metrics)
    vanilla = None
    if with_test and teacher is not None:
        final["teacher_test_top1"] = teacher.metrics.get("test_top1")
        vanilla = vanilla_reference(tracker, plan)
        if vanilla is not None:
            final["delta_vs_vanilla"] = final["test_top1"] - vanilla
            if final["teacher_test_top1"] is not None:
                final["gap_closed"] = metrics.gap_closed(final["test_top1"], vanilla, final["teacher_test_top1"])
    tracker.log_metrics(run_id, final)
    tracker.finish(run_id)
    return Outcome(plan, run_id, final, teacher, vanilla, result.curve)
