"""kdbench tune: studies over a method's search space, pruning, bad input, several objectives."""
import dataclasses
import os
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner

from kdbench.cli import main
from kdbench.core import plugins
from kdbench.core.engine import EpochLog
from kdbench.workflows import run as runner, studies, tune
from kdbench.workflows.tracking import Tracker


def cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def teacher_checkpoint(path: Path) -> Path:
    """An (untrained) default teacher as a checkpoint, so the test trains no teacher."""
    reg = plugins.registry()
    ds = reg.dataset("mnist1d")
    net = reg.model(ds.default_teacher).make(ds.num_classes, ds.input_shape)
    torch.save({"model": net.state_dict()}, path)
    return path


def test_study_tunes_on_validation_only_and_records_nested_runs(env, monkeypatch):
    ckpt = teacher_checkpoint(env / "teacher.pt")
    reg = plugins.registry()
    entry = reg.datasets["mnist1d"]
    events = []

    def load(split, **kw):
        events.append(("load", split))
        return entry.obj.load(split, **kw)

    reg.datasets["mnist1d"] = dataclasses.replace(entry, obj=dataclasses.replace(entry.obj, load=load))
    real_run = runner.run

    def run(config, tracker, on_epoch=lambda e: None, with_test=True):
        events.append(("run", with_test))
        return real_run(config, tracker, on_epoch, with_test)

    monkeypatch.setattr(runner, "run", run)

    r = cli("tune", "--method", "kd", "--trials", 3, "--epochs", 1, "--teacher-checkpoint", ckpt,
            "--study", "s1", "--seeds", 1)
    assert r.exit_code == 0, r.output
    assert "retrained best params, test top-1 (seed 0): " in r.output and "±" not in r.output  # one seed: no spread

    first_test_run = events.index(("run", True))
    assert ("load", "test") not in events[:first_test_run]  # tuning never read the test split
    assert ("load", "test") in events[first_test_run:]
    assert [e for e in events if e[0] == "run"] == [("run", False)] * 3 + [("run", True)]

    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{env}/optuna.db")
    assert len(study.trials) == 3
    space = {h.name: h for h in reg.method("kd").search_space()}
    for t in study.trials:
        assert set(t.params) == {"T", "alpha"}
        for k, v in t.params.items():
            lo, hi = space[k].space
            assert lo <= v <= hi

    tracker = Tracker(f"sqlite:///{env}/mlflow.db")
    parents = tracker.search("mnist1d", "tags.role = 'study'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["study"] == "s1"
    assert {k for k in parent.data.tags if k.startswith("best.")} == {"best.T", "best.alpha"}
    children = tracker.search("mnist1d", f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trials = [c for c in children if "trial" in c.data.tags]
    assert len(trials) == 3 and len(children) == 4  # 3 trials + the retrain
    for c in trials:
        state = study.trials[int(c.data.tags["trial"])].state.name
        assert c.data.tags["trial_state"] == state
        assert "val_top1" in c.data.metrics and "test_top1" not in c.data.metrics
        assert c.data.params["hp.T"] == str(study.trials[int(c.data.tags["trial"])].params["T"])
    plots = {a.path for a in tracker.client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots

    r = cli("tune", "--show", "s1")
    assert r.exit_code == 0, r.output
    assert "best trial #" in r.output and "importances:" in r.output and "COMPLETE" in r.output

    # kdbench run --params-from reuses the best params
    r = cli("run", "--method", "kd", "--params-from", "s1", "--epochs", 1, "--teacher-checkpoint", ckpt)
    assert r.exit_code == 0, r.output
    best = studies.pick_best(study)
    runs = tracker.search("mnist1d", "tags.role = 'student' AND attributes.status = 'FINISHED'")
    last = max(runs, key=lambda x: x.info.start_time)
    assert last.data.params["hp.alpha"] == str(best.params["alpha"])


def test_pruning_stops_a_clearly_worse_curve():
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    for _ in range(2):
        trial = study.ask()
        cb = tune.make_epoch_callback(trial)
        for epoch, acc in enumerate([0.8, 0.85, 0.9], 1):
            cb(EpochLog("student", "main", epoch, 3, {"val_top1": acc}))
        study.tell(trial, 0.9)
    trial = study.ask()
    counter = {}
    cb = tune.make_epoch_callback(trial, counter)
    cb(EpochLog("teacher", "main", 1, 3, {"val_top1": 0.01}))  # the teacher's curve is not the trial's
    cb(EpochLog("student", "hint", 1, 3, {"hint/loss": 1.0}))  # nor a pre-stage
    with pytest.raises(tune._Pruned):
        cb(EpochLog("student", "main", 1, 3, {"val_top1": 0.1}))
    assert counter["epochs"] == 1
    # a good curve is not pruned
    trial = study.ask()
    cb = tune.make_epoch_callback(trial)
    cb(EpochLog("student", "main", 1, 3, {"val_top1": 0.95}))


def test_pruned_run_ends_killed_not_failed(env):
    from kdbench.core.plan import RunConfig

    def prune(e):
        if e.role == "student" and e.stage == "main":
            raise tune._Pruned("pruned at epoch 1")

    tracker = Tracker(os.environ["MLFLOW_TRACKING_URI"])
    with pytest.raises(tune._Pruned):
        runner.run(RunConfig(method="vanilla", recipe={"epochs": 2}, tags={"mlflow.parentRunId": "p"}),
                   tracker, on_epoch=prune, with_test=False)
    (run,) = tracker.search("mnist1d", "tags.role = 'student'")
    assert run.info.status == "KILLED"
    assert run.data.tags["trial_state"] == "PRUNED"


def test_bad_input_is_one_line(env, add_dist):
    r = cli("tune", "--trials", 0)
    assert r.exit_code != 0 and r.output.strip() == "error: --trials must be at least 1, got 0"

    r = cli("tune", "--show", "nope")
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1 and "no studies" in r.output
    optuna.create_study(study_name="known", storage=f"sqlite:///{env}/optuna.db")
    r = cli("tune", "--show", "nope")
    assert r.exit_code != 0
    assert r.output.strip() == f"error: unknown study 'nope' in sqlite:///{env}/optuna.db (known studies: known)"
    r = cli("run", "--params-from", "nope")
    assert r.exit_code != 0 and "known studies: known" in r.output

    r = cli("tune", "--storage", "postgresql://kd:s3cret@127.0.0.1:1/db", "--trials", 1, "--method", "vanilla",
            "--tune-recipe")
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1, r.output
    assert "s3cret" not in r.output and "postgresql://kd:***@127.0.0.1:1/db" in r.output

    r = cli("tune", "--objective", "acc,params")
    assert r.exit_code != 0 and "acc,flops" in r.output

    add_dist("kdbench-badspace", "0.1", {"badspace": "kdtest_badspace"}, {"kdtest_badspace": """
        from kdbench import hookimpl
        from kdbench.contracts import HParam, Method
        KDBENCH_API = 1
        @hookimpl
        def register_methods(register):
            register(Method(name="badspace", loss=lambda s: {},
                            hparams=(HParam("w", 1.0, space=(2.0, 1.0)),)))
    """})
    r = cli("tune", "--method", "badspace")
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1
    assert "unknown method 'badspace'" in r.output and "search space (2.0, 1.0) is empty" in r.output


def test_multi_objective_front_and_journal_storage(env):
    """acc,flops over two students: the Pareto front is printed and holds only non-dominated
    trials; the journal file storage (several local processes) holds the study."""
    ckpt = teacher_checkpoint(env / "teacher.pt")
    r = cli("tune", "--method", "kd", "--trials", 4, "--epochs", 1, "--teacher-checkpoint", ckpt,
            "--objective", "acc,flops", "--student", "cnn1d_2x16,cnn1d_2x8", "--no-retrain",
            "--storage", "journal", "--study", "front")
    assert r.exit_code == 0, r.output
    assert "Pareto front (val top-1 ↑, flops ↓):" in r.output
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = [p for p in env.iterdir() if "journal" in p.name]
    assert journal, list(env.iterdir())
    study = optuna.load_study(study_name="front", storage=JournalStorage(JournalFileBackend(str(journal[0]))))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4 and all(len(t.values) == 2 for t in done)
    front = {t.number for t in study.best_trials}
    for t in done:  # a trial is on the front iff no other trial dominates it
        dominated = any(o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values for o in done)
        assert (t.number in front) == (not dominated)


def test_a_combined_method_is_tuned_over_its_parts_namespaced_spaces(env):
    """`tune --method at+kd` as `run --method at+kd` builds it: the study searches at.* and kd.*
    (each part's space); an unregistered part is one line naming it."""
    ckpt = teacher_checkpoint(env / "teacher.pt")
    r = cli("tune", "--method", "at+kd", "--trials", 1, "--epochs", 1, "--teacher-checkpoint", ckpt,
            "--study", "combo", "--no-retrain")
    assert r.exit_code == 0, r.output
    (trial,) = optuna.load_study(study_name="combo", storage=f"sqlite:///{env}/optuna.db").trials
    assert {"at.p", "at.beta", "kd.T", "kd.alpha"} <= set(trial.params) and not any("." not in p for p in trial.params)
    bad = cli("tune", "--method", "at+kdd", "--trials", 1)
    assert bad.exit_code != 0 and bad.output.strip().splitlines() == [
        "error: unknown method 'kdd'; did you mean kd or kdsvd or rkd? (see `kdbench list methods`)"], bad.output


def test_a_refused_tune_leaves_no_study_and_an_empty_one_shows_no_table(env):
    bad = env / "teacher.pt"
    bad.write_text("not a checkpoint")
    r = cli("tune", "--method", "kd", "--trials", 1, "--epochs", 1, "--teacher-checkpoint", bad, "--study", "x1")
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    storage = f"sqlite:///{env}/optuna.db"
    assert "x1" not in optuna.get_all_study_names(storage)  # nothing to resume, nothing to --show
    optuna.create_study(study_name="empty", storage=storage)
    shown = cli("tune", "--show", "empty")
    assert shown.exit_code == 0 and shown.output.splitlines()[1:3] == ["best: (no complete trial)", "trials: none yet"]
