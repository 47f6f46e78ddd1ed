"""The Ray executor on a Ray instance it starts itself (no --ray-address):

* lockstep composes with it: a group is one Ray task, and its cells end with the metrics the same
  cells have when each runs alone in a local process (CPU, float32: bitwise);
* a cell that fails deterministically is recorded FAILED once, with its reason, not retried as a
  lost worker would be, and the suite's other cells finish."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="needs Ray: pip install 'kdbench[ray]'")

BIN = Path(sys.executable).parent
SUITE = """
name = "lockray"
dataset = "mnist1d"
seeds = [0, 1, 2]
methods = ["vanilla", "kd", "at", "fitnets"]
[recipe]
epochs = 1
[[pairs]]
teacher = "cnn1d_2x8"
student = "cnn1d_2x8"
"""


def bench(tmp_path, store: str, *args, suite: str = "lockray.toml", status: int = 0, pythonpath: str = "") -> str:
    env = {**os.environ, "PYTHONPATH": pythonpath, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/{store}.db", "OMP_NUM_THREADS": "1",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "KDBENCH_BASELINE": "never"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([str(BIN / "kdbench"), "bench", suite, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == status, proc.stdout + proc.stderr
    return proc.stdout


def finished(tmp_path, store: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/{store}.db")
    exp = client.get_experiment_by_name("kdbench/mnist1d").experiment_id
    runs = client.search_runs([exp], "tags.leaderboard = 'lockray' AND tags.role = 'student'")
    assert all(r.info.status == "FINISHED" for r in runs)
    return {r.data.tags["config_hash"]: (r.data.tags.get("lockstep"),
                                         {k: v for k, v in r.data.metrics.items() if "top" in k or "loss" in k})
            for r in runs}


def test_lockstep_groups_run_as_ray_tasks_with_the_separate_runs_numbers(env, tmp_path):
    (tmp_path / "lockray.toml").write_text(SUITE)
    out = bench(tmp_path, "ray", "--executor", "ray", "--lockstep")
    assert "lockstep: 9 cells in 3 groups" in out, out
    bench(tmp_path, "alone", "--jobs", "1")
    grouped, alone = finished(tmp_path, "ray"), finished(tmp_path, "alone")
    assert set(grouped) == set(alone) and len(grouped) == 12  # same config hashes: the same cells
    assert sorted(tag for tag, _ in grouped.values() if tag) == ["3"] * 9  # kd, at, fitnets × 3 seeds
    for config_hash, (_, metrics) in grouped.items():
        assert metrics == alone[config_hash][1], config_hash


BOOM = """
from kdbench import hookimpl
from kdbench.contracts import Method

def loss(step):
    raise RuntimeError("boom: this method always fails")

@hookimpl
def register_methods(register):
    register(Method(name="kdtest_boom", loss=loss, description="fails at its first step"))
"""


def test_a_deterministic_failure_is_recorded_once_and_the_suite_goes_on(env, tmp_path):
    from mlflow.tracking import MlflowClient

    from helpers import make_dist

    site = make_dist(tmp_path / "site", "kdbench-boom", "1.0", {"boom": "kdtest_boom"}, {"kdtest_boom": BOOM})
    (tmp_path / "boom.toml").write_text(SUITE.replace('name = "lockray"', 'name = "boom"').replace(
        'methods = ["vanilla", "kd", "at", "fitnets"]', 'methods = ["kd", "kdtest_boom"]'))
    out = bench(tmp_path, "boom", "--executor", "ray", suite="boom.toml", status=1, pythonpath=str(site))
    assert "3 finished, 3 failed" in out, out
    client = MlflowClient(f"sqlite:///{tmp_path}/boom.db")
    exp = client.get_experiment_by_name("kdbench/mnist1d").experiment_id
    runs = client.search_runs([exp], "tags.leaderboard = 'boom' AND tags.role = 'student'")
    boom = [r for r in runs if r.data.tags["method"] == "kdtest_boom"]
    assert len(boom) == 3 and len({r.data.tags["config_hash"] for r in boom}) == 3  # one run per cell: no retry
    assert all(r.info.status == "FAILED" and "boom: this method always fails" in r.data.tags["failure_reason"]
               for r in boom)
    assert sorted(r.info.status for r in runs if r.data.tags["method"] == "kd") == ["FINISHED"] * 3
