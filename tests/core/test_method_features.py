"""Engine extensions through the CLI and the runner: peers reported (dml), extra teachers
(multi_teacher), method-supplied training data that never loads the train split (datafree), and
combined methods (at+kd) with namespaced hyperparameters."""
from dataclasses import replace

import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from kdbench.core import engine, plugins
from kdbench.workflows import run as runner
from kdbench.cli import main
from kdbench.core.plan import RunConfig, make_plan
from kdbench.workflows.tracking import Tracker


def _runs(env, method):
    client = MlflowClient(f"sqlite:///{env}/mlflow.db")
    exp = client.get_experiment_by_name("kdbench/mnist1d")
    return client, client.search_runs([exp.experiment_id], f"tags.method = '{method}' AND tags.role = 'student'")


def test_dml_reports_every_peer(env):
    result = CliRunner().invoke(main, ["run", "--method", "dml", "--epochs", "1", "--set", "peers=3"])
    assert result.exit_code == 0, result.output
    assert "peers' test top-1" in result.output
    client, (run,) = _runs(env, "dml")
    m = run.data.metrics
    for i in range(3):
        assert 0.0 <= m[f"peer{i}_test_top1"] <= 1.0 and 0.0 <= m[f"peer{i}_val_top1"] <= 1.0
    assert m["peer0_test_top1"] == m["test_top1"]
    assert len({m["peer0_test_top1"], m["peer1_test_top1"], m["peer2_test_top1"]}) > 1  # distinct networks
    assert m["params_extra"] == 2 * m["params_student"]  # the peers are the method's modules
    assert 1 in {h.step for h in client.get_metric_history(run.info.run_id, "peer1_val_top1")}  # per epoch
    assert run.data.tags["teacher"] == "" and "loss_peers_kl" in m


def test_multi_teacher_with_two_teachers(env):
    args = ["run", "--method", "multi_teacher", "--teacher", "cnn1d_4x32", "--teachers", "cnn1d_4x16", "--epochs", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "cnn1d_4x32+cnn1d_4x16 → cnn1d_2x16" in result.output
    client, (run,) = _runs(env, "multi_teacher")
    tags, m = run.data.tags, run.data.metrics
    assert tags["teachers"] == "cnn1d_4x32,cnn1d_4x16" and tags["teacher"] == "cnn1d_4x32"
    assert len(tags["teacher_keys"].split(",")) == 2
    reg = plugins.registry()
    p = sum(engine.metrics.count_params(reg.model(n).make(10, (1, 40))) for n in ("cnn1d_4x32", "cnn1d_4x16"))
    assert m["params_teacher"] == p and m["num_teachers"] == 2
    # each teacher has its own cached teacher run
    exp = client.get_experiment_by_name("kdbench/mnist1d")
    teachers = client.search_runs([exp.experiment_id], "tags.role = 'teacher'")
    assert {"cnn1d_4x32", "cnn1d_4x16"} <= {r.data.tags["model"] for r in teachers}
    # a method that uses one teacher refuses extra ones
    bad = CliRunner().invoke(main, ["run", "--method", "kd", "--teachers", "cnn1d_4x16", "--epochs", "1"])
    assert bad.exit_code == 1 and "--teachers" in bad.output


def test_gradients_never_reach_extra_teachers(env):
    plan = make_plan(RunConfig(method="multi_teacher", teachers=("cnn1d_2x8",), recipe={"epochs": 1}), plugins.registry())
    reg = plugins.registry()
    dev = torch.device("cpu")
    t1, t2 = reg.model("cnn1d_4x32").make(10, (1, 40)), reg.model("cnn1d_2x8").make(10, (1, 40))
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in (t1, t2)]
    setup = engine.setup_student(plan, t1, dev, [t2])
    assert len(setup.trainee.teachers) == 1
    engine.run_student(plan, setup, dev, lambda e: None, with_test=False)
    for t, b in zip((t1, t2), before):
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())
        assert all(torch.equal(b[k], v) for k, v in t.state_dict().items())


def test_datafree_never_loads_the_train_split_for_the_student(env, tmp_path):
    tracker = Tracker(f"sqlite:///{env}/mlflow.db")
    plan = make_plan(RunConfig(method="kd"), plugins.registry())
    teacher = runner.obtain_teacher(plan, torch.device("cpu"), tracker, lambda e: None)  # cached or trained (reads train)
    ckpt = tmp_path / "teacher.pt"
    torch.save({"model": teacher.net.state_dict()}, ckpt)

    reg = plugins.registry()
    entry = reg.datasets["mnist1d"]
    calls = []

    def spy(split, **options):
        calls.append(split)
        return entry.obj.load(split, **options)

    reg.datasets["mnist1d"] = replace(entry, obj=replace(entry.obj, load=spy))
    config = RunConfig(method="datafree", teacher_checkpoint=str(ckpt), recipe={"epochs": 1})
    outcome = runner.run(config, tracker)
    assert "train" not in calls and {"val", "test"} <= set(calls)
    assert outcome.metrics["train_split_loaded"] == 0
    client, (run,) = _runs(env, "datafree")
    assert run.data.tags["train_split_loaded"] == "0" and run.data.metrics["train_split_loaded"] == 0
    assert 0.0 <= run.data.metrics["test_top1"] <= 1.0
    calls.clear()
    runner.run(RunConfig(method="kd", teacher_checkpoint=str(ckpt), recipe={"epochs": 1}), tracker)
    assert "train" in calls  # the spy does see an ordinary student's training split


def test_at_plus_kd_through_the_cli(env):
    args = ["run", "--method", "at+kd", "--set", "kd.alpha=0.5", "--set", "at.beta=100", "--epochs", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    client, (run,) = _runs(env, "at+kd")
    params, m = run.data.params, run.data.metrics
    assert params["hp.kd.alpha"] == "0.5" and params["hp.at.beta"] == "100.0" and params["hp.kd.T"] == "4.0"
    assert {"loss_ce", "loss_at", "loss_kd"} <= set(m)
    bad = CliRunner().invoke(main, ["run", "--method", "at+kd", "--set", "alpha=0.5", "--epochs", "1"])
    assert bad.exit_code == 1 and "kd.alpha" in bad.output
