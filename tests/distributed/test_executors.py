"""The executors without a cluster: GPU slots of local workers, job levels, the CLI's usage errors
(one line, exit 2, nothing recorded), the CLI's spelled-out constants."""
import sys

from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from kdbench.cli import main, options
from kdbench.workflows import executors


def test_gpu_slots_round_robin_with_k_per_gpu():
    assert executors.gpu_slots(["0", "1"], 8, 4) == ["0", "1"] * 4
    assert executors.gpu_slots(["0", "1"], 3, 4) == ["0", "1", "0"]
    assert executors.gpu_slots(["0", "1"], 9, 2) == ["0", "1", "0", "1"]  # at most K per GPU: 4 workers
    assert executors.gpu_slots(["3"], 2, 1) == ["3"]
    assert executors.gpu_slots([], 3, 4) == [None, None, None]  # CPU only: --runs-per-gpu does nothing


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert executors.visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert executors.visible_gpus() == []


def test_levels_put_needs_first_and_keep_order():
    job = lambda key, *needs: executors.Job(key=key, fn=print, needs=needs)  # noqa: E731
    jobs = [job("c1", "t", "v"), job("v"), job("t"), job("c2", "t"), job("d", "c1")]
    assert [[j.key for j in level] for level in executors.levels(jobs)] == [["v", "t"], ["c1", "c2"], ["d"]]


def test_cli_constants_match_the_workflow():
    assert options.EXECUTORS == executors.EXECUTORS
    assert options.DEFAULT_RUNS_PER_GPU == executors.DEFAULT_RUNS_PER_GPU


def _bench(env, *args):
    (env / "s.toml").write_text('name = "s"\ndataset = "mnist1d"\nseeds = [0, 1, 2]\nmethods = ["vanilla"]\n'
                                '[recipe]\nepochs = 1\n[[pairs]]\nteacher = "cnn1d_2x8"\nstudent = "cnn1d_2x8"\n')
    return CliRunner().invoke(main, ["bench", str(env / "s.toml"), *args])


def _no_runs(env) -> bool:
    client = MlflowClient(f"sqlite:///{env}/mlflow.db")
    exp = client.get_experiment_by_name("kdbench/mnist1d")
    return exp is None or not client.search_runs([exp.experiment_id])


def test_bad_executor_options_are_one_line_exit_2(env, monkeypatch):
    result = _bench(env, "--runs-per-gpu", "0")
    assert result.exit_code == 2 and result.output.strip() == "error: --runs-per-gpu must be at least 1, got 0"
    result = _bench(env, "--executor", "dask")
    assert result.exit_code == 2 and "choose one of: local, ray" in result.output
    result = _bench(env, "--executor", "ray", "--ray-address", "127.0.0.1:9")  # nothing listens on port 9
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: the Ray cluster at 127.0.0.1:9 does not answer")
    assert len(result.output.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "ray", None)  # as without the extra: `import ray` fails
    result = _bench(env, "--executor", "ray")
    assert result.exit_code == 2 and "pip install 'kdbench[ray]'" in result.output
    assert _no_runs(env)
    result = CliRunner().invoke(main, ["tune", "--workers", "2", "--trials", "1"])
    assert result.exit_code == 2 and "--workers needs --executor ray" in result.output
    assert _no_runs(env)


def test_a_retried_cell_waits_for_a_remote_holder_to_go_stale(env, monkeypatch):
    """A Ray re-run of a cell whose worker died on another machine finds that worker's RUNNING run
    with a fresh heartbeat (no pid to check there): it waits until the heartbeat is stale, the lost
    run ends KILLED and the cell runs; without waiting it is skipped as held by a live process."""
    import time

    from kdbench.workflows import bench, claims, suites
    from kdbench.workflows.tracking import Tracker

    _bench(env, "--dry-run")
    cell = bench.plan_cells(suites.load_suite(str(env / "s.toml")))[0]
    tracker = Tracker(f"sqlite:///{env}/mlflow.db")
    lost = tracker.client.create_run(tracker.experiment_id("mnist1d")).info.run_id
    tracker.fill(lost, {**bench._claim_tags(cell), "config_hash": cell.config_hash, claims.HOST_TAG: "other-machine",
                        claims.PID_TAG: "1", claims.HEARTBEAT_TAG: f"{time.time():.3f}"}, {})
    monkeypatch.setattr(claims, "STALE", 2.0)
    monkeypatch.setattr(claims, "INTERVAL", 0.5)
    skipped = bench.run_cell(cell, tracker.uri, threads=1, wait=False)
    assert skipped.skipped and "other-machine" in skipped.reason
    started = time.time()
    result = bench.run_cell(cell, tracker.uri, threads=1, wait=True)
    assert result.ok and not result.skipped and result.run_id != lost
    assert time.time() - started >= 1.0  # it waited for the heartbeat to go stale
    assert tracker.client.get_run(lost).info.status == "KILLED"
    assert tracker.client.get_run(result.run_id).info.status == "FINISHED"
