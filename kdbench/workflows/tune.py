"""Hyperparameter tuning: an Optuna study over a method's declared search space.

* Objective: the **best validation top-1** over the main-stage epochs of a trial (the same number
  ``best_val_top1`` that every run records). The test split is never read by a trial
  (``runner.run(..., with_test=False)``); only the retrain of the best parameters reads it.
  (The teacher is fixed, not tuned: it is trained or taken from the cache before the study.)
* Pruning: each main-stage epoch reports ``val_top1``; the pruner (median by default) may stop
  the trial, whose MLflow run then ends KILLED with tag ``trial_state=PRUNED``.
* Storage (:mod:`.studies`): ``sqlite:///optuna.db`` next to the MLflow store by default,
  ``journal``, or any Optuna storage URL. Studies resume; a worker killed mid-trial leaves a
  RUNNING trial that the heartbeat marks FAIL once stale, so it is not counted. The trial budget
  (``--trials``) counts COMPLETE and PRUNED trials over all workers.
* MLflow: the study is a parent run (tag ``role=study``); each trial is a nested student run
  (tag ``mlflow.parentRunId``) with its parameters, per-epoch metrics and ``trial_state``.

Progress is reported as events (:class:`StudyOpened`, :class:`DeadTrialsFailed`,
:class:`TrialFinished`) passed to ``on_event``; the outcome is a :class:`TuneResult`.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kdbench.core import engine, plugins
from kdbench.core.plan import RunConfig, make_plan, resolve_method
from kdbench.errors import KdbenchError, closest
from kdbench.workflows import claims, interrupts, run as runner
from kdbench.workflows.studies import (
    RECIPE_PREFIX, STALE_REASON, JournalHeartbeat, count_trials, fail_stale_trials, mask_url,
    open_storage, pick_best, split_params, storage_url, stored_user_attr,
)
from kdbench.workflows.teachers import obtain_teacher
from kdbench.workflows.tracking import Tracker, default_tracking_uri

OBJECTIVES = ("acc", "acc,flops", "acc,time")
PRUNERS = ("median", "hyperband", "none")
STUDY_ROLE = "study"
OVER_BUDGET = "over budget"
WAIT_SECONDS = 1.0  # between looks at other workers' running trials
MAX_FAILED_IN_A_ROW = 5


@dataclass(kw_only=True)
class TuneConfig:
    method: str = "kd"
    dataset: str | None = None
    teacher: str | None = None
    students: tuple[str, ...] = ()  # several: the student is a categorical parameter
    trials: int = 20
    recipe: dict[str, Any] = field(default_factory=dict)  # fixed overrides, e.g. {"epochs": 3}
    tune_recipe: bool = False  # also search recipe lr and weight_decay
    objective: str = "acc"
    pruner: str = "median"
    storage: str | None = None
    study: str | None = None
    seeds: int = 1  # retrain seeds 0 … seeds-1
    retrain: bool = True
    device: str | None = None
    teacher_checkpoint: str | None = None
    tracking_uri: str | None = None
    heartbeat: int = 30  # seconds; a RUNNING trial silent for 2× this is failed
    sampler_seed: int | None = None
    data_options: dict[str, Any] = field(default_factory=dict)  # the dataset's load options
    recipe_name: str | None = None  # a named recipe replacing the dataset's (RunConfig.recipe_name)
    precision: str | None = None  # RunConfig.precision
    capture: str | None = None  # RunConfig.capture
    executor: str = "local"  # ray: ``workers`` Optuna workers as Ray tasks on the one study
    workers: int = 1
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray instance
    runs_per_gpu: int = 1

    @property
    def multi_objective(self) -> bool:
        return self.objective != "acc"


@dataclass(kw_only=True)
class TuneResult:
    study: Any
    study_name: str
    parent_run_id: str
    objective: str
    best: Any  # FrozenTrial | None
    epochs_run: int
    epochs_full: int  # trials × epochs had nothing been pruned
    trials_counted: int  # COMPLETE + PRUNED
    trials_failed: int
    trials_pruned: int
    pareto: list = field(default_factory=list)  # multi-objective: the front, highest accuracy first
    retrained: bool = False  # the best params were retrained (and tested)
    retrain: list = field(default_factory=list)  # runner Outcomes, one per seed
    retrain_test_top1: list[float] = field(default_factory=list)
    retrain_mean: float | None = None
    retrain_std: float | None = None


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, kw_only=True)
class StudyOpened:
    study: str
    storage: str  # the storage URL, password masked
    parent_run_id: str


@dataclass(frozen=True, kw_only=True)
class DeadTrialsFailed:
    """Trials of a dead worker were marked FAIL (not counted)."""
    trials: list[int]


@dataclass(frozen=True, kw_only=True)
class WorkersStarted:
    """``--executor ray``: the Optuna workers were submitted as Ray tasks."""
    workers: int
    nodes: int
    dashboard_url: str | None


@dataclass(frozen=True, kw_only=True)
class WorkerEnded:
    """A Ray worker of the study ended: how many trials it ran, or why it was lost."""
    worker: int
    trials: int
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class TrialFinished:
    """One of this worker's trials ended (COMPLETE, PRUNED or FAIL)."""
    number: int
    state: str
    values: list[float] | None
    params: dict
    reason: str  # fail or prune reason, "" if none
    counted: int  # trials counted in the study so far
    budget: int


def _ignore(event) -> None:
    pass


class _Pruned(Exception):
    """Raised through the runner when the pruner stops a trial; carries the run's end state.

    The runner only knows the marker attributes (it imports no Optuna); :func:`run_study`
    turns this into ``optuna.TrialPruned``."""

    kdbench_run_status = "KILLED"
    kdbench_run_tags = {"trial_state": "PRUNED"}


class _OverBudget(Exception):
    pass


# --------------------------------------------------------------------------- the search


def validate(cfg: TuneConfig, reg) -> None:
    if cfg.trials < 1:
        raise KdbenchError(f"--trials must be at least 1, got {cfg.trials}")
    if cfg.objective not in OBJECTIVES:
        raise KdbenchError(f"--objective {cfg.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if cfg.pruner not in PRUNERS:
        raise KdbenchError(f"--pruner {cfg.pruner!r} is not one of {', '.join(PRUNERS)}")
    if cfg.seeds < 1:
        raise KdbenchError(f"--seeds must be at least 1, got {cfg.seeds}")
    if "+" in cfg.method:
        resolve_method(cfg.method, reg)  # a combination: each part registered, or one line says which is not
    elif cfg.method not in reg.methods and (":" in cfg.method or ("methods", cfg.method) in reg.contested):
        reg.entry("methods", cfg.method)  # DIST:NAME resolves, or one line says why not
    elif cfg.method not in reg.methods:
        broken = [failure.line() for failure in reg.failures]
        hint = f"; broken plugins: {'; '.join(broken)}" if broken else ""
        raise KdbenchError(
            f"unknown method {cfg.method!r}{closest(cfg.method, reg.methods)} "
            f"(see `kdbench list methods`){hint}"
        )


def default_study_name(cfg: TuneConfig, plan) -> str:
    students = "+".join(cfg.students) if len(cfg.students) > 1 else plan.student_obj.name
    teacher = plan.teacher_obj.name if plan.teacher else "none"
    name = f"{plan.dataset_obj.name}-{teacher}-{students}-{plan.method_obj.name}"
    if cfg.tune_recipe:
        name += "-recipe"
    if cfg.objective != "acc":
        name += "-" + cfg.objective.replace(",", "-")
    return name


def make_pruner(name: str, epochs: int = 4):
    """The pruner; the median pruner waits a quarter of the epochs, since the first epochs'
    validation accuracy says little about the final one (pruning at epoch 1 pruned at random)."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, epochs // 4))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def suggest(trial, method, base_recipe, tune_recipe: bool, students: tuple[str, ...]) -> tuple[dict, dict, str | None]:
    """Sample the method's space (and recipe knobs): (hparams, recipe overrides, student)."""
    hparams = {hp.name: hp.suggest(trial) for hp in method.search_space()}
    recipe = {}
    if tune_recipe:
        lr = base_recipe.lr
        recipe["lr"] = trial.suggest_float(RECIPE_PREFIX + "lr", lr / 10, lr * 10, log=True)
        recipe["weight_decay"] = trial.suggest_float(RECIPE_PREFIX + "weight_decay", 1e-6, 1e-2, log=True)
    student = trial.suggest_categorical("student", list(students)) if len(students) > 1 else None
    return hparams, recipe, student


def make_epoch_callback(trial, counter: dict | None = None, pruning: bool = True) -> Callable:
    """on_epoch for runner.run: report main-stage student val_top1, prune when told."""

    def on_epoch(e):
        if e.role != "student" or e.stage != "main":
            return
        acc = e.metrics.get("val_top1")
        if counter is not None:
            counter["epochs"] = counter.get("epochs", 0) + 1
        trial.set_user_attr("epochs_run", e.epoch)
        if acc is None or not pruning:
            return
        trial.report(float(acc), e.epoch)
        if trial.should_prune():
            raise _Pruned(f"pruned at epoch {e.epoch} (val top-1 {acc:.4f})")

    return on_epoch


# --------------------------------------------------------------------------- the study and its parent run


def _plan_study(cfg: TuneConfig, reg) -> tuple[RunConfig, Any]:
    """The trials' base RunConfig and its plan: bad names and recipes fail here, before any study exists."""
    validate(cfg, reg)
    students = tuple(cfg.students)
    base = RunConfig(method=cfg.method, dataset=cfg.dataset, teacher=cfg.teacher,
                     student=students[0] if students else None, recipe=dict(cfg.recipe),
                     device=cfg.device, teacher_checkpoint=cfg.teacher_checkpoint,
                     data_options=dict(cfg.data_options), recipe_name=cfg.recipe_name,
                     precision=cfg.precision, capture=cfg.capture)
    plan = make_plan(base, reg)
    for student in students[1:]:
        reg.entry("models", student)
    if not plan.method_obj.search_space() and not cfg.tune_recipe and len(students) < 2:
        raise KdbenchError(f"method {cfg.method!r} declares no search space; add --tune-recipe to tune lr and weight_decay")
    return base, plan


def _open_study(cfg: TuneConfig, plan, storage, name: str):
    """Create or resume the study; a stored study of another method is refused."""
    import optuna

    multi = cfg.multi_objective
    directions = ["maximize", "minimize"] if multi else ["maximize"]
    sampler = (optuna.samplers.NSGAIISampler(seed=cfg.sampler_seed) if multi
               else optuna.samplers.TPESampler(seed=cfg.sampler_seed))
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, directions=directions, load_if_exists=True,
            sampler=sampler, pruner=make_pruner("none" if multi else cfg.pruner, plan.recipe.epochs),
        )
    except ValueError as exc:  # e.g. directions differ from the stored study
        raise KdbenchError(f"study {name!r}: {exc}") from None
    settings = study_settings(cfg, plan)
    if "method" not in study.user_attrs:
        study.set_user_attr("method", plan.method_obj.name)
        study.set_user_attr("dataset", plan.dataset_obj.name)
        study.set_user_attr("recipe", dict(cfg.recipe))
        study.set_user_attr("settings", settings)
    elif study.user_attrs["method"] != plan.method_obj.name:
        raise KdbenchError(f"study {name!r} tunes method {study.user_attrs['method']!r}, not {plan.method_obj.name!r}")
    else:
        _check_same_settings(study, settings, name)
    return study


#: what a study's trials must share to be compared (the budget, retrain seeds, device may change)
SETTING_NAMES = {"dataset": "--dataset", "teacher": "--teacher", "students": "--student",
                 "recipe.epochs": "--epochs", "tune_recipe": "--tune-recipe", "pruner": "--pruner",
                 "recipe_name": "--recipe", "teacher_checkpoint": "--teacher-checkpoint",
                 "data_options": "--data-option"}


def study_settings(cfg: TuneConfig, plan) -> dict:
    """The settings a resumed study must be run with again, as JSON-able values."""
    settings = {"dataset": plan.dataset_obj.name, "teacher": plan.teacher_obj.name if plan.teacher else None,
                "students": list(cfg.students) or [plan.student_obj.name], "tune_recipe": cfg.tune_recipe,
                "pruner": cfg.pruner, "recipe_name": cfg.recipe_name, "teacher_checkpoint": cfg.teacher_checkpoint,
                "data_options": {k: str(v) for k, v in sorted(cfg.data_options.items())}}
    settings.update({f"recipe.{k}": (list(v) if isinstance(v, tuple) else v) for k, v in sorted(cfg.recipe.items())})
    return settings


def _check_same_settings(study, settings: dict, name: str) -> None:
    """Refuse to mix trials run with other settings into a study (its comparisons would be wrong)."""
    stored = study.user_attrs.get("settings")
    if stored is None:  # a study from before settings were stored: its recipe overrides only
        stored = {f"recipe.{k}": v for k, v in study.user_attrs.get("recipe", {}).items()}
        settings = {k: v for k, v in settings.items() if k.startswith("recipe.")}
    differ = [key for key in sorted(set(stored) | set(settings)) if stored.get(key) != settings.get(key)]
    if differ:
        parts = [f"{SETTING_NAMES.get(key, key)} {_shown(stored.get(key))} (now {_shown(settings.get(key))})"
                 for key in differ]
        raise KdbenchError(f"study {name!r} was run with {', '.join(parts)}; resume it with the same settings "
                           "or pass another --study")


def _shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _parent_run(study, tracker, dataset: str, cfg: TuneConfig, url: str) -> str:
    key = "mlflow_parent_run_id"
    run_id = study.user_attrs.get(key)
    if run_id and tracker.run_exists(run_id):
        tracker.adopt(run_id)
        return run_id
    run_id = tracker.start(
        dataset, f"tune-{study.study_name}",
        {"role": STUDY_ROLE, "study": study.study_name, "optuna_storage": mask_url(url),
         "method": cfg.method, "objective": cfg.objective},
        {"trials": cfg.trials, "pruner": cfg.pruner, "tune_recipe": cfg.tune_recipe},
    )
    study.set_user_attr(key, run_id)
    stored = stored_user_attr(study, key)
    if stored and stored != run_id and tracker.run_exists(stored):  # another worker won the race
        tracker.client.delete_run(run_id)
        return stored
    return run_id


def _close_dead_runs(tracker, dataset: str, study_name: str, numbers: list[int]) -> None:
    """The MLflow runs of trials failed for a dead worker: end them KILLED, trial_state=FAILED."""
    for number in numbers:
        for r in tracker.search(dataset, f"tags.study = '{study_name}' AND tags.trial = '{number}' "
                                         "AND attributes.status = 'RUNNING'"):
            tracker.set_tags(r.info.run_id, {"trial_state": "FAILED"})
            tracker.finish(r.info.run_id, "KILLED", STALE_REASON)


# --------------------------------------------------------------------------- one trial


@dataclass(kw_only=True)
class _Objective:
    """Optuna's objective: one trial is one nested, validation-only student run."""
    cfg: TuneConfig
    study: Any
    plan: Any
    base: RunConfig
    tracker: Tracker
    parent: str
    name: str
    journal: bool  # the storage is a journal: the trial needs our heartbeat
    on_epoch: Callable
    counter: dict = field(default_factory=lambda: {"epochs": 0})

    def __call__(self, trial):
        for key, value in claims.owner_tags().items():  # a dead worker's trial is failed at once
            trial.set_user_attr(key, value)
        self._check_budget(trial)
        outcome = self._run(trial, self._trial_config(trial))
        return self._record(trial, outcome.run_id, outcome.metrics)

    def _check_budget(self, trial) -> None:
        """Budget across workers: trials before this one that count or may still count."""
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        ahead = [other for other in self.study.get_trials(deepcopy=False, states=states)
                 if other.number < trial.number]
        if len(ahead) >= self.cfg.trials:
            trial.set_user_attr("fail_reason", f"{OVER_BUDGET}: other workers filled it")
            raise _OverBudget()

    def _trial_config(self, trial) -> RunConfig:
        hparams, recipe, student = suggest(trial, self.plan.method_obj, self.plan.recipe, self.cfg.tune_recipe,
                                           tuple(self.cfg.students))
        return replace(
            self.base, hparams=hparams, recipe={**self.cfg.recipe, **recipe}, student=student or self.base.student,
            tags={"mlflow.parentRunId": self.parent, "study": self.name, "trial": trial.number},
        )

    def _run(self, trial, config: RunConfig):
        import optuna

        report = make_epoch_callback(trial, self.counter, pruning=not self.cfg.multi_objective)

        def on_epoch(e):
            report(e)
            self.on_epoch(e)

        beat = (JournalHeartbeat(self.study, trial._trial_id, self.cfg.heartbeat) if self.journal
                else contextlib.nullcontext())
        try:
            with beat:
                return runner.run(config, self.tracker, on_epoch=on_epoch, with_test=False)
        except _Pruned as exc:
            trial.set_user_attr("prune_reason", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        except Exception as exc:
            text = (str(exc).strip().splitlines() or [""])[0]
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {text}"[:1000])
            raise

    def _record(self, trial, run_id: str, metrics: dict):
        self.tracker.set_tags(run_id, {"trial_state": "COMPLETE", "role": "trial"})
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("train_seconds", metrics["train_seconds"])
        trial.set_user_attr("flops_student", metrics.get("flops_student"))
        acc = float(metrics["best_val_top1"])
        if not self.cfg.multi_objective:
            return acc
        second = metrics.get("flops_student") if self.cfg.objective == "acc,flops" else metrics["train_seconds"]
        return acc, float(second)


def _optimize_one(study, objective):
    """Run one trial in this worker; its frozen trial (None if Optuna ran none).

    On Ctrl-C Optuna marks the trial FAIL and re-raises, after logging it as failed with the
    KeyboardInterrupt's traceback; those log lines are dropped, so that the command ends with its
    one line (``kdbench`` says the run was interrupted)."""
    import logging

    interrupted = []

    def run(trial):
        try:
            return objective(trial)
        except KeyboardInterrupt:
            interrupted.append(trial.number)
            try:  # shown by `kdbench tune --show`; Optuna then marks the trial FAIL
                trial.set_user_attr("fail_reason", f"interrupted ({interrupts.interrupted_by()})")
            except Exception:  # noqa: BLE001, S110 - the store is busy: the Ctrl-C still goes through
                pass
            raise

    def not_interrupted(record) -> bool:
        return not any(record.getMessage().startswith(f"Trial {number} failed") for number in interrupted)

    log = logging.getLogger("optuna.study._optimize")
    log.addFilter(not_interrupted)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mine = []  # this worker's trial (another worker may have added later ones)
            study.optimize(run, n_trials=1, catch=(Exception,), gc_after_trial=False,
                           callbacks=[lambda _study, trial: mine.append(trial)])
    finally:
        log.removeFilter(not_interrupted)
    return mine[0] if mine else None


def _run_trials(study, objective: _Objective, on_event: Callable) -> None:
    """Trials until the budget is met, failing dead workers' trials. While other workers' running
    trials could fill the budget, wait for them: one that dies is failed and replaced, so the study
    ends with the asked number of counted trials. Trials failing in a row stop it with an error."""
    from optuna.trial import TrialState

    counted = (TrialState.COMPLETE, TrialState.PRUNED)
    cfg = objective.cfg
    failed_in_a_row = 0
    while True:
        dead = fail_stale_trials(study, cfg.heartbeat)
        if dead:
            on_event(DeadTrialsFailed(trials=dead))
            _close_dead_runs(objective.tracker, objective.plan.dataset_obj.name, objective.name, dead)
        done = count_trials(study, counted)
        if done >= cfg.trials:
            return
        if done + count_trials(study, (TrialState.RUNNING,)) >= cfg.trials:
            time.sleep(WAIT_SECONDS)  # other workers' trials: they end, or die and are failed
            continue
        trial = _optimize_one(study, objective)
        if trial is None:
            continue
        if trial.state == TrialState.FAIL and trial.user_attrs.get("fail_reason", "").startswith(OVER_BUDGET):
            continue
        reason = trial.user_attrs.get("fail_reason") or trial.user_attrs.get("prune_reason") or ""
        on_event(TrialFinished(number=trial.number, state=trial.state.name, values=trial.values,
                               params=trial.params, reason=reason, counted=count_trials(study, counted),
                               budget=cfg.trials))
        failed_in_a_row = failed_in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
            raise KdbenchError(
                f"study {objective.name!r}: {failed_in_a_row} trials failed in a row (last: {reason or '?'}); "
                f"{count_trials(study, counted)} of {cfg.trials} trials counted; fix the cause and resume it")


# --------------------------------------------------------------------------- after the trials


def _summarize(study, cfg: TuneConfig, plan, name: str, parent: str) -> TuneResult:
    from optuna.trial import TrialState

    counted = (TrialState.COMPLETE, TrialState.PRUNED)
    done = count_trials(study, counted)
    epochs_run = sum(int(trial.user_attrs.get("epochs_run", 0)) for trial in study.get_trials(deepcopy=False)
                     if trial.state in counted)
    best = pick_best(study)
    return TuneResult(
        study=study, study_name=name, parent_run_id=parent, objective=cfg.objective, best=best,
        epochs_run=epochs_run, epochs_full=plan.recipe.epochs * done, trials_counted=done,
        trials_failed=count_trials(study, (TrialState.FAIL,)), trials_pruned=count_trials(study, (TrialState.PRUNED,)),
        pareto=(sorted(study.best_trials, key=lambda trial: -trial.values[0])
                if best is not None and cfg.multi_objective else []),
    )


def _retrain(result: TuneResult, cfg: TuneConfig, base: RunConfig, tracker, on_epoch) -> None:
    """Retrain the best params with the test split, one run per seed; their mean ± std on the parent."""
    best, parts = result.best, split_params(result.best.params)
    for seed in range(cfg.seeds):
        config = replace(base, hparams=parts["hparams"], recipe={**cfg.recipe, **parts["recipe"]},
                         student=parts["student"] or base.student, seed=seed,
                         tags={"mlflow.parentRunId": result.parent_run_id, "study": result.study_name,
                               "tuned": "best", "best_trial": best.number})
        result.retrain.append(runner.run(config, tracker, on_epoch=on_epoch, with_test=True))
    tests = [outcome.metrics["test_top1"] for outcome in result.retrain]
    mean = sum(tests) / len(tests)
    std = (sum((x - mean) ** 2 for x in tests) / (len(tests) - 1)) ** 0.5 if len(tests) > 1 else 0.0
    tracker.log_metrics(result.parent_run_id, {"retrain_test_top1_mean": mean, "retrain_test_top1_std": std})
    result.retrained, result.retrain_test_top1, result.retrain_mean, result.retrain_std = True, tests, mean, std


def _connect_workers(cfg: TuneConfig, tracking_uri: str):
    """``--executor ray``: the cluster, after checking the options and that every node reaches the
    tracking store and (several machines) that the study's storage is a database server."""
    from kdbench.workflows import executors

    if cfg.executor == "local":
        if cfg.workers != 1:
            raise executors.ExecutorError("--workers needs --executor ray (or start several `kdbench tune` "
                                          "processes on one --storage)")
        return None
    config = executors.ExecutorConfig(kind=cfg.executor, ray_address=cfg.ray_address, runs_per_gpu=cfg.runs_per_gpu)
    executors.check_config(config)
    if cfg.workers < 1:
        raise executors.ExecutorError(f"--workers must be at least 1, got {cfg.workers}")
    url = storage_url(cfg.storage, tracking_uri)
    cluster = executors.connect_ray(cfg.ray_address)
    try:
        if cluster.nodes > 1 and not url.split("://", 1)[0].startswith(("postgresql", "mysql")):
            raise executors.ExecutorError(
                f"a Ray cluster of {cluster.nodes} machines cannot share the study storage {mask_url(url)}: "
                "pass --storage postgresql://USER:PASS@HOST/DB")
        executors.check_workers_reach(tracking_uri, cluster)
    except BaseException:
        executors.shutdown_ray()
        raise
    return cluster


def work_trials(cfg: TuneConfig, name: str, parent: str, threads: int | None = 1) -> int:
    """One Optuna worker (a Ray task): run trials of the stored study ``name`` until its budget is
    met; the number of trials it ran. A worker that dies leaves a RUNNING trial that Optuna's
    heartbeat fails (not counted) and a RUNNING MLflow run that the claims' reaper ends KILLED."""
    import optuna

    if threads:
        import torch

        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base, plan = _plan_study(cfg, plugins.registry())
    tracker = Tracker(cfg.tracking_uri or default_tracking_uri())
    storage = open_storage(cfg.storage, cfg.tracking_uri, cfg.heartbeat)
    study = optuna.load_study(study_name=name, storage=storage)
    obtain_teacher(plan, engine.select_device(cfg.device), tracker, lambda e: None, with_test=False)
    ran = []
    objective = _Objective(cfg=cfg, study=study, plan=plan, base=base, tracker=tracker, parent=parent, name=name,
                           journal=isinstance(storage, optuna.storages.JournalStorage), on_epoch=lambda e: None)
    _run_trials(study, objective, lambda event: ran.append(event) if isinstance(event, TrialFinished) else None)
    return len(ran)


def _run_ray_workers(cfg: TuneConfig, cluster, name: str, parent: str, on_event: Callable) -> None:
    """``cfg.workers`` Optuna workers as Ray tasks on the one stored study (re-run by Ray if lost)."""
    from kdbench.workflows import executors

    jobs = [executors.Job(key=f"worker:{i}", fn=work_trials, args=(cfg, name, parent, 1), payload=i)
            for i in range(cfg.workers)]
    on_event(WorkersStarted(workers=cfg.workers, nodes=cluster.nodes, dashboard_url=cluster.dashboard_url))
    config = executors.ExecutorConfig(kind="ray", runs_per_gpu=cfg.runs_per_gpu)
    executors.run_ray(jobs, config, cluster,
                      on_done=lambda job, ran: on_event(WorkerEnded(worker=job.payload, trials=ran)),
                      on_lost=lambda job, why: on_event(WorkerEnded(worker=job.payload, trials=0, reason=why)))


def run_study(cfg: TuneConfig, on_event: Callable = _ignore, on_epoch=lambda e: None) -> TuneResult:
    """Create or resume the study, run trials until the budget is met, retrain the best."""
    import optuna

    from kdbench.workflows import executors

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base, plan = _plan_study(cfg, plugins.registry())
    tracking_uri = cfg.tracking_uri or default_tracking_uri()
    cluster = _connect_workers(cfg, tracking_uri)  # bad options: before anything is recorded
    try:
        return _run_study(cfg, base, plan, tracking_uri, cluster, on_event, on_epoch)
    finally:
        if cluster is not None:
            executors.shutdown_ray()


def _run_study(cfg: TuneConfig, base, plan, tracking_uri: str, cluster, on_event: Callable, on_epoch) -> TuneResult:
    import optuna

    tracker = Tracker(tracking_uri)
    url = storage_url(cfg.storage, tracking_uri)
    storage = open_storage(cfg.storage, tracking_uri, cfg.heartbeat)
    name = cfg.study or default_study_name(cfg, plan)
    fresh = name not in optuna.get_all_study_names(storage)
    study = _open_study(cfg, plan, storage, name)
    # The teacher is fixed, not tuned: get it once (cache) so trial times compare. A teacher
    # trained now is tested like any cached teacher; a checkpoint is not tested here. A study
    # this call made is removed again when its teacher cannot be had (an unreadable checkpoint):
    # a refused `tune` leaves nothing behind.
    try:
        obtain_teacher(plan, engine.select_device(cfg.device), tracker, on_epoch, with_test=False)
    except BaseException:
        if fresh and not study.trials:
            optuna.delete_study(study_name=name, storage=storage)
        raise
    parent = _parent_run(study, tracker, plan.dataset_obj.name, cfg, url)
    on_event(StudyOpened(study=name, storage=mask_url(url), parent_run_id=parent))
    objective = _Objective(cfg=cfg, study=study, plan=plan, base=base, tracker=tracker, parent=parent, name=name,
                           journal=isinstance(storage, optuna.storages.JournalStorage), on_epoch=on_epoch)
    try:
        if cluster is None:
            _run_trials(study, objective, on_event)
        else:
            from kdbench.workflows.executors import absolute_uri

            shared = replace(cfg, tracking_uri=absolute_uri(tracking_uri), storage=absolute_uri(storage_url(cfg.storage, tracking_uri)))
            _run_ray_workers(shared, cluster, name, parent, on_event)
            _run_trials(study, objective, on_event)  # a lost worker's trials: failed by heartbeat, redone here
        result = _summarize(study, cfg, plan, name, parent)
        _record_parent(tracker, parent, study, result.best, result.epochs_run, result.epochs_full)
        if result.best is not None and cfg.retrain:
            _retrain(result, cfg, base, tracker, on_epoch)
    except BaseException as exc:  # Ctrl-C or a study that cannot go on: the parent run ends too
        tracker.finish(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                       f"{type(exc).__name__}: {exc}".strip())
        raise
    tracker.finish(parent)
    return result


def _record_parent(tracker, parent: str, study, best, epochs_run: int, epochs_full: int) -> None:
    """Best params (as tags; params are immutable in MLflow), counts and plots on the parent run."""
    from optuna.trial import TrialState

    tags = {"best_trial": best.number if best else "", "n_trials": len(study.trials)}
    if best is not None:
        tags.update({f"best.{k}": v for k, v in best.params.items()})
    tracker.set_tags(parent, tags)
    metrics = {"epochs_run": epochs_run, "epochs_full": epochs_full,
               "trials_complete": len(study.get_trials(states=(TrialState.COMPLETE,))),
               "trials_pruned": len(study.get_trials(states=(TrialState.PRUNED,))),
               "trials_failed": len(study.get_trials(states=(TrialState.FAIL,)))}
    if best is not None:
        metrics["best_val_top1"] = best.values[0]
    tracker.log_metrics(parent, metrics)
    with tempfile.TemporaryDirectory() as tmp:
        for path in save_plots(study, Path(tmp)):
            try:
                tracker.client.log_artifact(parent, str(path), "plots")
            except Exception:
                pass


def save_plots(study, folder: Path) -> list[Path]:
    """Optimization history, parallel coordinates, importances (or Pareto front) as PNGs;
    a plot that cannot be drawn (too few trials) is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    multi = len(study.directions) > 1
    acc = (lambda trial: trial.values[0]) if multi else None
    plots = {
        "optimization_history": lambda: ov.plot_optimization_history(study, target=acc, target_name="val top-1"),
        "parallel_coordinate": lambda: ov.plot_parallel_coordinate(study, target=acc, target_name="val top-1"),
        "param_importances": lambda: ov.plot_param_importances(study, target=acc, target_name="val top-1"),
    }
    if multi:
        plots["pareto_front"] = lambda: ov.plot_pareto_front(study, target_names=["val top-1", "cost"])
    out = []
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            path = folder / f"{name}.png"
            fig.savefig(path, dpi=80, bbox_inches="tight")
            plt.close(fig)
            out.append(path)
        except Exception:
            plt.close("all")
    return out

