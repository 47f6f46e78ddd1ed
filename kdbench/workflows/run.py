"""One benchmark run, end to end: plan → teachers (:mod:`.teachers`) → student → MLflow.

This is the layer the CLI, tuning and leaderboards call. It owns the tracking of the student run
(tags, per-epoch and final metrics, the comparison with vanilla); the engine below it knows
nothing of MLflow or the teacher cache.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

from kdbench.core import engine, metrics, plugins
from kdbench.core.engine import EpochLog
from kdbench.core.plan import Plan, RunConfig, make_plan
from kdbench.core.precision import resolve_precision
from kdbench.workflows.provenance import base_tags, recipe_hash
from kdbench.workflows.teachers import Teacher, obtain_teacher, obtain_teachers, teacher_ids, teacher_tags
from kdbench.workflows.tracking import Tracker, failure_reason


@dataclass(kw_only=True)
class Outcome:
    plan: Plan
    run_id: str
    metrics: dict
    teacher: Teacher | None
    vanilla_top1: float | None = None
    curve: list[float] = field(default_factory=list)


def vanilla_reference(tracker: Tracker, plan: Plan) -> float | None:
    """Mean test top-1 of finished vanilla runs with the same dataset, student and recipe."""
    runs = tracker.search(
        plan.dataset_obj.name,
        "tags.role = 'student' AND tags.method = 'vanilla' AND attributes.status = 'FINISHED' AND "
        f"tags.student = '{plan.student_obj.name}' AND tags.recipe_hash = '{recipe_hash(plan)}'",
    )
    accs = [r.data.metrics["test_top1"] for r in runs if "test_top1" in r.data.metrics]
    return statistics.mean(accs) if accs else None


def student_tags(plan: Plan, device, teacher: Teacher | None, extra: list[Teacher], setup) -> dict:
    """The student run's tags: provenance, names, plugin sources, config hash and its teachers."""
    tags = {
        **base_tags(plan, device),
        "role": "student",
        "method": plan.method_obj.name,
        "student": plan.student_obj.name,
        "teacher": plan.teacher_obj.name if teacher else "",
        "config_hash": plan.config_hash(teacher_ids(teacher, extra)),
        "plugin.method": plan.method.source,
        "plugin.student": plan.student.source,
    }
    if teacher:
        tags.update({"teacher_run_id": teacher.run_id, "teacher_key": teacher.id,
                     "plugin.teacher": plan.teacher.source})
    tags.update(teacher_tags(plan, teacher, extra))
    tags["train_split_loaded"] = str(int(setup.info["train_split_loaded"]))
    tags["precision"] = resolve_precision(plan.config.precision, device)
    return tags


def end_failed_run(tracker: Tracker, run_id: str, config: RunConfig, exc: BaseException) -> None:
    """End the run of a student that raised: FAILED, KILLED (Ctrl-C), or as the exception says.

    An exception may say how its run ends (e.g. a pruned tuning trial: KILLED, tagged
    trial_state=PRUNED) through marker attributes, so the runner needs no Optuna import."""
    status = getattr(exc, "kdbench_run_status", None)
    if status is None:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        tags = {"trial_state": "FAILED"} if "mlflow.parentRunId" in config.tags else {}
    else:
        tags = dict(getattr(exc, "kdbench_run_tags", {}))
    if tags:
        tracker.set_tags(run_id, tags)
    tracker.finish(run_id, status, failure_reason(exc))


def final_metrics(tracker: Tracker, plan: Plan, teacher: Teacher | None, result,
                  with_test: bool) -> tuple[dict, float | None]:
    """The student's final metrics with the teacher's and vanilla comparisons; and vanilla's top-1."""
    final = dict(result.metrics)
    if not with_test or teacher is None:
        return final, None
    final["teacher_test_top1"] = teacher.metrics.get("test_top1")
    vanilla = vanilla_reference(tracker, plan)
    if vanilla is not None:
        final["delta_vs_vanilla"] = final["test_top1"] - vanilla
        if final["teacher_test_top1"] is not None:
            final["gap_closed"] = metrics.gap_closed(final["test_top1"], vanilla, final["teacher_test_top1"])
    return final, vanilla


def run(
    config: RunConfig,
    tracker: Tracker,
    on_epoch: Callable[[EpochLog], None] = lambda e: None,
    with_test: bool = True,
    run_id: str | None = None,
) -> Outcome:
    """Plan, get the teacher, train the student, record everything; return the outcome.

    Errors in the plan or the pair are raised before the student run is created; a failure
    during training marks the MLflow run FAILED with the reason and re-raises. ``run_id``: a
    RUNNING run claimed beforehand (a suite's cell, :meth:`Tracker.claim`) to record into."""
    plan = make_plan(config, plugins.registry())
    device = engine.select_device(config.device)
    teacher = obtain_teacher(plan, device, tracker, on_epoch, with_test)
    extra = obtain_teachers(plan, device, tracker, on_epoch, with_test)
    setup = engine.setup_student(plan, teacher.net if teacher else None, device, [other.net for other in extra])
    tags = student_tags(plan, device, teacher, extra, setup)
    name = f"{plan.method_obj.name}-{plan.student_obj.name}-s{config.seed}"
    if run_id is None:
        run_id = tracker.start(plan.dataset_obj.name, name, tags, plan.params())
    else:
        tracker.fill(run_id, tags, plan.params())
    try:
        result = engine.run_student(plan, setup, device, tracker.epoch_logger(run_id, on_epoch),
                                    with_test=with_test)
    except BaseException as exc:
        end_failed_run(tracker, run_id, config, exc)
        raise
    if result.tags:  # e.g. capture=eager-fallback: how the engine actually ran the steps
        tracker.set_tags(run_id, result.tags)
    final, vanilla = final_metrics(tracker, plan, teacher, result, with_test)
    tracker.log_metrics(run_id, final)
    tracker.finish(run_id)
    return Outcome(plan=plan, run_id=run_id, metrics=final, teacher=teacher, vanilla_top1=vanilla,
                   curve=result.curve)
