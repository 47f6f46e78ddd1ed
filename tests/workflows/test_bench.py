"""Leaderboard suites: planning (cells, hashes), running with --jobs, resume after a kill,
failures recorded and listed. The teacher is a checkpoint (an untrained net, fixture ``suite``),
so nothing trains a teacher here; students train for 1 epoch."""
import hashlib

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from kdbench.cli import main
from kdbench.core import engine, plugins
from kdbench.core.plan import make_plan
from kdbench.errors import KdbenchError
from kdbench.workflows import bench
from kdbench.workflows.suites import load_suite


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def student_runs(env, **tags):
    client = MlflowClient(f"sqlite:///{env}/mlflow.db")
    exp = client.get_experiment_by_name("kdbench/mnist1d")
    filt = " AND ".join([f"tags.{k} = '{v}'" for k, v in {"role": "student", **tags}.items()])
    return client.search_runs([exp.experiment_id], filt) if exp else []


def test_plan_cells_and_hashes(suite, env):
    cells = bench.plan_cells(load_suite(str(suite)))
    assert len(cells) == 6 and [c.method.name for c in cells[:3]] == ["vanilla"] * 3
    assert len({c.config_hash for c in cells}) == 6
    kd0 = next(c for c in cells if c.key.endswith("kd/s0"))
    sha = hashlib.sha256((env / "t.pt").read_bytes()).hexdigest()
    assert kd0.teacher_id == "ckpt:" + sha[:16]
    plan = make_plan(kd0.config, plugins.registry())
    assert kd0.config_hash == plan.config_hash("ckpt:" + sha[:16]) and plan.hp["T"] == 2.0
    assert plan.recipe.epochs == 1 and kd0.config.tags["leaderboard"] == "tiny"
    assert next(c for c in cells if c.method.name == "vanilla").teacher_id is None
    # a wrong checksum: the suite is refused as a whole when loaded, naming the key
    suite.write_text(suite.read_text().replace(sha, "0" * 64))
    with pytest.raises(KdbenchError, match="tiny.toml: pairs entry cnn1d_4x32->cnn1d_2x16: teacher_sha256"):
        load_suite(str(suite))


def test_bench_runs_resumes_after_a_kill_and_records_failures(suite, env, monkeypatch):
    suite.write_text(suite.read_text().replace(", tune_trials = 7", ""))  # tuning: its own test
    # first attempt: the 4th cell is interrupted mid-training (Ctrl-C): the run is KILLED
    real, calls = engine.run_student, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "run_student", flaky)
    result = invoke("bench", str(suite))
    assert result.exit_code == 130, result.output
    assert len(student_runs(env, leaderboard="tiny")) == 4
    assert len([r for r in student_runs(env) if r.info.status == "FINISHED"]) == 3
    assert [r.info.status for r in student_runs(env) if r.info.status != "FINISHED"] == ["KILLED"]
    # a cell whose process was SIGKILLed leaves a RUNNING run behind: it is not counted as done
    cells = bench.plan_cells(load_suite(str(suite)))
    client = MlflowClient(f"sqlite:///{env}/mlflow.db")
    stale = client.create_run(client.get_experiment_by_name("kdbench/mnist1d").experiment_id)
    client.set_tag(stale.info.run_id, "role", "student")
    client.set_tag(stale.info.run_id, "config_hash", cells[-1].config_hash)
    monkeypatch.setattr(engine, "run_student", real)

    dry = invoke("bench", str(suite), "--dry-run")
    assert dry.exit_code == 0 and "3 finished, 3 would run" in dry.output
    result = invoke("bench", str(suite), "--jobs", "2")
    assert result.exit_code == 0, result.output
    assert "ran 3 cells" in result.output and "3 finished, 0 failed" in result.output
    finished = [r for r in student_runs(env) if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["config_hash"] for r in finished) == sorted(c.config_hash for c in cells)
    assert all(r.data.tags["leaderboard"] == "tiny" for r in finished)
    # a finished suite is a no-op
    again = invoke("bench", str(suite))
    assert again.exit_code == 0 and "6 already finished, 0 to run" in again.output
    assert len([r for r in student_runs(env) if r.info.status == "FINISHED"]) == 6

    # rendering the suite: its runs only, markdown with the tuning note; a summary run with plots
    board = invoke("leaderboard", str(suite), "--format", "markdown")
    assert board.exit_code == 0, board.output
    assert "# Leaderboard: tiny" in board.output and "| kd" in board.output
    (summary,) = client.search_runs([client.get_experiment_by_name("kdbench/mnist1d").experiment_id],
                                    "tags.role = 'summary' AND tags.leaderboard = 'tiny'")
    names = {a.path for a in client.list_artifacts(summary.info.run_id, "leaderboard")}
    assert {"leaderboard/pareto.png", "leaderboard/leaderboard.html", "leaderboard/leaderboard.md"} <= names

    # bad params are refused before anything runs: one line, no junk FAILED runs
    suite.write_text(suite.read_text().replace("T = 2.0", "alpha = 1.5"))
    before = len(student_runs(env))
    result = invoke("bench", str(suite))
    assert result.exit_code == 1
    assert result.output.strip() == ("error: leaderboard tiny.toml: methods entry 'kd', params {'alpha': 1.5}: "
                                     "hyperparameter alpha=1.5 must be <= 1.0; fix its params table")
    assert len(student_runs(env)) == before

    # a cell failing at run time is recorded FAILED with its reason; the suite goes on and lists it
    suite.write_text(suite.read_text().replace("alpha = 1.5", "T = 3.0"))

    def broken(*a, **k):
        raise RuntimeError("plugin bug")

    monkeypatch.setattr(engine, "run_student", broken)
    result = invoke("bench", str(suite))
    assert result.exit_code == 1
    assert "ran 3 cells" in result.output and "0 finished, 3 failed" in result.output
    assert "FAILED cnn1d_4x32->cnn1d_2x16/kd/s0: RuntimeError: plugin bug" in result.output
    failed = [r for r in student_runs(env, leaderboard="tiny") if r.info.status == "FAILED"]
    assert len(failed) == 3 and all("plugin bug" in r.data.tags["failure_reason"] for r in failed)


def test_methods_to_tune_are_tuned_on_validation_before_their_cells(suite, env):
    suite.write_text(suite.read_text().replace("tune_trials = 7", "tune_trials = 2"))
    dry = invoke("bench", str(suite), "--dry-run")
    assert "(to be tuned first: 2 trials)" in dry.output
    result = invoke("bench", str(suite))
    assert result.exit_code == 0, result.output
    assert "tuning kd for cnn1d_4x32->cnn1d_2x16: 2 trials on validation" in result.output
    from kdbench.workflows.studies import best_params

    best = best_params("tiny-cnn1d_4x32->cnn1d_2x16-kd", None, f"sqlite:///{env}/mlflow.db")
    kd_runs = student_runs(env, method="kd", leaderboard="tiny")
    assert len(kd_runs) == 3
    for r in kd_runs:
        assert r.data.tags["tuned"] == "true" and r.data.tags["study"] == "tiny-cnn1d_4x32->cnn1d_2x16-kd"
        assert float(r.data.params["hp.alpha"]) == pytest.approx(best["hparams"]["alpha"])
        assert r.data.params["hp.T"] == "2.0"  # the suite's fixed params stay on top
    again = invoke("bench", str(suite), "--dry-run")
    assert "6 finished, 0 would run" in again.output and "(tuned by study tiny-" in again.output
