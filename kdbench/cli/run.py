"""`kdbench run`: train a student with a distillation method, show a progress bar per (network,
stage) while it trains and a summary table when it is done."""
from __future__ import annotations

import sys

import click

from kdbench.cli.options import (cpu_share, data_option_flags, data_options, engine_flags, open_tracker,
                                 parse_key_values, threads_option, tracking_option, writable_file)
from kdbench.errors import KdbenchError


@click.command("run")
@click.option("--method", "-m", default="kd", show_default=True,
              help="Distillation method (see `kdbench list methods`).")
@click.option("--dataset", "-d", default=None, help="Dataset [default: the embedded one].")
@click.option("--teacher", default=None, help="Teacher model [default: the dataset's].")
@click.option("--teachers", default="",
              help="Extra teachers, comma-separated (for methods using several, e.g. multi_teacher).")
@click.option("--student", default=None, help="Student model [default: the dataset's].")
@click.option("--epochs", type=int, default=None, help="Student epochs [default: the recipe's].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--teacher-seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu, cuda, cuda:N [default: CUDA if available].")
@click.option("--teacher-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Load the teacher from {'model': state_dict} or a bare state dict.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Method hyperparameter (repeatable).")
@data_option_flags()
@click.option("--recipe", "recipe_name", default=None, metavar="NAME|FILE.toml",
              help="Train the student with this recipe instead of the dataset's (e.g. cifar100-fast).")
@click.option("--params-from", "params_from", default=None, metavar="STUDY",
              help="Use the best params of a `kdbench tune` study (--set still wins).")
@click.option("--storage", default=None, help="Optuna storage of --params-from [default: as kdbench tune].")
@click.option("--baseline", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              envvar="KDBENCH_BASELINE",
              help="Train vanilla (same student, recipe and seed) when no vanilla run exists to compare with: "
                   "auto = on embedded datasets (seconds), always, or never (the summary then says how).")
@click.option("--save-student", "save_student", default=None, metavar="PATH",
              help="Also write the distilled student's weights here (always logged as the run's MLflow "
                   "artifact student/student.pt).")
@engine_flags
@threads_option
@tracking_option
def run_cmd(method, dataset, teacher, student, epochs, seed, teacher_seed, device,
            teacher_checkpoint, sets, data_dir, data_opts, recipe_name, params_from, storage, tracking_uri,
            teachers, baseline="auto", save_student=None, precision=None, capture=None, threads=None):
    """Train a student with a distillation method and record it in MLflow."""
    from kdbench.core.plan import RunConfig
    from kdbench.workflows.run import needs_baseline, run, run_baseline

    writable_file(save_student, "--save-student")
    hparams, recipe = {}, {}
    if params_from:
        hparams, recipe, tuned_student = _best_of_study(params_from, storage, tracking_uri, method)
        student = student or tuned_student
    hparams.update(parse_key_values(sets))
    if epochs is not None:
        if epochs < 1:
            raise KdbenchError(f"--epochs must be at least 1, got {epochs}")
        recipe["epochs"] = epochs
    config = RunConfig(
        method=method, dataset=dataset, teacher=teacher, student=student,
        hparams=hparams, recipe=recipe,
        seed=seed, teacher_seed=teacher_seed, device=device,
        teacher_checkpoint=teacher_checkpoint,
        data_options=data_options(data_dir, data_opts),
        teachers=tuple(name.strip() for name in teachers.split(",") if name.strip()),
        recipe_name=recipe_name, precision=precision, capture=capture,
    )
    tracker = open_tracker(tracking_uri)
    rebalance = cpu_share(threads)
    progress = Progress()
    on_epoch = lambda event: (rebalance(event), progress(event))  # noqa: E731
    try:
        outcome = run(config, tracker, on_epoch=on_epoch)
        if needs_baseline(outcome) and (baseline == "always" or (baseline == "auto" and outcome.plan.dataset_obj.embedded)):
            progress.close()
            click.echo("no vanilla run of this student and recipe to compare with: training it now "
                       "(--baseline never skips this)", err=True)
            outcome = run_baseline(outcome, tracker, on_epoch=on_epoch)
    finally:
        progress.close()
    if save_student and outcome.student_artifact:
        _copy_student(tracker, outcome, save_student)
    click.echo(summary(outcome, tracker.uri, save_student))


def _copy_student(tracker, outcome, path: str) -> None:
    """The run's student artifact, copied to ``path``."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = tracker.client.download_artifacts(outcome.run_id, outcome.student_artifact, tmp)
        shutil.copyfile(local, path)


def _best_of_study(study: str, storage, tracking_uri, method: str) -> tuple[dict, dict, str | None]:
    """``--params-from``: the hyperparameters, recipe and student of a tune study's best trial;
    the study must have tuned ``method``."""
    from kdbench.workflows.studies import best_params

    best = best_params(study, storage, tracking_uri)
    if best["method"] and best["method"] != method:
        raise KdbenchError(f"study {study!r} tuned method {best['method']!r}, not {method!r}; "
                           f"pass --method {best['method']}")
    return dict(best["hparams"]), dict(best["recipe"]), best["student"]


class Progress:
    """A progress bar per (network, stage), showing the latest validation accuracy."""

    def __init__(self):
        self.key = None
        self.bar = None

    def __call__(self, event):
        key = (event.role, event.stage)
        if key != self.key:
            self.close()
            self.key = key
            label = f"{event.role:<7} {event.stage}"
            self.bar = click.progressbar(length=event.epochs, label=label, show_pos=True, file=sys.stderr,
                                         item_show_func=lambda info: info)
            self.bar.__enter__()
        accuracy = event.metrics.get("val_top1")
        loss = next((value for name, value in event.metrics.items() if name.endswith("loss")), None)
        info = f"loss {loss:.3f}" + (f" val {100 * accuracy:.2f}%" if accuracy is not None else "")
        self.bar.update(1, info)

    def close(self):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
        self.key = None  # the next event opens a new bar, even for the same (role, stage)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _vanilla_cell(outcome) -> str:
    """Vanilla's mean test top-1, or how to get the missing baseline."""
    from kdbench.workflows.run import baseline_command, needs_baseline

    if outcome.vanilla_top1 is None and needs_baseline(outcome):
        return f"- (no vanilla run yet: {baseline_command(outcome)})"
    return _percent(outcome.vanilla_top1) + (f" (trained now: run {outcome.baseline_run_id})"
                                            if outcome.baseline_run_id else "")


def summary(outcome, uri: str, saved_to: str | None = None) -> str:
    """The table ``kdbench run`` prints: what ran, its accuracies, costs and MLflow run."""
    rows = _summary_rows(outcome, uri)
    if outcome.student_artifact:
        rows.insert(-1, ("student weights", f"MLflow artifact {outcome.student_artifact}"
                         + (f", and {saved_to}" if saved_to else "")))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _summary_rows(outcome, uri: str) -> list[tuple[str, str]]:
    metrics, plan, teacher = outcome.metrics, outcome.plan, outcome.teacher
    teachers = ("+".join([plan.teacher_obj.name] + [extra.obj.name for extra in plan.extra_teachers])
                if teacher else "(none)")
    delta, gap = metrics.get("delta_vs_vanilla"), metrics.get("gap_closed")
    rows = [
        ("method", f"{plan.method_obj.name} {plan.hp or ''}".strip()),
        ("dataset", plan.dataset_obj.name),
        ("teacher → student", f"{teachers} → {plan.student_obj.name}"),
        ("test top-1 (last epoch)", _percent(metrics.get("test_top1"))),
        ("test top-1 (best val epoch " + str(int(metrics["best_val_epoch"])) + ")",
         _percent(metrics.get("test_top1_bestval"))),
        ("test top-5 (last / best val)",
         f"{_percent(metrics.get('test_top5'))} / {_percent(metrics.get('test_top5_bestval'))}"),
        ("teacher test top-1", _percent(teacher.metrics.get("test_top1")) if teacher else "-"),
        ("vanilla test top-1 (mean)", _vanilla_cell(outcome)),
        ("Δ vs vanilla", "-" if delta is None else f"{100 * delta:+.2f} pts"),
        ("teacher gap closed", "-" if gap is None else f"{gap:.2f}"),
        ("epochs to 90/95/99 % of final",
         f"{metrics['epochs_to_90']} / {metrics['epochs_to_95']} / {metrics['epochs_to_99']}"),
        ("seconds to 95 % of final", f"{metrics['seconds_to_95']:.1f}"),
        ("val curve AUC (normalised)", f"{metrics['auc']:.4f}"),
        ("params student / extra / teacher",
         f"{metrics['params_student']:,} / {metrics['params_extra']:,} / {metrics['params_teacher']:,}"),
        ("FLOPs/sample student / teacher", f"{metrics['flops_student']:,} / {metrics.get('flops_teacher', 0):,}"),
        ("training time", f"{metrics['train_seconds']:.1f} s ({metrics['throughput']:.0f} samples/s)"),
        ("peak memory", f"{metrics['peak_mem_mb']:.0f} MB"),
        ("MLflow run", f"{outcome.run_id}  ({uri})"),
    ]
    peers = sorted((name for name in metrics if name.startswith("peer") and name.endswith("_test_top1")),
                   key=lambda name: int(name[4:-10]))
    if peers:
        rows.insert(4, ("peers' test top-1 (last epoch)", " / ".join(_percent(metrics[name]) for name in peers)))
    if not metrics.get("train_split_loaded", 1):
        rows.insert(4, ("training data", "synthesised by the method (train split never loaded)"))
    return rows
