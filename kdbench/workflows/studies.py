"""Optuna studies as stored: where they live (storage URLs, passwords masked), opening and loading
them, their best trial, a summary of a stored study, and trials of dead workers (heartbeats).

* Storage: ``sqlite:///optuna.db`` next to the MLflow store by default (one worker at a time);
  ``journal`` for a file journal that several local processes share; or any Optuna storage URL
  (``postgresql://…``).
* Dead workers: a worker killed mid-trial leaves a RUNNING trial; RDB storages have Optuna's
  heartbeat, a journal gets :class:`JournalHeartbeat`; :func:`fail_stale_trials` marks such
  trials FAIL once stale, so they are not counted.

Optuna is imported inside the functions: machines without it can import this module.
"""
from __future__ import annotations

import contextlib
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError
from kdbench.workflows.interrupts import hold_ctrl_c_in

RECIPE_PREFIX = "recipe."
STALE_REASON = "worker died (stale heartbeat)"


# --------------------------------------------------------------------------- storage


def mask_url(url: str) -> str:
    """``scheme://user:pass@host`` → ``scheme://user:***@host``."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", str(url))


def _password(url: str) -> str | None:
    match = re.search(r"://[^:/@]*:([^@/]*)@", str(url))
    return match.group(1) if match and match.group(1) else None


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
    url = storage_url(storage, tracking_uri)
    if url.startswith("journal:"):
        return _journal_storage(url[len("journal:"):], must_exist)
    if must_exist and url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        raise KdbenchError(f"no studies in {url} (the file does not exist); run `kdbench tune` first")
    if "://" not in url:
        raise KdbenchError(f"--storage {mask_url(url)!r} is not 'journal' or a storage URL (sqlite:///…, postgresql://…)")
    return _rdb_storage(url, heartbeat)


def _journal_storage(path: str, must_exist: bool):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if must_exist and not Path(path).exists():
        raise KdbenchError(f"no study journal at {path}; run `kdbench tune --storage journal` first")
    return hold_ctrl_c_in(optuna.storages.JournalStorage(JournalFileBackend(path)))


def _rdb_storage(url: str, heartbeat: int):
    import optuna

    from kdbench.workflows.claims import file_lock

    shown = mask_url(url)
    url = _pick_pg_driver(url)
    db = url[len("sqlite:///"):].split("?", 1)[0] if url.startswith("sqlite:///") else ""
    # a fresh sqlite storage is created (and migrated) by one process at a time
    lock = file_lock(Path(db + ".lock")) if db and Path(db).parent.is_dir() else contextlib.nullcontext()
    try:
        with lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # each call whole: a Ctrl-C inside a SQLite statement left the store locked (interrupts)
            return hold_ctrl_c_in(optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
            ))
    except Exception as exc:  # sqlalchemy OperationalError, missing driver, bad URL …
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        password = _password(url)
        if password:
            text = text.replace(password, "***")
        raise KdbenchError(f"cannot open Optuna storage {shown}: {text}") from None


def _pick_pg_driver(url: str) -> str:
    from kdbench.workflows.tracking import pick_pg_driver

    return pick_pg_driver(url)


# --------------------------------------------------------------------------- stored studies


def load_study(name: str, storage, url: str):
    import optuna

    names = optuna.study.get_all_study_names(storage)
    if name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise KdbenchError(f"unknown study {name!r} in {mask_url(url)} (known studies: {known})")
    return optuna.load_study(study_name=name, storage=storage)


def stored_user_attr(study, key: str):
    """A study user attribute as stored now (another worker may have set it meanwhile)."""
    return study._storage.get_study_user_attrs(study._study_id).get(key)


def count_trials(study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def pick_best(study):
    """Single objective: the best trial; several: the Pareto trial with the highest accuracy."""
    from optuna.trial import TrialState

    if not any(trial.state == TrialState.COMPLETE for trial in study.get_trials(deepcopy=False)):
        return None
    if len(study.directions) == 1:
        return study.best_trial
    return max(study.best_trials, key=lambda trial: trial.values[0])


def split_params(params: dict) -> dict:
    hparams = {k: v for k, v in params.items() if not k.startswith(RECIPE_PREFIX) and k != "student"}
    recipe = {k[len(RECIPE_PREFIX):]: v for k, v in params.items() if k.startswith(RECIPE_PREFIX)}
    return {"hparams": hparams, "recipe": recipe, "student": params.get("student")}


def best_params(study_name: str, storage: str | None = None, tracking_uri: str | None = None) -> dict:
    """The best trial's parameters, split for a RunConfig: ``{"hparams", "recipe", "student", "method"}``."""
    opened = open_storage(storage, tracking_uri, must_exist=True)
    study = load_study(study_name, opened, storage_url(storage, tracking_uri))
    trial = pick_best(study)
    if trial is None:
        raise KdbenchError(f"study {study_name!r} has no complete trial yet")
    return split_params(trial.params) | {"method": study.user_attrs.get("method")}


@dataclass(kw_only=True)
class StudySummary:
    """A stored study: its best trial, its trials table and the parameter importances."""
    name: str
    storage: str  # the storage URL, password masked
    method: str  # "?" when the study does not say
    n_trials: int
    best: Any  # FrozenTrial | None
    trials: Any  # pandas DataFrame: number, state, value(s), params, duration, epochs_run, fail_reason
    complete_trials: int
    importances: dict[str, float] | None = None  # None with < 2 complete trials or on error
    importances_error: str | None = None  # why they could not be computed


def _trials_table(study):
    columns = ("number", "state", "value" if len(study.directions) == 1 else "values", "params", "duration",
               "user_attrs")
    frame = study.trials_dataframe(attrs=columns)
    keep = [c for c in frame.columns if not c.startswith("user_attrs_") or c in
            ("user_attrs_epochs_run", "user_attrs_fail_reason")]
    return frame[keep]


def _importances(study) -> tuple[dict[str, float] | None, str | None]:
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            target = (lambda trial: trial.values[0]) if len(study.directions) > 1 else None
            return optuna.importance.get_param_importances(study, target=target), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def study_summary(study_name: str, storage: str | None = None, tracking_uri: str | None = None) -> StudySummary:
    """Best params, the trials table and parameter importances of a stored study."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(storage, tracking_uri)
    study = load_study(study_name, open_storage(storage, tracking_uri, must_exist=True), url)
    complete = count_trials(study, (TrialState.COMPLETE,))
    summary = StudySummary(
        name=study_name, storage=mask_url(url), method=study.user_attrs.get("method", "?"),
        n_trials=len(study.trials), best=pick_best(study), trials=_trials_table(study), complete_trials=complete,
    )
    if complete >= 2:
        summary.importances, summary.importances_error = _importances(study)
    return summary


# --------------------------------------------------------------------------- dead workers


class JournalHeartbeat:
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
    ``fail_reason`` set first (a finished trial takes no more user attrs); return their numbers."""
    from optuna.storages._heartbeat import is_heartbeat_enabled
    from optuna.trial import TrialState

    storage = study._storage
    running = {trial._trial_id: trial for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    gone = _fail_dead_local(storage, running)
    others = {trial_id: trial for trial_id, trial in running.items() if trial_id not in gone}
    if is_heartbeat_enabled(storage):
        stale = list(_fail_stale_rdb(study, others, heartbeat)) + gone
    else:
        stale = list(_fail_stale_journal(storage, others, heartbeat)) + gone
    return sorted(running[trial_id].number for trial_id in stale
                  if storage.get_trial(trial_id).state == TrialState.FAIL)


def _fail_dead_local(storage, running: dict) -> list[int]:
    """RUNNING trials whose worker ran on this host and is gone (pid recorded by the trial): failed
    at once, without waiting for the heartbeat to go stale."""
    import socket

    from optuna.trial import TrialState

    from kdbench.workflows.claims import HOST_TAG, PID_TAG, pid_alive

    dead = []
    for trial_id, trial in running.items():
        attrs = trial.user_attrs
        if attrs.get(HOST_TAG) != socket.gethostname() or not str(attrs.get(PID_TAG, "")).isdigit():
            continue
        if pid_alive(int(attrs[PID_TAG])):
            continue
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", STALE_REASON)
            if storage.set_trial_state_values(trial_id, TrialState.FAIL):
                dead.append(trial_id)
        except Exception:  # finished or failed meanwhile by another worker
            pass
    return dead


def _fail_stale_rdb(study, running: dict, heartbeat: int) -> list[int]:
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    stale = [trial_id for trial_id in storage._get_stale_trial_ids(study._study_id) if trial_id in running]
    stale += _never_beat(getattr(storage, "_backend", storage), running, 2 * heartbeat)
    for trial_id in stale:
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", STALE_REASON)
        except Exception:
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    for trial_id in stale:  # those Optuna's heartbeat cannot see (killed before the first beat)
        try:
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except Exception:
            pass
    return stale


def _fail_stale_journal(storage, running: dict, heartbeat: int) -> list[int]:
    from optuna.trial import TrialState

    stale = []
    now = time.time()
    for trial_id, trial in running.items():
        beat = trial.user_attrs.get("heartbeat", trial.datetime_start.timestamp() if trial.datetime_start else now)
        if now - beat > 2 * heartbeat:
            try:
                storage.set_trial_user_attr(trial_id, "fail_reason", STALE_REASON)
                if storage.set_trial_state_values(trial_id, TrialState.FAIL):
                    stale.append(trial_id)
            except Exception:
                pass
    return stale


def _never_beat(storage, running: dict, grace: float) -> list[int]:
    """RUNNING trials older than ``grace`` with no heartbeat row: their worker died before the
    first beat, which Optuna's own stale check skips."""
    import datetime

    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session, True) as session:
        beating = {trial_id for (trial_id,) in session.query(models.TrialHeartbeatModel.trial_id)
                   .filter(models.TrialHeartbeatModel.trial_id.in_(list(running))).all()}
    now = datetime.datetime.now()
    return [trial_id for trial_id, trial in running.items() if trial_id not in beating and trial.datetime_start
            and (now - trial.datetime_start).total_seconds() > grace]
