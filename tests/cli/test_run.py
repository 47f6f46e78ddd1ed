"""`kdbench run` end to end, checked against what MLflow recorded; bad input is one line."""

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from kdbench.cli import main
from kdbench.data import cache_dir

FAILING = """
from kdbench import hookimpl
from kdbench.contracts import Method
import torch.nn.functional as F

def nan_loss(step):
    return {"ce": F.cross_entropy(step.student.logits, step.y) * float("nan")}

def raising_loss(step):
    raise ValueError("plugin bug")

@hookimpl
def register_methods(register):
    register(Method(name="kdtest_nan", loss=nan_loss, description="always NaN"))
    register(Method(name="kdtest_raise", loss=raising_loss, description="always raises"))
"""


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def runs(env, **tags):
    client = MlflowClient(f"sqlite:///{env}/mlflow.db")
    exp = client.get_experiment_by_name("kdbench/mnist1d")
    found = client.search_runs([exp.experiment_id], max_results=100)
    return [r for r in found if all(r.data.tags.get(k) == v for k, v in tags.items())]


def test_run_records_everything_in_mlflow(env):
    result = invoke("run", "--method", "kd", "--epochs", "2", "--seed", "1", "--set", "T=3")
    assert result.exit_code == 0, result.output
    (student,) = runs(env, role="student")
    (teacher,) = runs(env, role="teacher")
    tags, params, m = student.data.tags, student.data.params, student.data.metrics
    assert student.info.status == "FINISHED"
    assert (tags["method"], tags["teacher"], tags["student"], tags["dataset"], tags["seed"]) == (
        "kd", "cnn1d_4x32", "cnn1d_2x16", "mnist1d", "1")
    assert tags["teacher_run_id"] == teacher.info.run_id
    assert tags["plugin.method"].startswith("kdbench ") and tags["torch_version"] == torch.__version__
    assert len(tags["config_hash"]) == 16 and tags["device"].startswith("cpu")
    assert params["hp.T"] == "3.0" and params["hp.alpha"] == "0.9" and params["recipe.epochs"] == "2"
    history = MlflowClient(f"sqlite:///{env}/mlflow.db").get_metric_history(student.info.run_id, "val_top1")
    assert [h.step for h in history] == [1, 2]
    assert m["best_val_top1"] == max(h.value for h in history)
    assert m["params_student"] == 3034 and m["flops_student"] == 32000  # 2·(1600 + 12800 + 1600) MACs
    assert m["teacher_test_top1"] == teacher.data.metrics["test_top1"] > 0.9
    assert f"{100 * m['test_top1']:.2f} %" in result.output and student.info.run_id in result.output
    # the cached teacher is reused: a second run trains no new teacher
    assert invoke("run", "--method", "vanilla", "--epochs", "2").exit_code == 0
    assert len(runs(env, role="teacher")) == 1
    assert (cache_dir() / "teachers" / f"{tags['teacher_key']}.pt").is_file()
    # now a vanilla run exists: Δ and gap closed are recorded
    result = invoke("run", "--method", "at", "--epochs", "2")
    (at,) = runs(env, method="at")
    (van,) = runs(env, method="vanilla")
    delta = at.data.metrics["test_top1"] - van.data.metrics["test_top1"]
    assert at.data.metrics["delta_vs_vanilla"] == pytest.approx(delta)
    t = teacher.data.metrics["test_top1"]
    assert at.data.metrics["gap_closed"] == pytest.approx(delta / (t - van.data.metrics["test_top1"]))
    board = invoke("leaderboard")
    assert board.exit_code == 0 and "cnn1d_4x32 → cnn1d_2x16" in board.output
    assert f"{100 * van.data.metrics['test_top1']:.2f}" in board.output


def test_teacher_checkpoint_is_loaded_and_linked(env):
    torch.manual_seed(0)
    from kdbench.core import engine, plugins
    from kdbench.core.plan import RunConfig, make_plan

    net = engine.build_teacher(make_plan(RunConfig(), plugins.registry()), torch.device("cpu"))
    torch.save({"model": net.state_dict()}, env / "t.pt")
    result = invoke("run", "--method", "kd", "--epochs", "1", "--teacher-checkpoint", str(env / "t.pt"))
    assert result.exit_code == 0, result.output
    (teacher,) = runs(env, role="teacher")
    assert teacher.data.tags["source"] == "checkpoint" and teacher.data.tags["teacher_key"].startswith("ckpt:")
    assert teacher.data.metrics["test_top1"] < 0.3  # an untrained teacher, evaluated for real


@pytest.mark.parametrize("args, message", [
    (["run", "--method", "kdd"], "error: unknown method 'kdd'; did you mean kd"),
    (["run", "--student", "cnn1d_2x17"], "error: unknown model 'cnn1d_2x17'; did you mean cnn1d_2x16"),
    (["run", "--set", "tau=2"], "error: method 'kd' has no hyperparameter 'tau' (it has: T, alpha)"),
    (["run", "--set", "alpha=1.5"], "error: hyperparameter alpha=1.5 must be <= 1.0"),
    (["run", "--set", "T"], "error: --set expects key=value, got 'T'"),
    (["run", "--dataset", "mnist2d"], "error: unknown dataset 'mnist2d'"),
    (["run", "--teacher-checkpoint", "/nonexistent.pt"], "error: teacher checkpoint '/nonexistent.pt' does not exist"),
    (["run", "--device", "cuda"] if not torch.cuda.is_available() else ["run", "--device", "tpu"], "error: "),
])
def test_bad_input_is_one_line(env, args, message):
    result = invoke(*args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output
    assert "Traceback" not in result.output


def test_checkpoint_of_another_model_names_the_key(env):
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, env / "wrong.pt")
    result = invoke("run", "--teacher-checkpoint", str(env / "wrong.pt"))
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"error: teacher checkpoint '{env / 'wrong.pt'}' does not fit teacher 'cnn1d_4x32': missing key 'stage1.0.weight'")


def test_a_checkpoint_with_nan_weights_is_refused_as_the_teacher_it_is(env):
    """Its NaNs made every loss non-finite, and the message then advised a lower lr for the student."""
    from kdbench.core import plugins

    reg = plugins.registry()
    ds = reg.dataset("mnist1d")
    state = reg.model(ds.default_teacher).make(ds.num_classes, ds.input_shape).state_dict()
    state["stage1.0.weight"] = torch.full_like(state["stage1.0.weight"], float("nan"))
    torch.save({"model": state}, env / "nan.pt")
    result = invoke("run", "--teacher-checkpoint", str(env / "nan.pt"), "--epochs", "1")
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"error: teacher checkpoint '{env / 'nan.pt'}' has non-finite values (NaN or inf) in 1 tensor(s), "
        "first 'stage1.0.weight': it cannot teach; pass a trained checkpoint"]
    import mlflow

    recorded = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert not [r for r in recorded if r.data.tags.get("role") == "teacher" and r.info.status == "FINISHED"]


def test_nan_and_raising_plugins_fail_cleanly_and_are_recorded(env, add_dist):
    add_dist("kdbench-failing", "0.3", {"failing": "kdtest_failing"}, {"kdtest_failing": FAILING})
    result = invoke("run", "--method", "kdtest_nan", "--epochs", "1")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().endswith(
        "error: loss became non-finite in stage 'main' epoch 1 (ce=nan); lower the lr or the method's weights")
    (failed,) = runs(env, method="kdtest_nan")
    assert failed.info.status == "FAILED"
    assert "non-finite" in failed.data.tags["failure_reason"]
    result = invoke("run", "--method", "kdtest_raise", "--epochs", "1")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "error: ValueError: plugin bug (a plugin or kdbench failed; rerun with --debug for the traceback)")
    (raised,) = runs(env, method="kdtest_raise")
    assert raised.info.status == "FAILED" and raised.data.tags["failure_reason"] == "ValueError: plugin bug"
    assert len(runs(env, role="teacher")) == 1  # what was recorded before stays
    debug = invoke("--debug", "run", "--method", "kdtest_raise", "--epochs", "1")
    assert isinstance(debug.exception, ValueError)


def test_ctrl_c_between_creating_a_run_and_filling_it_still_ends_it_killed(env, monkeypatch):
    """The narrowest Ctrl-C window: the run exists but the workflow has not reached the code that
    would end it. The command's top level ends every run this process still owns KILLED."""
    from kdbench.workflows import claims
    from kdbench.workflows.tracking import Tracker

    def interrupted(self, run_id, tags, params):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tracker, "fill", interrupted)
    result = invoke("run", "--method", "vanilla", "--epochs", "1")
    assert result.exit_code == 130, result.output
    (run,) = runs(env)
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == "interrupted (Ctrl-C)"
    assert not claims.HEARTBEAT.owned()
