"""Liveness of runs across processes and machines, whatever executes them (local processes, Ray).

* **Heartbeat**: every run kdbench creates carries the tags ``kdbench.host``, ``kdbench.pid`` and
  ``kdbench.heartbeat`` (epoch seconds); a thread of the process that owns the run refreshes the
  heartbeat every :data:`INTERVAL` seconds until the run ends.
* **Dead runs**: a RUNNING run is dead when its owner runs on this host and its process is gone, or
  when its heartbeat is older than :data:`STALE` seconds (a process on another host, e.g. a Ray
  worker on another node, cannot be checked by pid: its heartbeat age decides). :func:`reap` marks dead runs
  KILLED with a ``failure_reason``; a later command touching the store calls it.
* **Claims**: a cell (a config hash) is claimed by creating its RUNNING run under :func:`store_lock`
  after checking that no live run holds it; a second process finds the live claim and skips the cell.
  For a PostgreSQL store (or a tracking server whose database ``$KDBENCH_LOCK_URL`` names) the lock
  is a PostgreSQL advisory lock, which serialises every machine; otherwise a file lock, which
  serialises the processes of one machine, and several machines when they share the lock's file
  system (sqlite stores); see :func:`store_lock`.

Only the standard library is imported at module level; MLflow is reached through the client passed
in, PostgreSQL through SQLAlchemy (which MLflow brings).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
import threading
import time
from pathlib import Path

HOST_TAG, PID_TAG, HEARTBEAT_TAG = "kdbench.host", "kdbench.pid", "kdbench.heartbeat"
INTERVAL = float(os.environ.get("KDBENCH_HEARTBEAT_SECONDS", "15"))
STALE = 4 * INTERVAL
DEAD_REASON = "process died (no heartbeat)"


def owner_tags() -> dict[str, str]:
    """The tags that make a run this process's: host, pid, heartbeat now."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), HEARTBEAT_TAG: f"{time.time():.3f}"}


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is alive (a zombie is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def owner_alive(tags: dict, now: float | None = None) -> bool | None:
    """Whether the process owning a run (by its tags) is alive; None for a run without owner tags."""
    if HEARTBEAT_TAG not in tags:
        return None
    now = time.time() if now is None else now
    if tags.get(HOST_TAG) == socket.gethostname():
        try:
            if not pid_alive(int(tags.get(PID_TAG, "0"))):
                return False
        except ValueError:
            pass
    try:
        return now - float(tags[HEARTBEAT_TAG]) < STALE
    except ValueError:
        return False


# --------------------------------------------------------------------------- heartbeat


class _Heartbeat:
    """One thread per process refreshing the heartbeat of the runs this process owns."""

    def __init__(self):
        self.runs: dict[str, object] = {}  # run id -> MLflow client
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.pid = os.getpid()

    def add(self, client, run_id: str) -> None:
        with self.lock:
            if self.pid != os.getpid():  # a forked child: the parent's thread and runs are not ours
                self.__init__()
            self.runs[run_id] = client
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._beat, name="kdbench-heartbeat", daemon=True)
                self.thread.start()

    def remove(self, run_id: str) -> None:
        with self.lock:
            self.runs.pop(run_id, None)

    def owned(self) -> dict:
        with self.lock:
            return dict(self.runs)

    def _beat(self) -> None:
        while True:
            time.sleep(INTERVAL)
            for run_id, client in self.owned().items():
                try:
                    client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.3f}")
                except Exception:  # the store is busy or the run ended meanwhile: next beat
                    pass


HEARTBEAT = _Heartbeat()


def beat_for(client, run_id: str) -> None:
    """Make ``run_id`` this process's (owner tags) and keep its heartbeat until :func:`stop_beating`."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in owner_tags().items()])
    HEARTBEAT.add(client, run_id)


def stop_beating(run_id: str) -> None:
    HEARTBEAT.remove(run_id)


def end_owned_runs(reason: str) -> None:
    """Mark every run this process owns KILLED (best effort): for a process about to exit."""
    for run_id, client in HEARTBEAT.owned().items():
        try:
            client.set_tag(run_id, "failure_reason", reason)
            client.set_terminated(run_id, status="KILLED")
        except Exception:
            pass
        HEARTBEAT.remove(run_id)


# --------------------------------------------------------------------------- searches


SEARCH_PAGE = 5000  # results per MLflow search call (its servers cap a page at 50,000)


def all_pages(fetch, key, limit: int | None = None) -> list:
    """What a paged MLflow search (``fetch(max_results=, page_token=)``) finds: all of it, or the
    first ``limit``. One call returns one page, so the pages are followed to the end. An item
    added while they are read can push an older one onto the next page, where it would come a
    second time: each is kept once (by ``key``)."""
    found, seen, token = [], set(), None
    while limit is None or len(found) < limit:
        want = SEARCH_PAGE if limit is None else min(SEARCH_PAGE, limit - len(found))
        page = fetch(max_results=want, page_token=token)
        for item in page:
            if key(item) not in seen:
                seen.add(key(item))
                found.append(item)
        token = page.token
        if not token:
            break
    return found


def search_runs(client, experiment_ids: list[str], filter_string: str = "", limit: int | None = None) -> list:
    """The runs matching ``filter_string``, newest first: all of them, or the newest ``limit``."""
    return all_pages(functools.partial(client.search_runs, experiment_ids, filter_string),
                     key=lambda run: run.info.run_id, limit=limit)


# --------------------------------------------------------------------------- dead runs


def reap(client, experiment_ids: list[str]) -> list[str]:
    """Mark the RUNNING runs of dead processes KILLED (trials: ``trial_state=FAILED``); their ids."""
    if not experiment_ids:
        return []
    runs = search_runs(client, experiment_ids, "attributes.status = 'RUNNING'")
    now, dead = time.time(), []
    for run in runs:
        if owner_alive(run.data.tags, now) is False:
            end_dead_run(client, run)
            dead.append(run.info.run_id)
    return dead


def end_dead_run(client, run) -> None:
    tags = run.data.tags
    try:
        if "trial" in tags:
            client.set_tag(run.info.run_id, "trial_state", "FAILED")
        client.set_tag(run.info.run_id, "failure_reason",
                       f"{DEAD_REASON}: pid {tags.get(PID_TAG)} on {tags.get(HOST_TAG)}")
        client.set_terminated(run.info.run_id, status="KILLED")
    except Exception:  # ended meanwhile by its owner or another reaper
        pass


# --------------------------------------------------------------------------- claims


def lock_path(uri: str, cache: Path) -> Path:
    """The claim lock of a store: next to a sqlite file, else in the cache (one per store URI)."""
    if uri.lower().startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        return db.with_name(db.name + ".claims.lock")
    folder = cache / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / (hashlib.sha256(uri.encode()).hexdigest()[:16] + ".claims.lock")


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on ``path`` (created if needed) across processes of this machine (and of
    machines sharing the file system, where it supports ``flock``); a no-op without ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: the advisory lock's key: the first 8 bytes of sha256("kdbench.claims") as a signed int64
ADVISORY_KEY = int.from_bytes(hashlib.sha256(b"kdbench.claims").digest()[:8], "big", signed=True)
_ENGINES: dict[str, object] = {}  # one SQLAlchemy engine per lock database and process


def lock_database(uri: str) -> str | None:
    """The PostgreSQL database whose advisory lock serialises claims on ``uri``: the store itself,
    else ``$KDBENCH_LOCK_URL`` (for a tracking server backed by PostgreSQL); None: a file lock."""
    if uri.lower().startswith(("postgresql://", "postgresql+")):
        return uri
    url = os.environ.get("KDBENCH_LOCK_URL", "")
    return url if url.lower().startswith(("postgresql://", "postgresql+")) else None


@contextlib.contextmanager
def advisory_lock(url: str):
    """``pg_advisory_lock`` held for the block on its own connection (released if the process dies:
    PostgreSQL ends the session)."""
    import importlib.util

    import sqlalchemy

    engine = _ENGINES.get(url)
    if engine is None or _ENGINES.get("pid") != os.getpid():  # not an engine inherited by fork
        _ENGINES.clear()
        driver = url  # as tracking.pick_pg_driver (not imported: tracking imports this module)
        if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
            driver = "postgresql+psycopg2://" + url[len("postgresql://"):]
        engine = _ENGINES[url] = sqlalchemy.create_engine(driver, pool_pre_ping=True, pool_size=1)
        _ENGINES["pid"] = os.getpid()
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_KEY})
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_KEY})
            connection.commit()


@contextlib.contextmanager
def store_lock(uri: str, cache: Path):
    """An exclusive lock for claiming cells of the store ``uri``: a PostgreSQL advisory lock for a
    PostgreSQL store (:func:`lock_database`), else a file lock (see the module doc)."""
    database = lock_database(uri)
    with advisory_lock(database) if database else file_lock(lock_path(uri, cache)):
        yield


def holder(client, experiment_id: str, config_hash: str):
    """The run that holds ``config_hash``: a FINISHED one, or a RUNNING one owned by a live process
    (dead ones are marked KILLED); None when the cell is free.

    The RUNNING runs are read first: a run's owner ends it outside the claim lock, and a status
    only moves on from RUNNING, so a run that finishes between the two reads is seen by one of
    them. Read the other way round, a run finishing in between was in neither, and a second
    bench ran its cell again (seen once in CI: two benches of one suite)."""
    runs = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' AND tags.config_hash = '{config_hash}'",
                              max_results=100)
    now, live = time.time(), None
    for run in runs:
        alive = owner_alive(run.data.tags, now)
        if alive is False:
            end_dead_run(client, run)
        elif alive and live is None:
            live = run
    done = client.search_runs([experiment_id], f"attributes.status = 'FINISHED' AND tags.config_hash = '{config_hash}'",
                              max_results=1)
    return done[0] if done else live
