"""Optuna studies shared by workers: a killed worker's trial is failed, not counted (heartbeat);
two workers share a PostgreSQL study."""
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kdbench.workflows import studies
from kdbench.workflows.tracking import Tracker

ROOT = Path(__file__).resolve().parents[2]
PG_URL_FILE = Path(os.environ.get("KDBENCH_PG_URL_FILE", "/tmp/kdbench-postgres.url"))


def worker_cmd(*args):
    code = "from kdbench.cli import main; main()"
    return [sys.executable, "-c", code, "tune", *map(str, args)]


def worker_env(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins"), env.get("PYTHONPATH", "")])
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    return env


def _wait_for(predicate, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_worker_resumes_without_counting_the_killed_trial(env):
    storage = f"sqlite:///{env}/optuna.db"
    args = ("--method", "vanilla", "--tune-recipe", "--trials", 2, "--epochs", 3, "--study", "k",
            "--heartbeat", 1, "--no-retrain", "--pruner", "none")
    proc = subprocess.Popen(worker_cmd(*args), cwd=env, env=worker_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def running():
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        db = env / "optuna.db"
        if not db.exists():
            return False
        try:  # read-only, raw: an Optuna client here could race the worker creating the schema
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                return [n for (n,) in con.execute("SELECT number FROM trials WHERE state = 'RUNNING'")]
        except sqlite3.Error:
            return False

    (killed,) = _wait_for(running, 120, "a RUNNING trial")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(2.5)  # past the grace period (2 × heartbeat)

    out = subprocess.run(worker_cmd(*args), cwd=env, env=worker_env(env), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    study = optuna.load_study(study_name="k", storage=storage)
    states = [t.state for t in study.trials]
    assert study.trials[killed].state == TrialState.FAIL
    assert study.trials[killed].user_attrs.get("fail_reason") == "worker died (stale heartbeat)"
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 2  # budget held
    assert TrialState.RUNNING not in states
    tracker = Tracker(f"sqlite:///{env}/mlflow.db")
    for dead in tracker.search("mnist1d", f"tags.study = 'k' AND tags.trial = '{killed}'"):
        # (none when the worker died before the trial's run was created)
        assert dead.info.status == "KILLED" and dead.data.tags["trial_state"] == "FAILED"


@pytest.fixture(scope="module")
def postgres_url():
    """The URL of CI's PostgreSQL, or of one started here when none is on record, stopped again
    after this module's tests: run by hand, they leave no server behind."""
    if PG_URL_FILE.exists():
        yield PG_URL_FILE.read_text().strip()
        return
    script = ROOT / ".ci" / "services.d" / "postgres.sh"
    if not any(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.skip("no PostgreSQL installed (run .ci/services.d/postgres.sh as root)")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    try:
        if out.returncode != 0 or not PG_URL_FILE.exists():
            pytest.skip(f"PostgreSQL could not be started: {out.stderr.strip()[-300:]}")
        yield PG_URL_FILE.read_text().strip()
    finally:
        subprocess.run(["bash", str(script), "stop"], capture_output=True, text=True)


def test_two_workers_share_a_postgres_study(env, postgres_url):
    url = postgres_url
    pytest.importorskip("psycopg2", reason="psycopg2-binary (the test extra) is needed for PostgreSQL")
    try:
        optuna.study.get_all_study_names(studies.open_storage(url))
    except Exception as exc:
        pytest.skip(f"PostgreSQL at {studies.mask_url(url)} is not reachable: {exc}")
    name = f"pg-{uuid.uuid4().hex[:8]}"
    args = ("--method", "vanilla", "--tune-recipe", "--trials", 4, "--epochs", 1, "--study", name,
            "--storage", url, "--no-retrain")
    Tracker(f"sqlite:///{env}/mlflow.db").experiment_id("mnist1d")  # create the MLflow schema once, not racing
    procs = [subprocess.Popen(worker_cmd(*args), cwd=env, env=worker_env(env), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    study = optuna.load_study(study_name=name, storage=studies.open_storage(url))
    counted = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == 4
    assert all(t.state != TrialState.RUNNING for t in study.trials)
    # every trial ran in exactly one worker, and each counted trial has exactly one MLflow run
    lines = [line for out in outs for line in out.splitlines() if line.startswith("trial #")]
    numbers = [int(line.split()[1][1:]) for line in lines]
    assert sorted(numbers) == sorted({t.number for t in study.trials} - {
        t.number for t in study.trials if t.user_attrs.get("fail_reason", "").startswith("over budget")})
    assert len(numbers) == len(set(numbers))
    tracker = Tracker(f"sqlite:///{env}/mlflow.db")
    runs = tracker.search("mnist1d", f"tags.study = '{name}' AND tags.role != 'study'")
    by_trial = [r.data.tags["trial"] for r in runs if r.data.tags.get("trial_state") in ("COMPLETE", "PRUNED")]
    assert sorted(map(int, by_trial)) == sorted(t.number for t in counted)
    optuna.delete_study(study_name=name, storage=studies.open_storage(url))
