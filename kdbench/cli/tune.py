"""`kdbench tune`: an Optuna study over a method's search space (see kdbench.workflows.tune)."""
from __future__ import annotations

import click

from kdbench.cli.options import (
    cpu_share, data_option_flags, data_options, engine_flags, executor_flags, threads_option, tracking_option,
)
from kdbench.errors import KdbenchError


@click.command("tune")
@click.option("--method", "-m", default="kd", show_default=True, help="Method whose search space is tuned.")
@click.option("--dataset", "-d", default=None, help="Dataset [default: the embedded one].")
@click.option("--teacher", default=None, help="Teacher model [default: the dataset's].")
@click.option("--student", default=None,
              help="Student model [default: the dataset's]; a comma list makes it a searched choice.")
@click.option("--trials", type=int, default=20, show_default=True,
              help="Budget of COMPLETE+PRUNED trials in the study, over all workers.")
@click.option("--epochs", type=int, default=None, help="Student epochs per trial [default: the recipe's].")
@click.option("--tune-recipe", is_flag=True, help="Also search recipe lr and weight_decay.")
@click.option("--objective", default="acc", show_default=True,
              help="acc (best val top-1), or acc,flops / acc,time (Pareto front).")
@click.option("--pruner", default="median", show_default=True, help="median, hyperband or none.")
@click.option("--storage", default=None,
              help="Optuna storage: [default: sqlite:///optuna.db next to mlflow.db], 'journal' "
                   "(file journal for several local workers) or a URL (postgresql://…).")
@click.option("--study", "study_name", default=None,
              help="Study name [default: dataset-teacher-student-method].")
@click.option("--retrain/--no-retrain", default=True, show_default=True,
              help="Retrain the best params with the test split and report test top-1.")
@click.option("--seeds", type=int, default=1, show_default=True, help="Retrain seeds (0 … N-1).")
@click.option("--heartbeat", type=int, default=30, show_default=True,
              help="Seconds between trial heartbeats; a trial silent for twice this is failed.")
@click.option("--device", default=None)
@click.option("--teacher-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Load the teacher from a checkpoint instead of the cache.")
@data_option_flags(option_help="A dataset option (repeatable).")
@click.option("--recipe", "recipe_name", default=None, metavar="NAME|FILE.toml",
              help="Tune with this recipe instead of the dataset's (e.g. cifar100-fast).")
@click.option("--show", "show_study", default=None, metavar="STUDY",
              help="Print a study's best params, trials and importances, and exit.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="With --executor ray: Optuna workers run as Ray tasks on the one study (use a "
                   "postgresql:// --storage across machines).")
@executor_flags
@engine_flags
@threads_option
@tracking_option
def tune_cmd(method, dataset, teacher, student, trials, epochs, tune_recipe, objective, pruner,
             storage, study_name, retrain, seeds, heartbeat, device, teacher_checkpoint, data_dir, data_opts,
             recipe_name, show_study, tracking_uri, precision=None, capture=None, threads=None, workers=1,
             executor="local", ray_address=None, runs_per_gpu=1):
    """Tune a method's hyperparameters on the validation split with Optuna."""
    import sys

    from kdbench.workflows import executors, studies, tune

    if show_study:
        click.echo(_study_text(studies.study_summary(show_study, storage, tracking_uri)))
        return
    _check_at_least_one(epochs, heartbeat)
    config = tune.TuneConfig(
        method=method, dataset=dataset, teacher=teacher,
        students=tuple(name.strip() for name in student.split(",") if name.strip()) if student else (),
        trials=trials, recipe={"epochs": epochs} if epochs else {}, tune_recipe=tune_recipe,
        objective=objective.replace(" ", ""), pruner=pruner, storage=storage, study=study_name,
        seeds=seeds, retrain=retrain, device=device, teacher_checkpoint=teacher_checkpoint,
        tracking_uri=tracking_uri, heartbeat=heartbeat,
        data_options=data_options(data_dir, data_opts), recipe_name=recipe_name,
        precision=precision, capture=capture, executor=executor, workers=workers, ray_address=ray_address,
        runs_per_gpu=runs_per_gpu,
    )
    try:
        result = tune.run_study(config, on_event=lambda event: click.echo(_event_line(event), err=True),
                                on_epoch=cpu_share(threads))
    except executors.ExecutorError as exc:  # a usage error: one line, exit 2, nothing recorded
        click.echo("error: " + " ".join(str(exc).split()), err=True)
        sys.exit(2)
    click.echo(_report(result))


def _check_at_least_one(epochs: int | None, heartbeat: int) -> None:
    if epochs is not None and epochs < 1:
        raise KdbenchError(f"--epochs must be at least 1, got {epochs}")
    if heartbeat < 1:
        raise KdbenchError(f"--heartbeat must be at least 1 second, got {heartbeat}")


def _event_line(event) -> str:
    """A progress line of ``tune.run_study`` (on stderr)."""
    from kdbench.workflows import tune

    if isinstance(event, tune.StudyOpened):
        return f"study {event.study!r} in {event.storage} (MLflow parent run {event.parent_run_id})"
    if isinstance(event, tune.WorkersStarted):
        return (f"{event.workers} Optuna workers on a Ray cluster of {event.nodes} node(s)"
                + (f"; dashboard {event.dashboard_url}" if event.dashboard_url else ""))
    if isinstance(event, tune.WorkerEnded):
        return f"worker {event.worker} ended: {event.trials} trials" + (f" (lost: {event.reason})" if event.reason else "")
    if isinstance(event, tune.DeadTrialsFailed):
        return f"trials {event.trials} of a dead worker marked FAIL (not counted)"
    values = "" if event.values is None else " ".join(f"{v:.4f}" for v in event.values)
    return (f"trial #{event.number:<3} {event.state:<8} {values:<16} {event.params}  {event.reason}  "
            f"[{event.counted}/{event.budget}]").rstrip()


def _report(result) -> str:
    """The study's outcome: counts, the Pareto front (several objectives), the best trial, the retrain."""
    lines = [f"{result.trials_counted} trials counted ({result.trials_failed} failed, "
             f"{result.trials_pruned} pruned); epochs trained {result.epochs_run} of {result.epochs_full}"
             + (f" ({100 * (1 - result.epochs_run / result.epochs_full):.0f} % saved by pruning)"
                if result.epochs_full else "")]
    best = result.best
    if best is None:
        return "\n".join(lines + ["no complete trial: nothing to retrain"])
    if result.objective != "acc":
        lines.append("Pareto front (val top-1 ↑, " + result.objective.split(",")[1] + " ↓):")
        lines += [f"  #{trial.number:<4} {trial.values[0]:.4f}  {trial.values[1]:,.1f}  {trial.params}"
                  for trial in result.pareto]
    lines.append(f"best trial #{best.number}: val top-1 {best.values[0]:.4f}  params {best.params}")
    if result.retrained:
        tests = result.retrain_test_top1
        if len(tests) == 1:  # one seed has no spread
            lines.append(f"retrained best params, test top-1 (seed 0): {100 * tests[0]:.2f} %")
        else:
            lines.append(f"retrained best params, test top-1 over {len(tests)} seeds: "
                         f"{100 * result.retrain_mean:.2f} ± {100 * result.retrain_std:.2f} %  ("
                         + ", ".join(f"{100 * x:.2f}" for x in tests) + ")")
    else:
        lines.append("(--no-retrain: test split not read; run `kdbench run --params-from "
                     f"{result.study_name}` for a test number)")
    return "\n".join(lines)


def _study_text(summary) -> str:
    """``--show``: the best trial, the trials table and the parameter importances."""
    import pandas as pd

    lines = [f"study {summary.name!r} in {summary.storage}: method {summary.method}, {summary.n_trials} trials"]
    best = summary.best
    if best is None:
        lines.append("best: (no complete trial)")
    else:
        lines.append(f"best trial #{best.number}: values {[round(v, 4) for v in best.values]}  params {best.params}")
    if summary.trials.empty:
        lines.append("trials: none yet")
    else:
        with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
            lines.append(summary.trials.to_string(index=False))
    if summary.complete_trials < 2:
        lines.append("importances: need at least 2 complete trials")
    elif summary.importances_error:
        lines.append(f"importances: unavailable ({summary.importances_error})")
    else:
        lines.append("importances: " + (", ".join(f"{k} {v:.3f}" for k, v in summary.importances.items()) or "-"))
    return "\n".join(lines)
