"""Teachers of a run: from a checkpoint file, from the teacher cache, or trained now (and cached),
each with its own MLflow run (tag ``role=teacher``) that later runs find by the teacher's id.

A trained teacher's weights are also an artifact of its run (``teacher/<key>.pt``), so a worker on
another machine, whose cache lacks them, fetches them from the tracking server; the local cache
stays in front (:func:`cached_teacher` looks there first).

A teacher's id is its cache key (:meth:`Plan.teacher_key`), or ``ckpt:<16 hex digits of the
checkpoint's sha256>`` for a checkpoint file.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kdbench.core import engine, metrics
from kdbench.core.plan import Plan
from kdbench.core.precision import resolve_precision
from kdbench.core.splits import load_split
from kdbench.data import cache_dir, file_digest
from kdbench.errors import KdbenchError
from kdbench.workflows.provenance import base_tags
from kdbench.workflows.tracking import Tracker, ended_status, failure_reason

log = logging.getLogger("kdbench")

CHECKPOINT_PREFIX = "ckpt:"
CHECKPOINT_ID_DIGITS = 16  # of the checkpoint's sha256
WEIGHTS_FOLDER = "teacher"  # the artifact folder of a trained teacher's weights


@dataclass(kw_only=True)
class Teacher:
    net: torch.nn.Module
    id: str  # cache key, or "ckpt:<sha>" for a checkpoint file
    run_id: str
    metrics: dict


def checkpoint_id(sha256_hex: str) -> str:
    """The teacher id of a checkpoint file with this sha256 (hex)."""
    return CHECKPOINT_PREFIX + sha256_hex[:CHECKPOINT_ID_DIGITS]


def checkpoint_sha256(path: str | Path) -> str:
    return file_digest(path, "sha256")


def teacher_cache_path(key: str) -> Path:
    return cache_dir() / "teachers" / f"{key}.pt"


# --------------------------------------------------------------------------- MLflow runs


def find_teacher_run(tracker: Tracker, plan: Plan, teacher_id: str) -> str | None:
    """The FINISHED MLflow run of the teacher with this id, if there is one."""
    runs = tracker.search(
        plan.dataset_obj.name,
        f"tags.role = 'teacher' AND tags.teacher_key = '{teacher_id}' AND attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def start_teacher_run(tracker: Tracker, plan: Plan, device, teacher_id: str, source: str) -> str:
    """A teacher's own MLflow run: tagged with its cache key or checkpoint id and its source."""
    tags = {**base_tags(plan, device), "role": "teacher", "teacher_key": teacher_id,
            "model": plan.teacher_obj.name, "teacher": plan.teacher_obj.name,
            "plugin.model": plan.teacher.source, "source": source, "seed": plan.config.teacher_seed,
            "precision": resolve_precision(plan.config.precision, device)}
    params = {f"recipe.{k}": v for k, v in plan.teacher_recipe.as_dict().items()}
    return tracker.start(plan.dataset_obj.name, f"teacher-{plan.teacher_obj.name}", tags, params)


def log_teacher_run(tracker: Tracker, plan: Plan, device, teacher_id: str, source: str,
                    teacher_metrics: dict, curve=()) -> str:
    """A finished teacher run for a teacher that was not trained now (checkpoint or cache)."""
    run_id = start_teacher_run(tracker, plan, device, teacher_id, source)
    for epoch, acc in enumerate(curve, 1):
        tracker.log_metrics(run_id, {"val_top1": acc}, step=epoch)
    tracker.log_metrics(run_id, teacher_metrics)
    tracker.finish(run_id)
    return run_id


# --------------------------------------------------------------------------- the three sources


def checkpoint_teacher(plan: Plan, device, tracker: Tracker, with_test: bool = True) -> Teacher:
    """The teacher loaded from ``config.teacher_checkpoint``, evaluated on val (and test)."""
    path = plan.config.teacher_checkpoint
    if not Path(path).is_file():
        raise KdbenchError(f"teacher checkpoint {path!r} does not exist")
    net = engine.build_teacher(plan, device)
    engine.load_checkpoint(net, path, f"teacher {plan.teacher_obj.name!r}")
    net.eval().requires_grad_(False)
    teacher_id = checkpoint_id(checkpoint_sha256(path))
    run_id = find_teacher_run(tracker, plan, teacher_id)
    teacher_metrics = _evaluate_teacher(plan, net, device, with_test)
    if run_id is None:
        run_id = log_teacher_run(tracker, plan, device, teacher_id, "checkpoint", teacher_metrics)
    return Teacher(net=net, id=teacher_id, run_id=run_id, metrics=teacher_metrics)


def _evaluate_teacher(plan: Plan, net, device, with_test: bool) -> dict:
    def top(split: str) -> dict:
        data = load_split(plan.dataset_obj, split, device, plan.config.data_options)
        return engine.evaluate(net, data, plan.recipe.eval_batch_size, device, plan.config.precision)

    teacher_metrics = {"val_top1": top("val")["top1"]}
    if with_test:
        test = top("test")
        teacher_metrics.update(test_top1=test["top1"], test_top5=test["top5"])
    teacher_metrics["params"] = metrics.count_params(net)
    return teacher_metrics


def cached_teacher(plan: Plan, device, tracker: Tracker) -> Teacher | None:
    """The teacher from the cache (None when it is not cached); a run is logged if it has none."""
    key = plan.teacher_key()
    path = teacher_cache_path(key)
    if not path.exists() and not fetch_teacher_weights(plan, tracker, key):
        return None
    net = engine.build_teacher(plan, device)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(blob["model"])
    except Exception as exc:  # damaged (truncated, garbage, another net's weights): set aside, retrain
        set_aside(path, engine.unreadable_reason(exc) if not isinstance(exc, (KeyError, TypeError, RuntimeError))
                  else f"not this teacher's weights ({type(exc).__name__})", "the teacher is trained again")
        return None
    net.eval().requires_grad_(False)
    teacher_metrics = dict(blob.get("metrics", {}))
    run_id = find_teacher_run(tracker, plan, key)
    if run_id is None:
        run_id = log_teacher_run(tracker, plan, device, key, "cache", teacher_metrics, blob.get("curve", []))
    return Teacher(net=net, id=key, run_id=run_id, metrics=teacher_metrics)


def set_aside(path: Path, reason: str, then: str) -> Path:
    """Rename a damaged cache file to ``<name>.damaged-<time>`` (kept for a look, never read again)
    and say so in one line."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        path.replace(aside)
    except FileNotFoundError:  # another process set it aside first
        pass
    log.warning("damaged cache file %s (%s): moved to %s; %s", path, reason, aside.name, then)
    return aside


def trained_teacher(plan: Plan, device, tracker: Tracker, on_epoch) -> Teacher:
    """Train the teacher now (its run records every epoch), then put it in the cache."""
    key = plan.teacher_key()
    run_id = start_teacher_run(tracker, plan, device, key, "trained")
    try:
        net, result = engine.run_teacher(plan, device, tracker.epoch_logger(run_id, on_epoch))
    except BaseException as exc:
        tracker.finish(run_id, ended_status(exc), failure_reason(exc))
        raise
    teacher_metrics = dict(result.metrics)
    tracker.log_metrics(run_id, teacher_metrics)
    try:  # the weights go with the run: a FINISHED teacher run always has them
        tracker.client.log_artifact(run_id, str(_save_to_cache(key, result, teacher_metrics)), WEIGHTS_FOLDER)
    except BaseException as exc:
        tracker.finish(run_id, ended_status(exc), failure_reason(exc))
        raise
    tracker.finish(run_id)
    return Teacher(net=net, id=key, run_id=run_id, metrics=teacher_metrics)


def fetch_teacher_weights(plan: Plan, tracker: Tracker, key: str) -> bool:
    """Put the weights of the teacher ``key`` into the cache from its FINISHED MLflow run (trained
    on another machine); False when no run has them."""
    import tempfile

    run_id = find_teacher_run(tracker, plan, key)
    if run_id is None:
        return False
    path = teacher_cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        try:
            local = tracker.client.download_artifacts(run_id, f"{WEIGHTS_FOLDER}/{path.name}", tmp)
        except Exception:  # a run logged before weights were artifacts, or from a cache elsewhere
            return False
        Path(local).replace(path)
    return True


def _save_to_cache(key: str, result, teacher_metrics: dict) -> Path:
    """Write atomically: a temporary file renamed into place; its path."""
    path = teacher_cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    state = {name: tensor.cpu() for name, tensor in result.state_dict.items()}
    torch.save({"model": state, "metrics": teacher_metrics, "curve": result.curve, "key": key}, tmp)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- a run's teachers


def obtain_teacher(plan: Plan, device, tracker: Tracker, on_epoch, with_test: bool = True) -> Teacher | None:
    """The plan's trained teacher: from a checkpoint file, the cache, or trained now (and cached)."""
    if plan.teacher is None:
        return None
    if plan.config.teacher_checkpoint:
        return checkpoint_teacher(plan, device, tracker, with_test)
    return cached_teacher(plan, device, tracker) or trained_teacher(plan, device, tracker, on_epoch)


def obtain_teachers(plan: Plan, device, tracker: Tracker, on_epoch, with_test: bool = True) -> list[Teacher]:
    """The plan's extra teachers (``RunConfig.teachers``), each obtained like the main one:
    from the cache, or trained now and cached (one teacher run each)."""
    return [obtain_teacher(plan.for_teacher(entry), device, tracker, on_epoch, with_test)
            for entry in plan.extra_teachers]


def teacher_ids(teacher: Teacher | None, extra: list[Teacher]) -> str | None:
    """The teacher id a student run's config hash includes: the ids of all its teachers."""
    return ",".join([teacher.id] + [other.id for other in extra]) if teacher else None


def teacher_tags(plan: Plan, teacher: Teacher | None, extra: list[Teacher]) -> dict:
    """Tags naming every teacher of a run with extra teachers (nothing for one teacher)."""
    if not extra:
        return {}
    names = [plan.teacher_obj.name] + [entry.obj.name for entry in plan.extra_teachers]
    return {"teachers": ",".join(names), "teacher_keys": teacher_ids(teacher, extra),
            "teacher_run_ids": ",".join([teacher.run_id] + [other.run_id for other in extra])}
