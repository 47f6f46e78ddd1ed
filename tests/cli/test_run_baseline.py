"""`kdbench run` always shows a baseline and keeps the distilled student: vanilla is trained
alongside when none exists (embedded data), or the summary says how to get it; the student's
weights are an MLflow artifact that loads back into the model and scores what the run recorded."""
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from kdbench.cli import main
from kdbench.core import engine, plugins
from kdbench.core.plan import RunConfig, make_plan
from kdbench.core.splits import load_split


def _runs(env, method):
    client = MlflowClient(f"sqlite:///{env}/mlflow.db")
    (exp,) = [e for e in client.search_experiments() if e.name == "kdbench/mnist1d"]
    return client, client.search_runs([exp.experiment_id], f"tags.role = 'student' AND tags.method = '{method}'")


def test_a_missing_baseline_is_trained_and_compared(env):
    result = CliRunner().invoke(main, ["run", "--method", "kd", "--epochs", "1", "--baseline", "auto"])
    assert result.exit_code == 0, result.output
    client, (kd,) = _runs(env, "kd")
    _, (vanilla,) = _runs(env, "vanilla")
    assert f"(trained now: run {vanilla.info.run_id})" in result.output
    kd = client.get_run(kd.info.run_id)
    expected = kd.data.metrics["test_top1"] - vanilla.data.metrics["test_top1"]
    assert abs(kd.data.metrics["delta_vs_vanilla"] - expected) < 1e-9
    assert f"{100 * expected:+.2f} pts" in result.output
    # the next run of the same student and recipe reuses it: no second vanilla run
    again = CliRunner().invoke(main, ["run", "--method", "kd", "--epochs", "1", "--seed", "1", "--baseline", "auto"])
    assert again.exit_code == 0 and len(_runs(env, "vanilla")[1]) == 1 and "trained now" not in again.output


def test_never_says_how_to_get_the_baseline(env):
    result = CliRunner().invoke(main, ["run", "--method", "kd", "--epochs", "1", "--baseline", "never"])
    assert result.exit_code == 0, result.output
    assert ("- (no vanilla run yet: kdbench run --method vanilla --dataset mnist1d --student cnn1d_2x16 "
            "--seed 0 --epochs 1)") in result.output
    assert _runs(env, "vanilla")[1] == []


def test_the_distilled_student_is_saved_and_scores_what_was_recorded(env, tmp_path):
    out = tmp_path / "student.pt"
    result = CliRunner().invoke(main, ["run", "--method", "kd", "--epochs", "1", "--baseline", "never",
                                       "--save-student", str(out)])
    assert result.exit_code == 0, result.output
    assert f"MLflow artifact student/student.pt, and {out}" in result.output
    client, (run,) = _runs(env, "kd")
    artifact = client.download_artifacts(run.info.run_id, "student/student.pt", str(tmp_path / "dl"))
    for path in (artifact, out):
        blob = torch.load(path, weights_only=True)
        assert blob["model_name"] == "cnn1d_2x16" and blob["method"] == "kd"
        assert blob["config_hash"] == run.data.tags["config_hash"] and blob["best_val_model"] is not None
    plan = make_plan(RunConfig(method="kd"), plugins.registry())
    device = torch.device("cpu")
    net = engine.build_model(plan.student_obj, plan.dataset_obj, device, seed=123)
    net.load_state_dict(blob["model"])
    test = load_split(plan.dataset_obj, "test", device, {})
    accuracy = engine.evaluate(net, test, 500, device)["top1"]
    assert abs(accuracy - run.data.metrics["test_top1"]) < 1e-9
