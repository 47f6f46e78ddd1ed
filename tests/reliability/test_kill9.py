"""kdbench under kill -9 and concurrency, with real processes (issue 15). Run it alone for the table::

    OMP_NUM_THREADS=1 python -m pytest -q tests/reliability/test_kill9.py      (or: python THIS_FILE)

Each scenario adds a row: kill points tried, finished runs lost / duplicated, runs left RUNNING
after a later command touched the store, orphaned processes, failed processes (goal: all zero).
Cells and trials train 1-2 epochs on the embedded MNIST-1D; the suite's teacher is a checkpoint.
"""
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import checkpoint_suite

ROWS: list[dict] = []
COLUMNS = ("scenario", "kill points", "lost", "duplicated", "left RUNNING", "orphans", "failed procs")



@pytest.fixture(scope="module", autouse=True)
def table(request):
    yield
    if not ROWS:
        return
    widths = [max(len(col), *(len(str(row.get(col, ""))) for row in ROWS)) for col in COLUMNS]
    lines = ["", "  ".join(col.ljust(w) for col, w in zip(COLUMNS, widths))]
    lines += ["  ".join(str(row.get(col, "")).ljust(w) for col, w in zip(COLUMNS, widths)) for row in ROWS]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines), flush=True)


@pytest.fixture
def rel(env, monkeypatch):
    """A working directory with the suite ``rel.toml`` (checkpoint teacher) and fast heartbeats."""
    monkeypatch.setenv("KDBENCH_HEARTBEAT_SECONDS", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    checkpoint_suite(env, "rel", epochs=2)
    return env


def kdbench(*args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdbench", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def runs(env, where: str = "1") -> list[tuple]:
    """(run id, status, role, config_hash, leaderboard) of the store's runs, read raw (no MLflow)."""
    query = ("SELECT r.run_uuid, r.status, "
             "(SELECT value FROM tags WHERE run_uuid = r.run_uuid AND key = 'role'), "
             "(SELECT value FROM tags WHERE run_uuid = r.run_uuid AND key = 'config_hash'), "
             "(SELECT value FROM tags WHERE run_uuid = r.run_uuid AND key = 'leaderboard') "
             f"FROM runs r WHERE {where}")
    return store_rows(env, query)


def store_rows(env, query: str) -> list[tuple]:
    """The rows of ``query`` on the MLflow store, read-only and raw (no MLflow); none while the store
    is missing or busy."""
    db = env / "mlflow.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute(query).fetchall()
    except sqlite3.Error:
        return []


def wait_for(what: str, check, timeout: float = 180, proc: subprocess.Popen | None = None):
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended first:\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def descendants(pid: int) -> set[int]:
    """Processes started (directly or not) by ``pid``, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids) -> set[int]:
    from kdbench.workflows.claims import pid_alive

    return {pid for pid in pids if pid_alive(pid)}


def orphans_of(children, seconds: float = 15) -> set[int]:
    """The children still alive ``seconds`` after their parent was killed (each should die with it),
    then killed: none is left behind for the other tests."""
    end = time.time() + seconds
    while alive(children) and time.time() < end:
        time.sleep(0.2)
    left = alive(children)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


def touch_store(env) -> None:
    """A later command touching the store: its search marks runs of dead processes KILLED."""
    from kdbench.workflows.tracking import Tracker

    Tracker(f"sqlite:///{env}/mlflow.db").search("mnist1d")


def suite_hashes(env) -> list[str]:
    from kdbench.workflows import bench, suites

    return [cell.config_hash for cell in bench.plan_cells(suites.load_suite(str(env / "rel.toml")))]


def tally(env, scenario: str, kill_points: int, orphans: int = 0, failed: int = 0) -> dict:
    hashes = suite_hashes(env)
    finished = [r[3] for r in runs(env, "r.status = 'FINISHED'") if r[2] == "student"]
    row = {"scenario": scenario, "kill points": kill_points,
           "lost": sum(h not in finished for h in hashes),
           "duplicated": sum(finished.count(h) - 1 for h in hashes if finished.count(h) > 1),
           "left RUNNING": len(runs(env, "r.status = 'RUNNING'")), "orphans": orphans, "failed procs": failed}
    ROWS.append(row)
    return row


# --------------------------------------------------------------------------- scenarios


def test_killed_runs_are_marked_killed(env, monkeypatch, tmp_path):
    """kill -9 of `kdbench run` while the teacher trains, then while the student trains."""
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path / "own-cache"))  # the teacher is trained here
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for role, method in (("teacher", "kd"), ("student", "vanilla")):  # vanilla: no teacher to train first
        proc = kdbench("run", "--method", method, "--epochs", 2, cwd=env)
        wait_for(f"a RUNNING {role} run", lambda: any(r[1] == "RUNNING" and r[2] == role for r in runs(env)),
                 proc=proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    touch_store(env)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{env}/mlflow.db")
    killed = [client.get_run(r[0]) for r in runs(env, "r.status = 'KILLED'")]
    row = {"scenario": "kdbench run, kill -9 (teacher, student)", "kill points": 2, "lost": 0, "duplicated": 0,
           "left RUNNING": len(runs(env, "r.status = 'RUNNING'")), "orphans": 0, "failed procs": 0}
    ROWS.append(row)
    assert row["left RUNNING"] == 0
    assert sorted(r.data.tags["role"] for r in killed) == ["student", "teacher"]
    assert all(r.data.tags["failure_reason"].startswith("process died (no heartbeat): pid") for r in killed)


def test_bench_jobs_2_killed_leaves_no_orphan_and_resumes(rel):
    proc = kdbench("bench", "rel.toml", "--jobs", 2, cwd=rel)
    wait_for("a RUNNING kd cell", lambda: len([r for r in runs(rel, "r.status = 'RUNNING'") if r[2] == "student"]) >= 1
             and len(runs(rel, "r.status = 'FINISHED'")) >= 3, proc=proc)
    children = descendants(proc.pid)
    assert len(children) >= 2  # the workers (and the resource tracker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    orphans = orphans_of(children)
    again = kdbench("bench", "rel.toml", cwd=rel)
    out, _ = again.communicate(timeout=300)
    row = tally(rel, "bench --jobs 2, kill -9 parent mid-cell, rerun", 1, orphans=len(orphans),
                failed=int(again.returncode != 0))
    assert row == {**row, "lost": 0, "duplicated": 0, "left RUNNING": 0, "orphans": 0, "failed procs": 0}, out


def running_cell_pids(env) -> dict[str, int]:
    """run id -> the pid (``kdbench.pid`` tag) of each RUNNING student run."""
    rows = store_rows(env, "SELECT r.run_uuid, p.value FROM runs r JOIN tags p ON p.run_uuid = r.run_uuid AND "
                           "p.key = 'kdbench.pid' JOIN tags o ON o.run_uuid = r.run_uuid AND o.key = 'role' AND "
                           "o.value = 'student' WHERE r.status = 'RUNNING'")
    return {run: int(pid) for run, pid in rows}


def test_bench_jobs_2_a_killed_worker_is_rerun_and_the_suite_finishes(rel):
    """kill -9 of one worker of `bench --jobs 2`: Python's process pool breaks (the other worker's
    cell is ended with it); both cells are run again in a new pool and the same command finishes
    the suite, each cell once, the lost attempts KILLED."""
    (rel / "rel.toml").write_text((rel / "rel.toml").read_text().replace("epochs = 2", "epochs = 4"))
    proc = kdbench("bench", "rel.toml", "--jobs", 2, cwd=rel)
    workers = wait_for("a cell RUNNING in a worker", lambda: {
        pid for pid in running_cell_pids(rel).values() if pid in descendants(proc.pid)}, proc=proc)
    victim = next(iter(workers))
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    touch_store(rel)
    row = tally(rel, "bench --jobs 2, kill -9 one worker mid-cell", 1, failed=int(proc.returncode != 0))
    assert row == {**row, "lost": 0, "duplicated": 0, "left RUNNING": 0, "failed procs": 0}, out
    assert "6 finished, 0 failed" in out, out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{rel}/mlflow.db")
    killed = [client.get_run(r[0]) for r in runs(rel, "r.status = 'KILLED'")]
    assert killed and any(r.data.tags.get("kdbench.pid") == str(victim) for r in killed)
    assert not runs(rel, "r.status = 'FAILED'")


def test_a_job_that_kills_its_worker_every_time_spends_its_own_retries_not_its_neighbours():
    """The local pool breaks as a whole when one worker dies, failing the job beside it too; only
    the job whose worker died is charged a retry: it is recorded lost after 1 + max_retries
    deaths, and the job that shared the pool with it each time finishes."""
    import helpers
    from kdbench.workflows.executors import ExecutorConfig, Job, run_local

    jobs = [Job(key="crasher", fn=helpers.job_kill_own_worker, args=(0.5,)),
            Job(key="sleeper", fn=helpers.job_sleep, args=(3.0,))]
    done, lost = {}, {}
    run_local(jobs, ExecutorConfig(jobs=2, max_retries=1), on_done=lambda job, result: done.update({job.key: result}),
              on_lost=lambda job, why: lost.update({job.key: why}))
    assert done == {"sleeper": "done"}
    assert list(lost) == ["crasher"] and lost["crasher"].startswith("a worker process died 2 times"), lost


def test_two_benches_of_one_suite_run_each_cell_once(rel):
    first, second = kdbench("bench", "rel.toml", cwd=rel), kdbench("bench", "rel.toml", cwd=rel)
    outs = [proc.communicate(timeout=400)[0] for proc in (first, second)]
    row = tally(rel, "two `bench` of one suite at once", 0,
                failed=sum(proc.returncode != 0 for proc in (first, second)))
    assert row == {**row, "lost": 0, "duplicated": 0, "left RUNNING": 0, "failed procs": 0}, outs
    assert "skipped" in outs[0] + outs[1] or "already finished" in outs[0] + outs[1]


def test_tune_reaches_its_trials_after_a_dead_worker(env, monkeypatch):
    import optuna
    from optuna.trial import TrialState

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ("tune", "--method", "vanilla", "--tune-recipe", "--trials", 3, "--epochs", 1, "--study", "r",
            "--heartbeat", 30, "--no-retrain", "--pruner", "none")
    proc = kdbench(*args, cwd=env)
    db = env / "optuna.db"

    def running_trial():
        if not db.exists():
            return False
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                return con.execute("SELECT count(*) FROM trials t JOIN trial_user_attributes a ON "
                                   "a.trial_id = t.trial_id WHERE t.state = 'RUNNING' AND a.key = 'kdbench.pid'"
                                   ).fetchone()[0]
        except sqlite3.Error:
            return False

    wait_for("a RUNNING trial", running_trial, proc=proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    worker = kdbench(*args, cwd=env)  # a surviving worker: no wait for 2 x heartbeat
    out, _ = worker.communicate(timeout=300)
    touch_store(env)
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{db}")
    states = [trial.state for trial in study.trials]
    counted = sum(state in (TrialState.COMPLETE, TrialState.PRUNED) for state in states)
    ROWS.append({"scenario": "tune, kill -9 mid-trial, resume", "kill points": 1, "lost": 3 - counted,
                 "duplicated": max(0, counted - 3), "left RUNNING": states.count(TrialState.RUNNING)
                 + len(runs(env, "r.status = 'RUNNING'")), "orphans": 0, "failed procs": int(worker.returncode != 0)})
    assert worker.returncode == 0, out
    assert counted == 3 and TrialState.RUNNING not in states and states.count(TrialState.FAIL) == 1
    assert runs(env, "r.status = 'RUNNING'") == []


def lockstep_group(env, exclude: set) -> set[str]:
    """The run ids of a lockstep group of 3 training in one process, all RUNNING (a group's runs
    carry the tag ``lockstep`` once it has set them up, just before the shared teacher forward
    starts); empty while none is. ``exclude``: run ids not to count (earlier kills' runs)."""
    by_pid: dict[str, set[str]] = {}
    rows = store_rows(env, "SELECT r.run_uuid, p.value FROM runs r JOIN tags l ON l.run_uuid = r.run_uuid AND "
                           "l.key = 'lockstep' AND l.value = '3' JOIN tags p ON p.run_uuid = r.run_uuid AND "
                           "p.key = 'kdbench.pid' WHERE r.status = 'RUNNING'")
    for run_id, pid in rows:
        if run_id not in exclude:
            by_pid.setdefault(pid, set()).add(run_id)
    return next((group for group in by_pid.values() if len(group) == 3), set())


def test_bench_lockstep_killed_mid_group_then_rerun(rel):
    """kill -9 of `bench --lockstep` while a group of 3 trains (in the bench process itself), then
    of `bench --lockstep --jobs 2` while a group trains in a worker; the same command then finishes
    the suite: each cell once, the killed groups' runs KILLED, the runs finished before untouched."""
    suite = (rel / "rel.toml").read_text()
    (rel / "rel.toml").write_text(suite.replace(
        'methods = ["vanilla", {name = "kd", params = {T = 2.0}}]',
        'methods = ["vanilla", {name = "kd", params = {T = 2.0}}, "at", "fitnets"]').replace(
        "epochs = 2", "epochs = 4"))  # 4: a group trains for seconds, so the poll sees it RUNNING
    assert '"at", "fitnets"' in (rel / "rel.toml").read_text()
    orphans, killed_groups = set(), []
    for jobs in (1, 2):
        proc = kdbench("bench", "rel.toml", "--lockstep", "--jobs", jobs, cwd=rel)
        seen = set().union(*killed_groups)  # the first kill's runs stay RUNNING until a store is touched
        group = wait_for("a lockstep group training", lambda: lockstep_group(rel, seen), proc=proc)
        finished_before = {r[0] for r in runs(rel, "r.status = 'FINISHED'")}
        children = descendants(proc.pid)
        assert jobs == 1 or len(children) >= 2  # the group trains in a worker process
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        assert "lockstep: 9 cells in 3 groups" in out or jobs == 2, out
        orphans |= orphans_of(children)
        killed_groups.append(group)
        assert finished_before <= {r[0] for r in runs(rel, "r.status = 'FINISHED'")}
    again = kdbench("bench", "rel.toml", "--lockstep", cwd=rel)
    out, _ = again.communicate(timeout=300)
    touch_store(rel)
    row = tally(rel, "bench --lockstep, kill -9 mid-group (jobs 1, 2), rerun", 2, orphans=len(orphans),
                failed=int(again.returncode != 0))
    assert row == {**row, "lost": 0, "duplicated": 0, "left RUNNING": 0, "orphans": 0, "failed procs": 0}, out
    assert "lockstep:" in out, out

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{rel}/mlflow.db")
    # the bench process's own group: marked KILLED by a later command (its pid is gone); a worker's
    # group: by the worker as it follows its dead parent (or, had that failed, by a later command)
    reasons = (("process died (no heartbeat): pid",), ("the kdbench bench process died", "process died"))
    for killed, reason in zip(killed_groups, reasons):
        assert len(killed) == 3
        ended = [client.get_run(run_id) for run_id in killed]
        assert [r.info.status for r in ended] == ["KILLED"] * len(ended)
        assert all(r.data.tags["failure_reason"].startswith(reason) for r in ended), [
            r.data.tags.get("failure_reason") for r in ended]
    # every run that did not finish was killed by one of the two kills: nothing failed
    unfinished = runs(rel, "r.status != 'FINISHED'")
    assert {r[1] for r in unfinished} == {"KILLED"} and set().union(*killed_groups) <= {r[0] for r in unfinished}


def test_concurrent_first_use_of_a_fresh_store(env):
    script = ("import sys; from kdbench.workflows.tracking import Tracker; t = Tracker(sys.argv[1]); "
              "r = t.start('mnist1d', 'x', {'role': 'probe'}, {}); t.finish(r)")
    uri = f"sqlite:///{env}/fresh.db"
    procs = [subprocess.Popen([sys.executable, "-c", script, uri], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    failed = sum(proc.returncode != 0 for proc in procs)
    ROWS.append({"scenario": "4 processes, one fresh sqlite store", "kill points": 0, "lost": 0, "duplicated": 0,
                 "left RUNNING": 0, "orphans": 0, "failed procs": failed})
    assert failed == 0, errors


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
