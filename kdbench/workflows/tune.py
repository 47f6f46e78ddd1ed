"""Hyperparameter tuning: an Optuna study over a method's declared search space.

* Objective: the **best validation top-1** over the main-stage epochs of a trial (the same number
  ``best_val_top1`` that every run records). The test split is never read by a trial
  (``runner.run(..., with_test=False)``); only the retrain of the best parameters reads it.
  (The teacher is fixed, not tuned: it is trained or taken from the cache before the study.)
* Pruning: each main-stage epoch reports ``val_top1``; the pruner (median by default) may stop
  the trial, whose MLflow run then ends KILLED with tag ``trial_state=PRUNED``.
* Storage: ``sqlite:///optuna.db`` next to the MLflow store by default (one worker at a time);
  ``journal`` for a file journal that several local processes share; or any Optuna storage URL
  (``postgresql://…``). Studies resume; a worker killed mid-trial leaves a RUNNING trial that
  the heartbeat marks FAIL once stale, so it is not counted. The trial budget (``--trials``)
  counts COMPLETE and PRUNED trials over all workers.
* MLflow: the study is a parent run (tag ``role=study``); each trial is a nested student run
  (tag ``mlflow.parentRunId``) with its parameters, per-epoch metrics and ``trial_state``.
"""
from __future__ import annotations

import re
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from kdbench.errors import KdbenchError

OBJECTIVES = ("acc", "acc,flops", "acc,time")
PRUNERS = ("median", "hyperband", "none")
RECIPE_PREFIX = "recipe."
STUDY_ROLE = "study"


# --------------------------------------------------------------------------- storage


def mask_url(url: str) -> str:
    """``scheme://user:pass@host`` → ``scheme://user:***@host``."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", str(url))


def _password(url: str) -> str | None:
    m = re.search(r"://[^:/@]*:([^@/]*)@", str(url))
    return m.group(1) if m and m.group(1) else None


def _local_dir(tracking_uri: str | None) -> Path:
    """The folder of the MLflow sqlite store (optuna.db goes next to it), else the cwd."""
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):]).parent
    return Path(".")


def storage_url(storage: str | None, tracking_uri: str | None = None) -> str:
    """The storage as the user would write it (for messages): default, 'journal' or a URL."""
    if storage in (None, "", "sqlite"):
        return f"sqlite:///{_local_dir(tracking_uri) / 'optuna.db'}"
    if storage == "journal":
        return f"journal:{_local_dir(tracking_uri) / 'optuna.journal'}"
    return storage


def open_storage(storage: str | None, tracking_uri: str | None = None, heartbeat: int = 30,
                 must_exist: bool = False):
    """An Optuna storage object; unreachable storages raise a one-line, password-free error."""
    import optuna

    url = storage_url(storage, tracking_uri)
    if url.startswith("journal:"):
        path = url[len("journal:"):]
        if must_exist and not Path(path).exists():
            raise KdbenchError(f"no study journal at {path}; run `kdbench tune --storage journal` first")
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(path))
    if must_exist and url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        raise KdbenchError(f"no studies in {url} (the file does not exist); run `kdbench tune` first")
    if "://" not in url:
        raise KdbenchError(f"--storage {mask_url(url)!r} is not 'journal' or a storage URL (sqlite:///…, postgresql://…)")
    shown = mask_url(url)
    url = _pick_pg_driver(url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
            )
    except Exception as exc:  # sqlalchemy OperationalError, missing driver, bad URL …
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        pw = _password(url)
        if pw:
            text = text.replace(pw, "***")
        raise KdbenchError(f"cannot open Optuna storage {shown}: {text}") from None


def _pick_pg_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3; use psycopg2 when only it is installed."""
    if url.startswith("postgresql://"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
            return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def load_study(name: str, storage, url: str):
    import optuna

    names = optuna.study.get_all_study_names(storage)
    if name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise KdbenchError(f"unknown study {name!r} in {mask_url(url)} (known studies: {known})")
    return optuna.load_study(study_name=name, storage=storage)


def best_params(study_name: str, storage: str | None = None, tracking_uri: str | None = None) -> dict:
    """The best trial's parameters, split for a RunConfig: ``{"hparams", "recipe", "student", "method"}``."""
    st = open_storage(storage, tracking_uri, must_exist=True)
    study = load_study(study_name, st, storage_url(storage, tracking_uri))
    trial = pick_best(study)
    if trial is None:
        raise KdbenchError(f"study {study_name!r} has no complete trial yet")
    return split_params(trial.params) | {"method": study.user_attrs.get("method")}


def split_params(params: dict) -> dict:
    hparams = {k: v for k, v in params.items() if not k.startswith(RECIPE_PREFIX) and k != "student"}
    recipe = {k[len(RECIPE_PREFIX):]: v for k, v in params.items() if k.startswith(RECIPE_PREFIX)}
    return {"hparams": hparams, "recipe": recipe, "student": params.get("student")}


def pick_best(study):
    """Single objective: the best trial; several: the Pareto trial with the highest accuracy."""
    from optuna.trial import TrialState

    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return None
    if len(study.directions) == 1:
        return study.best_trial
    return max(study.best_trials, key=lambda t: t.values[0])


# --------------------------------------------------------------------------- heartbeat for journals


class _JournalHeartbeat:
    """Optuna's heartbeat exists for RDB storages only; a journal gets this one: a thread stamps
    the running trial's user attr ``heartbeat``, and stale RUNNING trials are failed."""

    def __init__(self, study, trial_id: int, interval: float):
        self.study, self.trial_id, self.interval = study, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self):
        while not self.stop.is_set():
            try:
                self.study._storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())
            except Exception:  # the trial finished meanwhile
                return
            self.stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)


def fail_stale_trials(study, heartbeat: int) -> list[int]:
    """Mark RUNNING trials of dead workers FAIL (RDB: Optuna's heartbeat; journal: ours), with
    ``fail_reason`` set first (a finished trial takes no more user attrs)."""
    import optuna
    from optuna.storages._heartbeat import is_heartbeat_enabled
    from optuna.trial import TrialState

    storage = study._storage
    reason = "worker died (stale heartbeat)"
    running = {t._trial_id: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if is_heartbeat_enabled(storage):
        stale = [tid for tid in storage._get_stale_trial_ids(study._study_id) if tid in running]
        stale += _never_beat(getattr(storage, "_backend", storage), running, 2 * heartbeat)
        for tid in stale:
            try:
                storage.set_trial_user_attr(tid, "fail_reason", reason)
            except Exception:
                pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)
        for tid in stale:  # those Optuna's heartbeat cannot see (killed before the first beat)
            try:
                storage.set_trial_state_values(tid, TrialState.FAIL)
            except Exception:
                pass
    else:
        stale = []
        now = time.time()
        for tid, t in running.items():
            beat = t.user_attrs.get("heartbeat", t.datetime_start.timestamp() if t.datetime_start else now)
            if now - beat > 2 * heartbeat:
                try:
                    storage.set_trial_user_attr(tid, "fail_reason", reason)
                    if storage.set_trial_state_values(tid, TrialState.FAIL):
                        stale.append(tid)
                except Exception:
                    pass
    return sorted(running[tid].number for tid in stale
                  if storage.get_trial(tid).state == TrialState.FAIL)


def _never_beat(storage, running: dict, grace: float) -> list[int]:
    """RUNNING trials older than ``grace`` with no heartbeat row: their worker died before the
    first beat, which Optuna's own stale check skips."""
    import datetime

    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session, True) as session:
        beating = {tid for (tid,) in session.query(models.TrialHeartbeatModel.trial_id)
                   .filter(models.TrialHeartbeatModel.trial_id.in_(list(running))).all()}
    now = datetime.datetime.now()
    return [tid for tid, t in running.items() if tid not in beating and t.datetime_start
            and (now - t.datetime_start).total_seconds() > grace]


def _close_dead_runs(tracker, dataset: str, study_name: str, numbers: list[int]) -> None:
    """The MLflow runs of trials failed for a dead worker: end them KILLED, trial_state=FAILED."""
    for n in numbers:
        for r in tracker.search(dataset, f"tags.study = '{study_name}' AND tags.trial = '{n}' "
                                         "AND attributes.status = 'RUNNING'"):
            tracker.set_tags(r.info.run_id, {"trial_state": "FAILED"})
            tracker.finish(r.info.run_id, "KILLED", "worker died (stale heartbeat)")


# --------------------------------------------------------------------------- the study


@dataclass
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


@dataclass
class TuneResult:
    study: Any
    parent_run_id: str
    best: Any  # FrozenTrial | None
    epochs_run: int
    epochs_full: int  # trials × epochs had nothing been pruned
    retrain: list = field(default_factory=list)  # runner Outcomes
    report: str = ""


class _Pruned(Exception):
    """Raised through the runner when the pruner stops a trial; carries the run's end state.

    The runner only knows the marker attributes (it imports no Optuna); :func:`run_study`
    turns this into ``optuna.TrialPruned``."""

    kdbench_run_status = "KILLED"
    kdbench_run_tags = {"trial_state": "PRUNED"}


def validate(cfg: TuneConfig, reg) -> None:
    if cfg.trials < 1:
        raise KdbenchError(f"--trials must be at least 1, got {cfg.trials}")
    if cfg.objective not in OBJECTIVES:
        raise KdbenchError(f"--objective {cfg.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if cfg.pruner not in PRUNERS:
        raise KdbenchError(f"--pruner {cfg.pruner!r} is not one of {', '.join(PRUNERS)}")
    if cfg.seeds < 1:
        raise KdbenchError(f"--seeds must be at least 1, got {cfg.seeds}")
    if cfg.method not in reg.methods:
        broken = [f.line() for f in reg.failures]
        hint = f"; broken plugins: {'; '.join(broken)}" if broken else ""
        from kdbench.errors import closest

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
    hp = {h.name: h.suggest(trial) for h in method.search_space()}
    recipe = {}
    if tune_recipe:
        lr = base_recipe.lr
        recipe["lr"] = trial.suggest_float(RECIPE_PREFIX + "lr", lr / 10, lr * 10, log=True)
        recipe["weight_decay"] = trial.suggest_float(RECIPE_PREFIX + "weight_decay", 1e-6, 1e-2, log=True)
    student = trial.suggest_categorical("student", list(students)) if len(students) > 1 else None
    return hp, recipe, student


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


def _count(study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _parent_run(study, tracker, dataset: str, cfg: TuneConfig, url: str) -> str:
    key = "mlflow_parent_run_id"
    run_id = study.user_attrs.get(key)
    if run_id and tracker.run_exists(run_id):
        tracker.client.update_run(run_id, status="RUNNING")
        return run_id
    run_id = tracker.start(
        dataset, f"tune-{study.study_name}",
        {"role": STUDY_ROLE, "study": study.study_name, "optuna_storage": mask_url(url),
         "method": cfg.method, "objective": cfg.objective},
        {"trials": cfg.trials, "pruner": cfg.pruner, "tune_recipe": cfg.tune_recipe},
    )
    study.set_user_attr(key, run_id)
    stored = optuna_reload_attr(study, key)
    if stored and stored != run_id and tracker.run_exists(stored):  # another worker won the race
        tracker.client.delete_run(run_id)
        return stored
    return run_id


def optuna_reload_attr(study, key: str):
    return study._storage.get_study_user_attrs(study._study_id).get(key)


def run_study(cfg: TuneConfig, echo: Callable[[str], None] = print, on_epoch=lambda e: None) -> TuneResult:
    """Create or resume the study, run trials until the budget is met, retrain the best."""
    import optuna
    from optuna.trial import TrialState

    from kdbench.core import engine, plugins
    from kdbench.workflows.tracking import default_tracking_uri
    from kdbench.core.plan import RunConfig, make_plan
    from kdbench.workflows.run import obtain_teacher, run
    from kdbench.workflows.tracking import Tracker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    reg = plugins.registry()
    validate(cfg, reg)
    students = tuple(cfg.students)
    base = RunConfig(method=cfg.method, dataset=cfg.dataset, teacher=cfg.teacher,
                     student=students[0] if students else None, recipe=dict(cfg.recipe),
                     device=cfg.device, teacher_checkpoint=cfg.teacher_checkpoint,
                     data_options=dict(cfg.data_options), recipe_name=cfg.recipe_name)
    plan = make_plan(base, reg)  # bad names and recipes fail here, before any study exists
    for s in students[1:]:
        reg.entry("models", s)
    if not plan.method_obj.search_space() and not cfg.tune_recipe and len(students) < 2:
        raise KdbenchError(f"method {cfg.method!r} declares no search space; add --tune-recipe to tune lr and weight_decay")

    tracking_uri = cfg.tracking_uri or default_tracking_uri()
    tracker = Tracker(tracking_uri)
    url = storage_url(cfg.storage, tracking_uri)
    storage = open_storage(cfg.storage, tracking_uri, cfg.heartbeat)
    name = cfg.study or default_study_name(cfg, plan)
    multi = cfg.objective != "acc"
    directions = ["maximize", "minimize"] if multi else ["maximize"]
    sampler = optuna.samplers.TPESampler(seed=cfg.sampler_seed) if not multi else optuna.samplers.NSGAIISampler(seed=cfg.sampler_seed)
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, directions=directions, load_if_exists=True,
            sampler=sampler, pruner=make_pruner("none" if multi else cfg.pruner, plan.recipe.epochs),
        )
    except ValueError as exc:  # e.g. directions differ from the stored study
        raise KdbenchError(f"study {name!r}: {exc}") from None
    if "method" not in study.user_attrs:
        study.set_user_attr("method", plan.method_obj.name)
        study.set_user_attr("dataset", plan.dataset_obj.name)
        study.set_user_attr("recipe", dict(cfg.recipe))
    elif study.user_attrs["method"] != plan.method_obj.name:
        raise KdbenchError(f"study {name!r} tunes method {study.user_attrs['method']!r}, not {plan.method_obj.name!r}")

    device = engine.select_device(cfg.device)
    # The teacher is fixed, not tuned: get it once (cache) so trial times compare. A teacher
    # trained now is tested like any cached teacher; a checkpoint is not tested here.
    obtain_teacher(plan, device, tracker, on_epoch, with_test=False)
    parent = _parent_run(study, tracker, plan.dataset_obj.name, cfg, url)
    echo(f"study {name!r} in {mask_url(url)} (MLflow parent run {parent})")
    counter = {"epochs": 0}
    counted = (TrialState.COMPLETE, TrialState.PRUNED)

    def objective(trial):
        # Budget across workers: trials before this one that count or may still count.
        ahead = [t for t in study.get_trials(deepcopy=False, states=counted + (TrialState.RUNNING,))
                 if t.number < trial.number]
        if len(ahead) >= cfg.trials:
            trial.set_user_attr("fail_reason", "over budget: other workers filled it")
            raise _OverBudget()
        hp, rec, student = suggest(trial, plan.method_obj, plan.recipe, cfg.tune_recipe, students)
        config = replace(
            base, hparams=hp, recipe={**cfg.recipe, **rec}, student=student or base.student,
            tags={"mlflow.parentRunId": parent, "study": name, "trial": trial.number},
        )
        cb = make_epoch_callback(trial, counter, pruning=not multi)

        def both(e):
            cb(e)
            on_epoch(e)

        beat = _JournalHeartbeat(study, trial._trial_id, cfg.heartbeat) if isinstance(
            storage, optuna.storages.JournalStorage) else None
        try:
            if beat:
                beat.__enter__()
            outcome = run(config, tracker, on_epoch=both, with_test=False)
        except _Pruned as exc:
            trial.set_user_attr("prune_reason", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        except Exception as exc:
            text = (str(exc).strip().splitlines() or [""])[0]
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {text}"[:1000])
            raise
        finally:
            if beat:
                beat.__exit__()
        m = outcome.metrics
        tracker.set_tags(outcome.run_id, {"trial_state": "COMPLETE", "role": "trial"})
        trial.set_user_attr("mlflow_run_id", outcome.run_id)
        trial.set_user_attr("train_seconds", m["train_seconds"])
        trial.set_user_attr("flops_student", m.get("flops_student"))
        acc = float(m["best_val_top1"])
        if multi:
            second = m.get("flops_student") if cfg.objective == "acc,flops" else m["train_seconds"]
            return acc, float(second)
        return acc

    while True:
        dead = fail_stale_trials(study, cfg.heartbeat)
        if dead:
            echo(f"trials {dead} of a dead worker marked FAIL (not counted)")
            _close_dead_runs(tracker, plan.dataset_obj.name, name, dead)
        used = _count(study, counted) + _count(study, (TrialState.RUNNING,))
        if used >= cfg.trials:
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mine = []  # this worker's trial (another worker may have added later ones)
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False,
                           callbacks=[lambda _s, t: mine.append(t)])
        if not mine:
            continue
        last = mine[0]
        if last.state == TrialState.FAIL and last.user_attrs.get("fail_reason", "").startswith("over budget"):
            continue
        echo(_trial_line(last, cfg.trials, _count(study, counted)))

    done = _count(study, counted)
    trials = study.get_trials(deepcopy=False)
    epochs_full = plan.recipe.epochs * done
    epochs_run = sum(int(t.user_attrs.get("epochs_run", 0)) for t in trials if t.state in counted)
    best = pick_best(study)
    _record_parent(tracker, parent, study, best, epochs_run, epochs_full)
    result = TuneResult(study, parent, best, epochs_run, epochs_full)
    lines = [f"{done} trials counted ({_count(study, (TrialState.FAIL,))} failed, "
             f"{_count(study, (TrialState.PRUNED,))} pruned); epochs trained {epochs_run} of {epochs_full}"
             + (f" ({100 * (1 - epochs_run / epochs_full):.0f} % saved by pruning)" if epochs_full else "")]
    if best is None:
        lines.append("no complete trial: nothing to retrain")
        tracker.finish(parent)
        result.report = "\n".join(lines)
        return result
    if multi:
        lines.append("Pareto front (val top-1 ↑, " + cfg.objective.split(",")[1] + " ↓):")
        for t in sorted(study.best_trials, key=lambda t: -t.values[0]):
            lines.append(f"  #{t.number:<4} {t.values[0]:.4f}  {t.values[1]:,.1f}  {t.params}")
    lines.append(f"best trial #{best.number}: val top-1 {best.values[0]:.4f}  params {best.params}")
    if cfg.retrain:
        parts = split_params(best.params)
        tests = []
        for seed in range(cfg.seeds):
            config = replace(base, hparams=parts["hparams"], recipe={**cfg.recipe, **parts["recipe"]},
                             student=parts["student"] or base.student, seed=seed,
                             tags={"mlflow.parentRunId": parent, "study": name, "tuned": "best",
                                   "best_trial": best.number})
            outcome = run(config, tracker, on_epoch=on_epoch, with_test=True)
            result.retrain.append(outcome)
            tests.append(outcome.metrics["test_top1"])
        mean = sum(tests) / len(tests)
        sd = (sum((x - mean) ** 2 for x in tests) / (len(tests) - 1)) ** 0.5 if len(tests) > 1 else 0.0
        tracker.log_metrics(parent, {"retrain_test_top1_mean": mean, "retrain_test_top1_std": sd})
        lines.append(f"retrained best params, test top-1 over {len(tests)} seed(s): "
                     f"{100 * mean:.2f} ± {100 * sd:.2f} %  (" + ", ".join(f"{100 * x:.2f}" for x in tests) + ")")
    else:
        lines.append("(--no-retrain: test split not read; run `kdbench run --params-from "
                     f"{name}` for a test number)")
    tracker.finish(parent)
    result.report = "\n".join(lines)
    return result


class _OverBudget(Exception):
    pass


def _trial_line(t, budget: int, done: int) -> str:
    state = t.state.name
    val = "" if t.values is None else " ".join(f"{v:.4f}" for v in t.values)
    why = t.user_attrs.get("fail_reason") or t.user_attrs.get("prune_reason") or ""
    return f"trial #{t.number:<3} {state:<8} {val:<16} {t.params}  {why}  [{done}/{budget}]".rstrip()


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
    acc = (lambda t: t.values[0]) if multi else None
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


# --------------------------------------------------------------------------- show


def show(study_name: str, storage: str | None = None, tracking_uri: str | None = None) -> str:
    """Best params, the trials table and parameter importances of a study, as text."""
    import optuna
    import pandas as pd
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(storage, tracking_uri)
    st = open_storage(storage, tracking_uri, must_exist=True)
    study = load_study(study_name, st, url)
    lines = [f"study {study_name!r} in {mask_url(url)}: method {study.user_attrs.get('method', '?')}, "
             f"{len(study.trials)} trials"]
    best = pick_best(study)
    if best is None:
        lines.append("best: (no complete trial)")
    else:
        lines.append(f"best trial #{best.number}: values {[round(v, 4) for v in best.values]}  params {best.params}")
    df = study.trials_dataframe(attrs=("number", "state", "value" if len(study.directions) == 1 else "values",
                                       "params", "duration", "user_attrs"))
    keep = [c for c in df.columns if not c.startswith("user_attrs_") or c in
            ("user_attrs_epochs_run", "user_attrs_fail_reason")]
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
        lines.append(df[keep].to_string(index=False))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        lines.append("importances: need at least 2 complete trials")
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
                imp = optuna.importance.get_param_importances(study, target=target)
            lines.append("importances: " + (", ".join(f"{k} {v:.3f}" for k, v in imp.items()) or "-"))
        except Exception as exc:
            lines.append(f"importances: unavailable ({type(exc).__name__}: {exc})")
    return "\n".join(lines)
