"""`kdbench tune`: an Optuna study over a method's search space (see kdbench.workflows.tune)."""
from __future__ import annotations

import click

from kdbench.cli.options import data_option_flags, data_options, tracking_option
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
@tracking_option
def tune_cmd(method, dataset, teacher, student, trials, epochs, tune_recipe, objective, pruner,
             storage, study_name, retrain, seeds, heartbeat, device, teacher_checkpoint, data_dir, data_opts,
             recipe_name, show_study, tracking_uri):
    """Tune a method's hyperparameters on the validation split with Optuna."""
    from kdbench.workflows import tune

    if show_study:
        click.echo(tune.show(show_study, storage, tracking_uri))
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
    )
    result = tune.run_study(config, echo=lambda line: click.echo(line, err=True))
    click.echo(result.report)


def _check_at_least_one(epochs: int | None, heartbeat: int) -> None:
    if epochs is not None and epochs < 1:
        raise KdbenchError(f"--epochs must be at least 1, got {epochs}")
    if heartbeat < 1:
        raise KdbenchError(f"--heartbeat must be at least 1 second, got {heartbeat}")
