"""A suite and a study on a real Ray cluster of two nodes (both on this machine, 1 CPU each) with an
``mlflow server`` backed by PostgreSQL, as the README's "Scaling out" section sets them up.

* the suite (6 cells, one harness-trained teacher): a Ray worker running a kd cell is killed with
  SIGKILL mid-way; Ray re-runs the cell; at the end every cell has exactly one FINISHED run, the
  killed run is KILLED (never RUNNING), and the teacher was trained once although the two nodes
  have separate teacher caches (the second fetches the weights from the teacher's MLflow run);
* the same with ``--lockstep``: the worker training a group of 3 cells is killed; Ray re-runs the
  group, and every cell still ends with exactly one FINISHED run;
* a study with 2 Optuna workers as Ray tasks on a PostgreSQL storage: exactly the asked trials;
* a multi-node cluster with a local sqlite store is refused in one line, exit 2.

The cluster, the server and the databases are made once for the module and torn down at its end
(process groups killed, databases dropped). Skips without PostgreSQL (.ci/services.d/postgres.sh).
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ray = pytest.importorskip("ray", reason="needs Ray: pip install 'kdbench[ray]'")

PG_URL_FILE = Path(os.environ.get("KDBENCH_PG_URL_FILE", "/tmp/kdbench-postgres.url"))
BIN = Path(sys.executable).parent
SUITE = """
name = "dist"
dataset = "mnist1d"
seeds = [0, 1, 2]
methods = ["vanilla", "kd"]
[recipe]
epochs = 2
[[pairs]]
teacher = "cnn1d_2x8"
student = "cnn1d_2x8"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env, log: Path) -> subprocess.Popen:
    """A process in its own session, so that teardown kills it and everything it started."""
    return subprocess.Popen([str(a) for a in args], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(procs: list[subprocess.Popen]) -> list[int]:
    """SIGTERM to every process group at once (Ray and MLflow shut down cleanly), then SIGKILL to
    whatever is left in their sessions after 5 s; the pids still alive after that (none, or a
    failure to tear down)."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            for pid in [pid for proc in procs for pid in session_left(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.time() + grace
        while time.time() < deadline:
            for proc in procs:
                proc.poll()  # reap our own children
            if not any(session_left(proc.pid) for proc in procs):
                return []
            time.sleep(0.2)
    return [pid for proc in procs for pid in session_left(proc.pid)]


def session_left(sid: int) -> list[int]:
    """The live processes (zombies excluded) of session ``sid``."""
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    with open(f"/proc/{entry}/stat") as stat:
                        if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                            left.append(int(entry))
            except OSError:
                pass
    return left


@pytest.fixture(scope="module")
def databases():
    """Two fresh PostgreSQL databases (MLflow's, Optuna's), dropped at the end."""
    if not PG_URL_FILE.exists():
        pytest.skip(f"no PostgreSQL URL in {PG_URL_FILE} (start it: bash .ci/services.d/postgres.sh start)")
    import psycopg2

    base = PG_URL_FILE.read_text().strip()
    parts = urlsplit(base)
    # CI's throwaway cluster trusts local connections: its superuser creates the databases, owned
    # by the role of the URL
    try:
        admin = psycopg2.connect(host=parts.hostname, port=parts.port, user="postgres", dbname="postgres")
    except psycopg2.OperationalError:
        admin = psycopg2.connect(host=parts.hostname, port=parts.port, user=parts.username,
                                 password=parts.password, dbname=parts.path.lstrip("/"))
    admin.autocommit = True
    names = [f"kdbench_dist_{os.getpid()}_{int(time.time())}_{kind}" for kind in ("mlflow", "optuna")]
    with admin.cursor() as cur:
        for name in names:
            try:
                cur.execute(f'CREATE DATABASE "{name}" OWNER "{parts.username}"')
            except psycopg2.errors.InsufficientPrivilege:
                pytest.skip(f"cannot create a database on {parts.hostname}:{parts.port} (needs CREATEDB or "
                            "the cluster of .ci/services.d/postgres.sh)")
    yield [base.rsplit("/", 1)[0] + "/" + name for name in names]
    with admin.cursor() as cur:
        for name in names:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(scope="module")
def cluster(databases, tmp_path_factory):
    """``mlflow server`` on PostgreSQL + a Ray head and a second Ray node, each with its own teacher cache."""
    root = tmp_path_factory.mktemp("cluster")
    ray_tmp = tempfile.mkdtemp(prefix="kdray", dir="/tmp")  # short: Ray's socket paths have a length limit
    procs = []
    # RAY_AUTH_MODE=disabled: a token left in ~/.ray by another local Ray instance must not switch
    # this throwaway cluster to token authentication (its clients would then need the token)
    base_env = {**os.environ, "OMP_NUM_THREADS": "1", "KDBENCH_HEARTBEAT_SECONDS": "2", "KDBENCH_BASELINE": "never",
                "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    base_env.pop("RAY_ADDRESS", None)
    try:
        port = free_port()
        from kdbench.workflows.tracking import pick_pg_driver

        procs.append(start([BIN / "mlflow", "server", "--backend-store-uri", pick_pg_driver(databases[0]),
                            "--artifacts-destination",
                            root / "artifacts", "--host", "127.0.0.1", "--port", port, "--workers", "1"],
                           base_env, root / "mlflow.log"))
        head = free_port()
        procs.append(start([BIN / "ray", "start", "--head", f"--port={head}", "--num-cpus=1",
                            "--include-dashboard=false", f"--temp-dir={ray_tmp}", "--block"],
                           {**base_env, "KDBENCH_CACHE_DIR": str(root / "cache-head")}, root / "head.log"))
        tracking = f"http://127.0.0.1:{port}"
        _wait(lambda: urllib.request.urlopen(tracking + "/health", timeout=2).close() or True, 120, "mlflow server",
              root / "mlflow.log", procs[0])
        _wait(lambda: _nodes(head) >= 1, 60, "the Ray head", root / "head.log", procs[1])
        procs.append(start([BIN / "ray", "start", f"--address=127.0.0.1:{head}", "--num-cpus=1", "--block"],
                           {**base_env, "KDBENCH_CACHE_DIR": str(root / "cache-worker")}, root / "node.log"))
        _wait(lambda: _nodes(head) >= 2, 60, "the second Ray node", root / "node.log", procs[2])
        yield {"tracking": tracking, "ray": f"127.0.0.1:{head}", "optuna": databases[1], "root": root,
               "env": {**base_env, "KDBENCH_CACHE_DIR": str(root / "cache-driver")}}
    finally:
        left = stop(procs)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"processes left running after teardown: {left}"


def _nodes(head: int) -> int:
    out = subprocess.run([str(BIN / "ray"), "status", f"--address=127.0.0.1:{head}"], capture_output=True,
                         text=True, timeout=30, env={**os.environ, "RAY_AUTH_MODE": "disabled"}).stdout
    active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
    return sum(" node_" in line for line in active.splitlines())


def _wait(ready, seconds: float, what: str, log: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(1)
    raise AssertionError(f"{what} did not start in {seconds} s (exit status {proc.poll()}):\n{log.read_text()[-3000:]}")


def kdbench(cluster, *args, cwd) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "kdbench"), *map(str, args)], cwd=cwd, env=cluster["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_suite_survives_a_killed_ray_worker(cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from kdbench.workflows import bench, suites

    # 6 epochs, not 2: a kd cell runs for seconds, so the poll below sees it RUNNING (with 2 epochs
    # all three kd cells could finish between two polls and the test had nothing to kill)
    (tmp_path / "dist.toml").write_text(SUITE.replace("epochs = 2", "epochs = 6"))
    proc = kdbench(cluster, "bench", "dist.toml", "--executor", "ray", "--ray-address", cluster["ray"],
                   "--tracking-uri", cluster["tracking"], cwd=tmp_path)
    client = MlflowClient(cluster["tracking"])
    killed = None
    deadline = time.time() + 240
    while killed is None and proc.poll() is None and time.time() < deadline:
        exp = client.get_experiment_by_name("kdbench/mnist1d")
        running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING' AND tags.method = 'kd' "
                                     "AND tags.role = 'student'") if exp else []
        if running:
            killed = running[0]
            os.kill(int(killed.data.tags["kdbench.pid"]), signal.SIGKILL)  # the Ray worker running the cell
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=max(10, deadline - time.time()))
    assert killed is not None, f"no kd cell was seen running:\n{output}"
    assert proc.returncode == 0, output
    assert "Ray cluster 127.0.0.1:" in output and "2 node(s)" in output and "6 to run" in output, output
    assert "suite: 6 done, 0 running, 0 failed, 0 left" in output, output

    exp = client.get_experiment_by_name("kdbench/mnist1d").experiment_id
    runs = client.search_runs([exp], "tags.leaderboard = 'dist' AND tags.role = 'student'")
    hashes = [cell.config_hash for cell in bench.plan_cells(suites.load_suite(str(tmp_path / "dist.toml")))]
    finished = [r.data.tags["config_hash"] for r in runs if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted(hashes) and len(set(hashes)) == 6  # exactly one FINISHED run per cell
    assert not [r for r in runs if r.info.status == "RUNNING"]
    again = client.get_run(killed.info.run_id)
    assert again.info.status == "KILLED" and "process died" in again.data.tags["failure_reason"]
    assert killed.data.tags["config_hash"] in finished  # ... and the retry finished that cell
    teachers = client.search_runs([exp], "tags.role = 'teacher' AND tags.source = 'trained'")
    assert len(teachers) == 1 and teachers[0].info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(teachers[0].info.run_id, "teacher")] == [
        f"teacher/{teachers[0].data.tags['teacher_key']}.pt"]
    # both nodes ran cells (their pids differ from the killed one and from each other)
    assert len({r.data.tags["kdbench.pid"] for r in runs}) >= 3

    # a rerun is a no-op: the finished cells are untouched
    rerun = kdbench(cluster, "bench", "dist.toml", "--executor", "ray", "--ray-address", cluster["ray"],
                    "--tracking-uri", cluster["tracking"], cwd=tmp_path)
    out, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 0 and "6 already finished, 0 to run" in out, out
    assert len(client.search_runs([exp], "tags.leaderboard = 'dist' AND tags.role = 'student'")) == len(runs)

    # its leaderboard from the tracking server: the curves read over REST, several runs at once,
    # each run's own (as one request per run gives them)
    from kdbench.workflows import leaderboard
    from kdbench.workflows.tracking import Tracker

    ids = [r.info.run_id for r in runs if r.info.status == "FINISHED"]
    curves = leaderboard.histories(Tracker(cluster["tracking"]), ids)
    assert curves == {i: [(m.step, m.value) for m in client.get_metric_history(i, "val_top1")] for i in ids}
    assert all(len(curve) == 6 for curve in curves.values())  # 6 epochs each
    board = kdbench(cluster, "leaderboard", "dist.toml", "--format", "html", "-o", "board.html",
                    "--tracking-uri", cluster["tracking"], cwd=tmp_path)
    out, _ = board.communicate(timeout=120)
    assert board.returncode == 0, out
    assert (tmp_path / "board.html").read_text().count("<img alt=") == 3  # bars, validation curves, Pareto


def test_a_local_store_is_refused_on_two_nodes(cluster, tmp_path):
    (tmp_path / "dist.toml").write_text(SUITE)
    proc = kdbench(cluster, "bench", "dist.toml", "--executor", "ray", "--ray-address", cluster["ray"],
                   "--tracking-uri", f"sqlite:///{tmp_path}/local.db", cwd=tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "a Ray cluster of 2 machines cannot share the local tracking store" in lines[0], out


def test_tune_with_two_ray_workers_on_postgres(cluster, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from kdbench.workflows.tracking import pick_pg_driver

    proc = kdbench(cluster, "tune", "--method", "kd", "--teacher", "cnn1d_2x8", "--student", "cnn1d_2x8",
                   "--epochs", 1, "--trials", 4, "--pruner", "none", "--no-retrain", "--study", "dist-study",
                   "--executor", "ray", "--workers", 2, "--ray-address", cluster["ray"],
                   "--storage", cluster["optuna"], "--tracking-uri", cluster["tracking"], cwd=tmp_path)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "2 Optuna workers on a Ray cluster of 2 node(s)" in out and "4 trials counted" in out, out
    study = optuna.load_study(study_name="dist-study", storage=pick_pg_driver(cluster["optuna"]))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4  # none lost, none double-counted
    assert len({t.user_attrs["kdbench.pid"] for t in complete}) == 2  # both workers ran trials
    client = MlflowClient(cluster["tracking"])
    exp = client.get_experiment_by_name("kdbench/mnist1d").experiment_id
    trial_runs = client.search_runs([exp], "tags.study = 'dist-study' AND tags.role = 'trial'")
    assert sorted(int(r.data.tags["trial"]) for r in trial_runs) == sorted(t.number for t in complete)
    assert all(r.info.status == "FINISHED" for r in trial_runs)


def test_killed_driver_then_rerun_resumes(cluster, tmp_path):
    """kill -9 of `kdbench bench --executor ray` itself mid-suite: the same command again finishes
    the suite; the cells finished before the kill are untouched, none is run twice."""
    from mlflow.tracking import MlflowClient

    # other seeds: a cell's identity is its config hash, which the suite's name is not part of
    (tmp_path / "resume.toml").write_text(SUITE.replace('name = "dist"', 'name = "resume"').replace(
        "seeds = [0, 1, 2]", "seeds = [3, 4, 5]"))
    args = ("bench", "resume.toml", "--executor", "ray", "--ray-address", cluster["ray"],
            "--tracking-uri", cluster["tracking"])
    proc = kdbench(cluster, *args, cwd=tmp_path)
    client = MlflowClient(cluster["tracking"])
    query = "tags.leaderboard = 'resume' AND tags.role = 'student'"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        exp = client.get_experiment_by_name("kdbench/mnist1d")
        if exp and [r for r in client.search_runs([exp.experiment_id], query) if r.info.status == "FINISHED"]:
            break
        time.sleep(0.2)
    exp = client.get_experiment_by_name("kdbench/mnist1d").experiment_id
    proc.kill()  # SIGKILL: no cleanup in the driver
    first, _ = proc.communicate()
    before = {r.info.run_id: r.info.end_time for r in client.search_runs([exp], query)
              if r.info.status == "FINISHED"}
    assert 1 <= len(before) < 6, first

    rerun = kdbench(cluster, *args, cwd=tmp_path)
    out, _ = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, out
    runs = client.search_runs([exp], query)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len({r.data.tags["config_hash"] for r in finished}) == len(finished) == 6, out
    assert {r.info.run_id: r.info.end_time for r in finished if r.info.run_id in before} == before
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_lockstep_group_survives_a_killed_ray_worker(cluster, tmp_path):
    """``bench --executor ray --lockstep``: the Ray worker training a group of 3 cells (kd, at,
    fitnets of one seed, one teacher forward per batch) is killed with SIGKILL; Ray re-runs the
    group, whose claims wait until the dead worker's heartbeat is stale (it looks as if on another
    machine), mark its runs KILLED and train the cells again: at the end every cell has exactly one
    FINISHED run, nothing is RUNNING, a rerun is a no-op."""
    from mlflow.tracking import MlflowClient

    from kdbench.workflows import bench, suites

    # other seeds than the other tests' suites (a cell's identity is its config hash); 6 epochs: a
    # group trains for seconds, so the poll below sees it RUNNING
    (tmp_path / "lock.toml").write_text(
        SUITE.replace('name = "dist"', 'name = "lock"').replace("seeds = [0, 1, 2]", "seeds = [20, 21, 22]")
        .replace('methods = ["vanilla", "kd"]', 'methods = ["vanilla", "kd", "at", "fitnets"]')
        .replace("epochs = 2", "epochs = 6"))
    args = ("bench", "lock.toml", "--lockstep", "--executor", "ray", "--ray-address", cluster["ray"],
            "--tracking-uri", cluster["tracking"])
    proc = kdbench(cluster, *args, cwd=tmp_path)
    client = MlflowClient(cluster["tracking"])
    query = "tags.leaderboard = 'lock' AND tags.role = 'student'"
    group, deadline = [], time.time() + 240
    while not group and proc.poll() is None and time.time() < deadline:
        exp = client.get_experiment_by_name("kdbench/mnist1d")
        running = client.search_runs([exp.experiment_id], f"{query} AND attributes.status = 'RUNNING' AND "
                                     "tags.lockstep = '3'") if exp else []
        pids = [r.data.tags["kdbench.pid"] for r in running]
        pid = next((pid for pid in pids if pids.count(pid) == 3), None)  # a whole group set up in one worker
        if pid is not None:
            group = [r for r in running if r.data.tags["kdbench.pid"] == pid]
            # as if the worker ran on another machine (its runs name their host once, at the start):
            # the re-run's claims cannot check its pid, only its heartbeat's age tells it is dead
            for run in group:
                client.set_tag(run.info.run_id, "kdbench.host", "another-machine")
            os.kill(int(pid), signal.SIGKILL)  # the Ray worker training the group
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=max(10, deadline - time.time()))
    assert group, f"no lockstep group was seen training:\n{output}"
    assert sorted(r.data.tags["method"] for r in group) == ["at", "fitnets", "kd"]
    assert proc.returncode == 0, output
    assert "lockstep: 9 cells in 3 groups" in output and "12 to run" in output, output
    assert "suite: 12 done, 0 running, 0 failed, 0 left" in output, output

    exp = client.get_experiment_by_name("kdbench/mnist1d").experiment_id
    runs = client.search_runs([exp], query)
    hashes = [cell.config_hash for cell in bench.plan_cells(suites.load_suite(str(tmp_path / "lock.toml")))]
    finished = [r.data.tags["config_hash"] for r in runs if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted(hashes) and len(set(hashes)) == 12  # exactly one FINISHED run per cell
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for run in group:  # the killed worker's runs: KILLED (by the re-run's claims), their cells finished again
        again = client.get_run(run.info.run_id)
        assert again.info.status == "KILLED", again
        assert again.data.tags["failure_reason"] == f"process died (no heartbeat): pid {pid} on another-machine"
        assert run.data.tags["config_hash"] in finished
    retried = [r for r in runs if r.info.status == "FINISHED" and r.data.tags["config_hash"] in
               {g.data.tags["config_hash"] for g in group}]
    assert {r.data.tags["lockstep"] for r in retried} == {"3"}  # ... trained as a group again
    assert not {r.data.tags["kdbench.pid"] for r in retried} & {g.data.tags["kdbench.pid"] for g in group}

    rerun = kdbench(cluster, *args, cwd=tmp_path)
    out, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 0 and "12 already finished, 0 to run" in out, out
    assert len(client.search_runs([exp], query)) == len(runs)


def test_a_store_one_node_cannot_reach_is_refused_before_any_run(cluster, tmp_path):
    """A third node whose HTTP traffic goes through a proxy that does not exist cannot reach the
    tracking server the driver reaches: one line naming that node, exit 2, no run recorded. (Last
    in this module: the node is stopped at the end, and Ray takes a while to mark it dead.)"""
    from mlflow.tracking import MlflowClient

    dead = free_port()
    env = {key: value for key, value in cluster["env"].items() if key.lower() != "no_proxy"}
    env.update({"HTTP_PROXY": f"http://127.0.0.1:{dead}", "http_proxy": f"http://127.0.0.1:{dead}",
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    head = int(cluster["ray"].rsplit(":", 1)[1])
    node = start([BIN / "ray", "start", f"--address={cluster['ray']}", "--num-cpus=1", "--block"], env,
                 tmp_path / "node3.log")
    try:
        _wait(lambda: _nodes(head) >= 3, 60, "the third Ray node", tmp_path / "node3.log", node)
        (tmp_path / "unreachable.toml").write_text(SUITE.replace('name = "dist"', 'name = "unreachable"')
                                                   .replace("seeds = [0, 1, 2]", "seeds = [7, 8, 9]"))
        proc = kdbench(cluster, "bench", "unreachable.toml", "--executor", "ray", "--ray-address", cluster["ray"],
                       "--tracking-uri", cluster["tracking"], cwd=tmp_path)
        out, _ = proc.communicate(timeout=180)
    finally:
        assert not stop([node]), "the third node left processes behind"
    assert proc.returncode == 2, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cannot use the tracking store" in lines[0], out
    client = MlflowClient(cluster["tracking"])
    exp = client.get_experiment_by_name("kdbench/mnist1d")
    assert exp is None or not client.search_runs([exp.experiment_id], "tags.leaderboard = 'unreachable'")
