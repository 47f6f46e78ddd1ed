"""kdbench tune: studies over a method's search space, pruning, killed workers, PostgreSQL."""
import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner
from optuna.trial import TrialState

from kdbench.core import plugins
from kdbench.workflows import run as runner, tune
from kdbench.cli import main
from kdbench.core.engine import EpochLog
from kdbench.workflows.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
PG_URL_FILE = Path(os.environ.get("KDBENCH_PG_URL_FILE", "/tmp/kdbench-postgres.url"))


def cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def teacher_checkpoint(path: Path) -> Path:
    """An (untrained) default teacher as a checkpoint, so the test trains no teacher."""
    reg = plugins.registry()
    ds = reg.dataset("mnist1d")
    net = reg.model(ds.default_teacher).make(ds.num_classes, ds.input_shape)
    torch.save({"model": net.state_dict()}, path)
    return path


def worker_cmd(*args):
    code = "from kdbench.cli import main; main()"
    return [sys.executable, "-c", code, "tune", *map(str, args)]


def worker_env(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins"), env.get("PYTHONPATH", "")])
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    return env


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
    assert "retrained best params, test top-1" in r.output

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
    best = tune.pick_best(study)
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


def _wait_for(predicate, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_worker_resumes_without_counting_the_killed_trial(env):
    storage = f"sqlite:///{env}/optuna.db"
    args = ("--method", "vanilla", "--tune-recipe", "--trials", 2, "--epochs", 3, "--study", "k",
            "--heartbeat", 1, "--no-retrain", "--pruner", "none")
    proc = subprocess.Popen(worker_cmd(*args), cwd=env, env=worker_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def running():
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        db = env / "optuna.db"
        if not db.exists():
            return False
        try:  # read-only, raw: an Optuna client here could race the worker creating the schema
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                return [n for (n,) in con.execute("SELECT number FROM trials WHERE state = 'RUNNING'")]
        except sqlite3.Error:
            return False

    (killed,) = _wait_for(running, 120, "a RUNNING trial")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(2.5)  # past the grace period (2 × heartbeat)

    out = subprocess.run(worker_cmd(*args), cwd=env, env=worker_env(env), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    study = optuna.load_study(study_name="k", storage=storage)
    states = [t.state for t in study.trials]
    assert study.trials[killed].state == TrialState.FAIL
    assert study.trials[killed].user_attrs.get("fail_reason") == "worker died (stale heartbeat)"
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 2  # budget held
    assert TrialState.RUNNING not in states
    tracker = Tracker(f"sqlite:///{env}/mlflow.db")
    for dead in tracker.search("mnist1d", f"tags.study = 'k' AND tags.trial = '{killed}'"):
        # (none when the worker died before the trial's run was created)
        assert dead.info.status == "KILLED" and dead.data.tags["trial_state"] == "FAILED"


def _postgres_url():
    if PG_URL_FILE.exists():
        return PG_URL_FILE.read_text().strip()
    script = ROOT / ".ci" / "services.d" / "postgres.sh"
    if not any(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.skip("no PostgreSQL installed (run .ci/services.d/postgres.sh as root)")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    if out.returncode != 0 or not PG_URL_FILE.exists():
        pytest.skip(f"PostgreSQL could not be started: {out.stderr.strip()[-300:]}")
    return PG_URL_FILE.read_text().strip()


def test_two_workers_share_a_postgres_study(env):
    url = _postgres_url()
    pytest.importorskip("psycopg2", reason="psycopg2-binary (the test extra) is needed for PostgreSQL")
    try:
        optuna.study.get_all_study_names(tune.open_storage(url))
    except Exception as exc:
        pytest.skip(f"PostgreSQL at {tune.mask_url(url)} is not reachable: {exc}")
    name = f"pg-{uuid.uuid4().hex[:8]}"
    args = ("--method", "vanilla", "--tune-recipe", "--trials", 4, "--epochs", 1, "--study", name,
            "--storage", url, "--no-retrain")
    Tracker(f"sqlite:///{env}/mlflow.db").experiment_id("mnist1d")  # create the MLflow schema once, not racing
    procs = [subprocess.Popen(worker_cmd(*args), cwd=env, env=worker_env(env), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    study = optuna.load_study(study_name=name, storage=tune.open_storage(url))
    counted = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == 4
    assert all(t.state != TrialState.RUNNING for t in study.trials)
    # every trial ran in exactly one worker, and each counted trial has exactly one MLflow run
    lines = [line for out in outs for line in out.splitlines() if line.startswith("trial #")]
    numbers = [int(line.split()[1][1:]) for line in lines]
    assert sorted(numbers) == sorted({t.number for t in study.trials} - {
        t.number for t in study.trials if t.user_attrs.get("fail_reason", "").startswith("over budget")})
    assert len(numbers) == len(set(numbers))
    tracker = Tracker(f"sqlite:///{env}/mlflow.db")
    runs = tracker.search("mnist1d", f"tags.study = '{name}' AND tags.role != 'study'")
    by_trial = [r.data.tags["trial"] for r in runs if r.data.tags.get("trial_state") in ("COMPLETE", "PRUNED")]
    assert sorted(map(int, by_trial)) == sorted(t.number for t in counted)
    optuna.delete_study(study_name=name, storage=tune.open_storage(url))


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
