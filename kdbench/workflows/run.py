"""One benchmark run, end to end: plan → teachers (:mod:`.teachers`) → student → MLflow.

This is the layer the CLI, tuning and leaderboards call. It owns the tracking of the student run
(tags, per-epoch and final metrics, the comparison with vanilla); the engine below it knows
nothing of MLflow or the teacher cache.
"""
from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from kdbench.core import engine, metrics, plugins
from kdbench.core.engine import EpochLog
from kdbench.core.plan import Plan, RunConfig, make_plan
from kdbench.core.precision import resolve_precision
from kdbench.workflows.provenance import base_tags, recipe_hash
from kdbench.workflows.teachers import Teacher, obtain_teacher, obtain_teachers, teacher_ids, teacher_tags
from kdbench.workflows.tracking import Tracker, ended_status, failure_reason


@dataclass(kw_only=True)
class Outcome:
    plan: Plan
    run_id: str
    metrics: dict
    teacher: Teacher | None
    vanilla_top1: float | None = None
    curve: list[float] = field(default_factory=list)
    student_artifact: str | None = None  # artifact path of the distilled student's weights
    baseline_run_id: str | None = None  # the vanilla run made for this one (run_baseline)


#: where a finished run keeps the distilled student (an MLflow artifact of the run)
STUDENT_ARTIFACT = "student/student.pt"


def save_student(tracker: Tracker, run_id: str, plan: Plan, result, config_hash: str) -> str:
    """Log the trained student (last epoch) as the run's artifact ``student/student.pt``:
    ``{"model": state_dict, "best_val_model": state_dict | None, "model_name", "dataset",
    "num_classes", "input_shape", "method", "config_hash"}``, loadable with
    ``torch.load(path, weights_only=True)`` and ``kdbench run --teacher-checkpoint`` (its
    ``model`` key). Returns the artifact path."""
    blob = {
        "model": result.state_dict,
        "best_val_model": result.best_state_dict,
        "model_name": plan.student_obj.name,
        "dataset": plan.dataset_obj.name,
        "num_classes": plan.dataset_obj.num_classes,
        "input_shape": list(plan.dataset_obj.input_shape),
        "method": plan.method_obj.name,
        "config_hash": config_hash,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(STUDENT_ARTIFACT).name
        torch.save(blob, path)
        tracker.client.log_artifact(run_id, str(path), artifact_path=str(Path(STUDENT_ARTIFACT).parent))
    return STUDENT_ARTIFACT


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
        status = ended_status(exc)
        tags = {"trial_state": "FAILED"} if "mlflow.parentRunId" in config.tags else {}
    else:
        tags = dict(getattr(exc, "kdbench_run_tags", {}))
    if tags:
        tracker.set_tags(run_id, tags)
    tracker.finish(run_id, status, failure_reason(exc))


def final_metrics(tracker: Tracker, plan: Plan, teacher: Teacher | None, measured: dict,
                  with_test: bool) -> tuple[dict, float | None]:
    """The student's ``measured`` metrics with the teacher's and vanilla comparisons added; and
    vanilla's top-1."""
    final = dict(measured)
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
    final, vanilla = final_metrics(tracker, plan, teacher, result.metrics, with_test)
    tracker.log_metrics(run_id, final)
    artifact = None
    if with_test and result.state_dict is not None:  # tuning trials keep no weights
        artifact = save_student(tracker, run_id, plan, result, tags["config_hash"])
    tracker.finish(run_id)
    return Outcome(plan=plan, run_id=run_id, metrics=final, teacher=teacher, vanilla_top1=vanilla,
                   curve=result.curve, student_artifact=artifact)


def needs_baseline(outcome: Outcome) -> bool:
    """True when a distilled run has nothing to compare with: no finished vanilla run of its
    dataset, student and recipe."""
    return outcome.vanilla_top1 is None and outcome.plan.method_obj.needs_teacher and \
        outcome.teacher is not None and "test_top1" in outcome.metrics


def baseline_command(outcome: Outcome) -> str:
    """The ``kdbench run`` that makes the missing baseline (what the summary suggests)."""
    config = outcome.plan.config
    parts = ["kdbench run --method vanilla", f"--dataset {outcome.plan.dataset_obj.name}",
             f"--student {outcome.plan.student_obj.name}", f"--seed {config.seed}"]
    if "epochs" in config.recipe:
        parts.append(f"--epochs {config.recipe['epochs']}")
    if config.recipe_name:
        parts.append(f"--recipe {config.recipe_name}")
    return " ".join(parts)


def run_baseline(outcome: Outcome, tracker: Tracker,
                 on_epoch: Callable[[EpochLog], None] = lambda e: None) -> Outcome:
    """Train vanilla (same dataset, student, recipe, seed, data options) as its own tracked run,
    then add the comparison to ``outcome``'s run (Δ vs vanilla, gap closed); returns the updated
    outcome. Later runs of the same student and recipe reuse this baseline."""
    config = outcome.plan.config
    vanilla_config = replace(config, method="vanilla", hparams={}, teacher=None, teacher_checkpoint=None,
                             teachers=(), tags={key: value for key, value in config.tags.items()
                                                if key != "mlflow.parentRunId"})
    made = run(vanilla_config, tracker, on_epoch=on_epoch)
    final, vanilla = final_metrics(tracker, outcome.plan, outcome.teacher, outcome.metrics, with_test=True)
    tracker.log_metrics(outcome.run_id, {key: final[key] for key in ("delta_vs_vanilla", "gap_closed") if key in final})
    return replace(outcome, metrics=final, vanilla_top1=vanilla, baseline_run_id=made.run_id)

