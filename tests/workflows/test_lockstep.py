"""Lockstep runs of a suite (issue 17 item 3): a group's cells are recorded in MLflow exactly as
their separate runs are (params, tags, metrics), and ``kdbench bench --lockstep`` groups, says
who runs alone and why, and runs the suite."""
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from kdbench.cli import main
from kdbench.workflows import bench, lockstep
from kdbench.workflows.suites import load_suite

#: what differs between two runs of one cell by nature: when and where they ran, how long
TIMING = {"train_seconds", "throughput", "peak_mem_mb", "epoch_seconds"}


def _runs(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kdbench/mnist1d")
    runs = client.search_runs([exp.experiment_id], "tags.role = 'student'")
    return {r.data.tags["config_hash"]: r for r in runs}


def _comparable_tags(tags):
    """Tags less the run's own: MLflow's, its heartbeat, its teacher's run (each store has its own)."""
    return {k: v for k, v in tags.items() if not k.startswith("mlflow.")
            and k not in ("lockstep", "kdbench.heartbeat", "teacher_run_id")}


def _comparable_metrics(metrics):
    return {k: v for k, v in metrics.items()
            if k.split("/")[-1] not in TIMING and not k.startswith("seconds_to")}


def test_a_group_records_each_cell_as_its_separate_run_would(suite, env):
    suite.write_text(suite.read_text().replace(
        'methods = ["vanilla", {name = "kd", params = {T = 2.0}, tune_trials = 7}]',
        'methods = ["kd", "fitnets", "vid", "at"]'))
    cells = [c for c in bench.plan_cells(load_suite(str(suite))) if c.seed == 0]
    grouping = lockstep.plan_groups(cells)
    assert [len(g) for g in grouping.groups] == [4] and not grouping.alone
    alone_uri, group_uri = f"sqlite:///{env}/alone.db", f"sqlite:///{env}/group.db"
    for cell in cells:
        assert bench.run_cell(cell, alone_uri).ok
    results = lockstep.run_group(cells, group_uri)
    assert [r.cell_key for r in results] == [c.key for c in cells] and all(r.ok for r in results)
    alone, together = _runs(alone_uri), _runs(group_uri)
    assert set(alone) == set(together) == {c.config_hash for c in cells}
    for config_hash, run in together.items():
        other = alone[config_hash]
        assert run.info.status == other.info.status == "FINISHED"
        assert run.data.params == other.data.params
        assert _comparable_tags(run.data.tags) == _comparable_tags(other.data.tags)
        assert run.data.tags["lockstep"] == "4" and "lockstep" not in other.data.tags
        assert _comparable_metrics(run.data.metrics) == _comparable_metrics(other.data.metrics), run.data.tags["method"]
        client = MlflowClient(group_uri)
        assert [m.value for m in client.get_metric_history(run.info.run_id, "val_top1")] == \
            [m.value for m in MlflowClient(alone_uri).get_metric_history(other.info.run_id, "val_top1")]
    # a second run of the group is a no-op: every cell is finished
    again = lockstep.run_group(cells, group_uri)
    assert all(r.skipped for r in again)


def test_bench_lockstep_groups_says_who_runs_alone_and_records_every_cell(suite, env):
    runner = CliRunner()
    # nothing to group: one line, and the suite runs normally
    out = runner.invoke(main, ["bench", str(suite), "--dry-run", "--lockstep"])
    assert out.exit_code == 0, out.output
    assert "lockstep: nothing to group; every cell runs alone" in out.output
    assert "alone cnn1d_4x32->cnn1d_2x16/vanilla/s0: its method trains without a teacher" in out.output
    assert "alone cnn1d_4x32->cnn1d_2x16/kd/s0: no other method of its pair, recipe and seed" in out.output
    suite.write_text(suite.read_text().replace(
        'methods = ["vanilla", {name = "kd", params = {T = 2.0}, tune_trials = 7}]',
        'methods = ["vanilla", "kd", "at", "dml"]'))
    out = runner.invoke(main, ["bench", str(suite), "--dry-run", "--lockstep"])
    assert out.exit_code == 0, out.output
    assert "lockstep: 6 cells in 3 groups, 6 cells alone" in out.output
    assert "group cnn1d_4x32->cnn1d_2x16/s1: at, kd" in out.output
    assert "dml/s2: its method trains peer networks" in out.output
    out = runner.invoke(main, ["bench", str(suite), "--lockstep"])
    assert out.exit_code == 0, out.output
    assert "lockstep: 6 cells in 3 groups, one teacher forward per batch each; 6 cells alone" in out.output
    runs = _runs(f"sqlite:///{env}/mlflow.db")
    assert len(runs) == 12 and all(r.info.status == "FINISHED" for r in runs.values())
    grouped = [r for r in runs.values() if r.data.tags.get("lockstep") == "2"]
    assert sorted(r.data.tags["method"] for r in grouped) == ["at"] * 3 + ["kd"] * 3
    # vanilla ran first: the grouped runs have their Δ vs vanilla
    assert all("delta_vs_vanilla" in r.data.metrics for r in grouped)
    out = runner.invoke(main, ["bench", str(suite), "--lockstep"])
    assert "0 to run" in out.output


def test_a_group_too_big_for_the_device_is_split_with_one_line(suite, env, monkeypatch):
    import torch

    from kdbench.cli.bench import _event_line
    from kdbench.core import engine, plugins
    from kdbench.core import lockstep as core_lockstep
    from kdbench.core.plan import make_plan

    suite.write_text(suite.read_text().replace(
        'methods = ["vanilla", {name = "kd", params = {T = 2.0}, tune_trials = 7}]', 'methods = ["kd", "at", "sp"]'))
    cells = [c for c in bench.plan_cells(load_suite(str(suite))) if c.seed == 0]
    # kd, at and sp build no modules: each member is one student's worth of memory
    plan = make_plan(cells[0].config, plugins.registry())
    cpu = torch.device("cpu")
    setup = engine.setup_student(plan, engine.build_teacher(plan, cpu).eval(), cpu)
    size = core_lockstep.member_bytes(setup, plan.recipe.batch_size, plan.dataset_obj.input_shape, cpu, "fp32")
    # a device with room for two of the three students (on the CPU nothing is checked: pretend)
    monkeypatch.setattr(core_lockstep, "free_device_bytes", lambda device: int(2.5 * size / lockstep.MEMORY_SHARE))
    events = []
    results = lockstep.run_group(cells, f"sqlite:///{env}/mlflow.db", on_event=events.append)
    assert all(r.ok for r in results)
    assert len(events) == 1 and events[0].chunks == [2, 1]
    line = lockstep.split_line(events[0])
    assert line.startswith("lockstep group cnn1d_4x32->cnn1d_2x16/s0: 3 students need about") and "\n" not in line
    assert line.endswith("split into groups of 2, 1")
    runs = _runs(f"sqlite:///{env}/mlflow.db")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs.values())
    assert _event_line(lockstep.LockstepPlanned(groups=0, grouped=0, alone=6)).startswith(
        "lockstep: nothing to group")
