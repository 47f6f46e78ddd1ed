"""Tracking stores that cannot be used fail fast in one line; a fresh sqlite store survives
concurrent first use; PostgreSQL works with psycopg2 (issue 15, items 5, 6, 9, 12)."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kdbench.errors import KdbenchError
from kdbench.workflows import tracking
from kdbench.workflows.tracking import Tracker

PG_URL_FILE = Path("/tmp/kdbench-postgres.url")
ROOT = Path(__file__).resolve().parents[2]


def kdbench(*args, cwd, env=None, timeout=60):
    """``python -m kdbench ARGS`` in a real process: (exit code, stdout, stderr)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "kdbench", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def pg_url() -> str:
    if not PG_URL_FILE.exists():
        pytest.skip("no PostgreSQL for the tests: run `bash .ci/services.d/postgres.sh` (writes /tmp/kdbench-postgres.url)")
    return PG_URL_FILE.read_text().strip()


@pytest.fixture
def pg_schema():
    """A PostgreSQL URL whose tables go to a schema of their own (dropped afterwards)."""
    url = pg_url()
    psycopg2 = pytest.importorskip("psycopg2")
    schema = "kdbtest_" + uuid.uuid4().hex[:10]
    try:
        conn = psycopg2.connect(url, connect_timeout=3)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL at {url} does not answer ({exc}); run `bash .ci/services.d/postgres.sh`")
    conn.autocommit = True
    conn.cursor().execute(f"CREATE SCHEMA {schema}")
    yield f"{url}?options=-csearch_path%3D{schema}"
    conn.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
    conn.close()


@pytest.mark.parametrize("uri, words", [
    ("notascheme://x", "unknown scheme 'notascheme'"),
    ("http://127.0.0.1:1", "does not answer"),
    ("sqlite:///{tmp}/afile/mlflow.db", "is a file, not a folder"),
    ("postgresql://kdbench:secret@127.0.0.1:1/kdbench", "is unreachable"),
])
def test_unusable_store_fails_at_once_in_one_line(env, uri, words):
    (env / "afile").write_text("not a folder")
    code, out, err = kdbench("run", "--epochs", "1", "--tracking-uri", uri.format(tmp=env), cwd=env, timeout=40)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert "secret" not in err and "Model registry" not in err


def test_a_file_that_is_no_database_is_named(env):
    (env / "junk.db").write_bytes(b"garbage" * 1000)
    with pytest.raises(KdbenchError, match="junk.db is not a usable SQLite database"):
        Tracker(f"sqlite:///{env}/junk.db")


def test_epochs_zero_is_refused(env):
    code, out, err = kdbench("run", "--epochs", "0", cwd=env, timeout=40)
    assert (code, err.strip()) == (1, "error: --epochs must be at least 1, got 0")


def test_concurrent_first_use_of_a_fresh_store(env):
    """Three processes create, migrate and write one fresh sqlite store at once: all succeed."""
    uri = f"sqlite:///{env}/fresh/mlflow.db"
    script = ("import sys; from kdbench.workflows.tracking import Tracker; t = Tracker(sys.argv[1]); "
              "r = t.start('mnist1d', 'x', {'role': 'probe'}, {'a': 1}); t.log_metrics(r, {'m': 1.0}, step=1); "
              "t.finish(r)")
    procs = [subprocess.Popen([sys.executable, "-c", script, uri], stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], errors
    assert len(Tracker(uri).search("mnist1d", "attributes.status = 'FINISHED'")) == 3


def test_postgresql_store_works_with_psycopg2(env, pg_schema):
    assert tracking.pick_pg_driver("postgresql://u@h/db").startswith(
        "postgresql+psycopg2://" if _only_psycopg2() else "postgresql://")
    tracker = Tracker(pg_schema)
    run_id = tracker.start("mnist1d", "probe", {"role": "probe"}, {"a": 1})
    tracker.finish(run_id)
    assert tracker.client.get_run(run_id).info.status == "FINISHED"


def test_a_refusing_postgresql_fails_fast(env):
    url = pg_url()
    refusing = url.replace(":54329/", ":1/") if ":54329/" in url else "postgresql://kdbench@127.0.0.1:1/kdbench"
    with pytest.raises(KdbenchError, match="is unreachable"):
        Tracker(refusing)


def _only_psycopg2() -> bool:
    import importlib.util

    return importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None


def test_concurrent_first_use_of_a_fresh_optuna_storage(env):
    script = ("import sys, optuna; from kdbench.workflows import studies; "
              "s = studies.open_storage(None, sys.argv[1]); "
              "optuna.create_study(storage=s, study_name='c', load_if_exists=True)")
    uri = f"sqlite:///{env}/fresh/mlflow.db"
    (env / "fresh").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", script, uri], stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], errors


def test_a_cell_finishing_while_another_bench_claims_it_stays_held(env):
    """A run's owner ends it outside the claim lock. A run that finishes between the claim's two
    reads (its RUNNING runs, its FINISHED run) must still hold the cell: read FINISHED first, it
    was in neither read, and two benches of one suite ran that cell twice (seen in CI)."""
    from kdbench.workflows import claims

    tracker = Tracker(f"sqlite:///{env}/mlflow.db")
    run_id = tracker.start("mnist1d", "cell", {"config_hash": "abc"}, {})  # RUNNING, this live process's
    exp = tracker.experiment_id("mnist1d")

    class FinishesAfterTheFirstRead:  # the owner's set_terminated lands right after the first search
        def __init__(self, client):
            self.client, self.reads = client, 0

        def search_runs(self, *args, **kwargs):
            found = self.client.search_runs(*args, **kwargs)
            self.reads += 1
            if self.reads == 1:
                tracker.finish(run_id)
            return found

        def __getattr__(self, name):
            return getattr(self.client, name)

    held = claims.holder(FinishesAfterTheFirstRead(tracker.client), exp, "abc")
    assert held is not None and held.info.run_id == run_id
    assert tracker.client.get_run(run_id).info.status == "FINISHED"
