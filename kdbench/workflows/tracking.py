"""MLflow tracking: one experiment per dataset, a run per trained network, metrics per epoch.

Everything goes through ``MlflowClient`` with explicit run ids (no global active run), so a
run can be finished as FAILED with its reason whatever happened in between.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from kdbench.errors import KdbenchError
from kdbench.workflows import claims
from kdbench.workflows.claims import file_lock
from kdbench.workflows.interrupts import hold_ctrl_c_in

EXPERIMENT_PREFIX = "kdbench/"
PROBE_SECONDS = 3.0  # how long a store may take to answer before kdbench gives up on it
#: schemes MLflow can track to (a bare folder path is a file store too)
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
OTHER_SCHEMES = ("http", "https", "file", "databricks", "databricks-uc", "uc")
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
_READY: set[str] = set()  # stores probed (and created) by this process


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def _quiet() -> None:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow  # noqa: F401  (configures its loggers on import; quieten them after)

    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # its retry loops log a warning per attempt with the whole exception: the probe says it in one line
    for name in ("mlflow.store.db.utils", "mlflow.utils.rest_utils", "urllib3.connectionpool"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def pick_pg_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3; use psycopg2 when only it is installed
    (for MLflow's store and Optuna's storage alike)."""
    if url.startswith("postgresql://"):
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
            return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""


def _masked(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password:
        return uri.replace(":" + parts.password + "@", ":***@")
    return uri


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for in-memory or other schemes)."""
    if not uri.lower().startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def check_store(uri: str) -> None:
    """Fail within seconds, in one line, when the store ``uri`` cannot be used: an unknown scheme,
    an unwritable sqlite file, an unreachable server or database. Probed once per process."""
    if uri in _READY:
        return
    scheme = _scheme(uri)
    if "://" in uri and scheme not in DB_SCHEMES + OTHER_SCHEMES:
        raise KdbenchError(
            f"tracking URI {_masked(uri)!r} has an unknown scheme {scheme!r}; use sqlite:///FILE.db, "
            "postgresql://USER:PASS@HOST/DB, http(s)://HOST:PORT (an MLflow server) or a folder")
    if scheme == "sqlite":
        _probe_sqlite(uri)
    elif scheme in ("http", "https"):
        _probe_http(uri)
    elif scheme in DB_SCHEMES:
        _probe_database(uri, scheme)


def _probe_sqlite(uri: str) -> None:
    path = sqlite_path(uri)
    if path is None:
        return
    where = f"MLflow store {uri}"
    blocker = next((folder for folder in path.parents if folder.exists() and not folder.is_dir()), None)
    if blocker is not None:
        raise KdbenchError(f"{where} cannot be created: {blocker} is a file, not a folder; "
                           "pass a writable --tracking-uri")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
        with file_lock(_lock_path(path)), contextlib.closing(sqlite3.connect(path, timeout=PROBE_SECONDS)) as db:
            db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as exc:
        raise KdbenchError(f"{where}: {path} is not a usable SQLite database ({_first_line(exc)}); "
                           "move it aside or pass another --tracking-uri") from None
    except OSError as exc:
        raise KdbenchError(f"{where} cannot be written ({exc.strerror or _first_line(exc)}: "
                           f"{exc.filename or path}); pass a writable --tracking-uri") from None


def _lock_path(db: Path) -> Path:
    return db.with_name(db.name + ".lock")


def _probe_http(uri: str) -> None:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KdbenchError(f"MLflow server {_masked(uri)} does not answer ({reason}); start it "
                           "(`mlflow server`) or pass another --tracking-uri") from None


def _probe_database(uri: str, scheme: str) -> None:
    parts = urlsplit(uri)
    host, port = parts.hostname or "localhost", parts.port or DEFAULT_PORTS.get(scheme)
    if host and port and not host.startswith("/"):
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
        except OSError as exc:
            raise KdbenchError(f"tracking database {_masked(uri)} is unreachable ({exc.strerror or exc}); "
                               "start it or pass another --tracking-uri") from None
    from mlflow.store.db.utils import create_sqlalchemy_engine

    try:
        engine = create_sqlalchemy_engine(pick_pg_driver(uri))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # sqlalchemy errors, a missing driver
        text = _first_line(exc)
        if parts.password:
            text = text.replace(parts.password, "***")
        raise KdbenchError(f"cannot open tracking database {_masked(uri)}: {text}") from None


def _create_store(make_client: Callable, uri: str):
    """Create and migrate the store once: concurrent first uses of a fresh sqlite store raced in
    MLflow's migrations (``duplicate column name``), so they take turns under a file lock."""
    path = sqlite_path(uri)
    lock = file_lock(_lock_path(path)) if path else contextlib.nullcontext()
    try:
        with lock:
            client = make_client()  # MLflow creates (and migrates) the store here
            client.search_experiments(max_results=1)
    except KdbenchError:
        raise
    except Exception as exc:
        text = _first_line(exc)
        if "locate revision" in text:
            text += (" (the database holds another tool's schema, e.g. an Optuna storage; "
                     "give MLflow a database of its own)")
        raise KdbenchError(f"cannot open MLflow store {_masked(uri)}: {text}") from None
    _READY.add(uri)
    return client


@dataclass
class Tracker:
    uri: str

    def __post_init__(self):
        _quiet()
        from mlflow.tracking import MlflowClient

        self._reaped: set = set()
        # each call whole: a Ctrl-C inside a SQLite statement left the store locked (interrupts)
        if self.uri in _READY:
            self.client = hold_ctrl_c_in(MlflowClient(tracking_uri=pick_pg_driver(self.uri)))
            return
        check_store(self.uri)
        self.client = hold_ctrl_c_in(_create_store(lambda: MlflowClient(tracking_uri=pick_pg_driver(self.uri)),
                                                   self.uri))

    def experiment_id(self, dataset: str) -> str:
        name = EXPERIMENT_PREFIX + dataset
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            self.reap([exp.experiment_id])
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # created concurrently by another process
            return self.client.get_experiment_by_name(name).experiment_id

    def reap(self, experiment_ids: list[str]) -> list[str]:
        """Mark runs of dead processes KILLED (:mod:`.claims`), once per experiment and tracker."""
        todo = [e for e in experiment_ids if e not in self._reaped]
        self._reaped.update(todo)
        return claims.reap(self.client, todo)

    def start(self, dataset: str, run_name: str, tags: dict, params: dict) -> str:
        """A new RUNNING run owned by this process (its heartbeat runs until :meth:`finish`)."""
        run = self.client.create_run(self.experiment_id(dataset), run_name=run_name)
        run_id = run.info.run_id
        claims.HEARTBEAT.add(self.client, run_id)  # owned from here: a Ctrl-C ends it KILLED (cli.root)
        self.fill(run_id, {**tags, **claims.owner_tags()}, params)
        return run_id

    def fill(self, run_id: str, tags: dict, params: dict) -> None:
        """Tags and (new) params of a run."""
        from mlflow.entities import Param, RunTag

        self.client.log_batch(
            run_id,
            params=[Param(k, _param(v)) for k, v in params.items()],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )

    def adopt(self, run_id: str) -> None:
        """Take over an existing run (e.g. a resumed study's parent): RUNNING, owned by this process."""
        self.client.update_run(run_id, status="RUNNING")
        claims.beat_for(self.client, run_id)

    def claim(self, dataset: str, config_hash: str, run_name: str, tags: dict) -> tuple[str | None, str]:
        """Claim the cell ``config_hash``: (its new RUNNING run, "") unless a FINISHED run or a live
        process's RUNNING run holds it: (None, why). Atomic under the store's claim lock."""
        from kdbench.data import cache_dir

        exp = self.experiment_id(dataset)
        with claims.store_lock(self.uri, cache_dir()):
            held = claims.holder(self.client, exp, config_hash)
            if held is not None:
                if held.info.status == "FINISHED":
                    return None, f"finished meanwhile (run {held.info.run_id})"
                tags = held.data.tags
                return None, (f"running in another live process (pid {tags.get(claims.PID_TAG)} on "
                              f"{tags.get(claims.HOST_TAG)}, run {held.info.run_id})")
            return self.start(dataset, run_name, {**tags, "config_hash": config_hash}, {}), ""

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(batch), 900):
            self.client.log_batch(run_id, metrics=batch[i : i + 900])

    def epoch_logger(self, run_id: str, then: Callable) -> Callable:
        """An ``on_epoch`` that logs the epoch's metrics on ``run_id`` (step = epoch), then calls ``then``."""

        def log(epoch_log) -> None:
            self.log_metrics(run_id, epoch_log.metrics, step=epoch_log.epoch)
            then(epoch_log)

        return log

    def set_tags(self, run_id: str, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
        claims.stop_beating(run_id)
        if reason:
            self.set_tags(run_id, {"failure_reason": reason[:4000]})
        self.client.set_terminated(run_id, status=status)

    def experiments(self) -> dict[str, str]:
        """Dataset name -> experiment id of every kdbench experiment in the store (other tools'
        experiments in a shared store are left out)."""
        found = claims.all_pages(functools.partial(self.client.search_experiments,
                                                   filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'"),
                                 key=lambda e: e.experiment_id)
        return {e.name.removeprefix(EXPERIMENT_PREFIX): e.experiment_id for e in found
                if e.name.startswith(EXPERIMENT_PREFIX)}

    def search(self, dataset: str | None, filter_string: str = "", max_results: int | None = None):
        """Runs of one dataset's experiment (or all kdbench experiments) as MLflow Run objects: all
        of them, newest first, or the newest ``max_results``."""
        if dataset is None:
            exps = list(self.experiments().values())
        else:
            exp = self.client.get_experiment_by_name(EXPERIMENT_PREFIX + dataset)
            exps = [exp.experiment_id] if exp else []
        if not exps:
            return []
        self.reap(exps)
        return claims.search_runs(self.client, exps, filter_string, limit=max_results)

    def run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:
            return False


def ended_status(exc: BaseException) -> str:
    """The status of a run its exception ended: KILLED for Ctrl-C (not a failure), else FAILED."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


def failure_reason(exc: BaseException) -> str:
    """How a failed run's ``failure_reason`` names the exception that ended it."""
    return f"{type(exc).__name__}: {exc}"


def _param(value) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
