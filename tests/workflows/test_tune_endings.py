"""How a study ends when it cannot go on: Ctrl-C ends its parent run KILLED; trials failing in a
row stop it with one line and a non-zero exit, not an endless loop (issue 15, items 2 and 4)."""
import pytest
from mlflow.tracking import MlflowClient

from kdbench.errors import KdbenchError
from kdbench.workflows import run as runner, tune


def config(env, **changes):
    return tune.TuneConfig(**{"method": "vanilla", "tune_recipe": True, "trials": 2, "recipe": {"epochs": 1},
                              "study": "e", "retrain": False, "pruner": "none",
                              "tracking_uri": f"sqlite:///{env}/mlflow.db", **changes})


def parent_run(env):
    client = MlflowClient(f"sqlite:///{env}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("kdbench/mnist1d").experiment_id],
                                "tags.role = 'study'")
    return run


def test_ctrl_c_ends_the_study_parent_run_killed(env, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune, "_run_trials", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune.run_study(config(env))
    assert parent_run(env).info.status == "KILLED"


def test_trials_failing_in_a_row_stop_the_study(env, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("plugin bug")

    monkeypatch.setattr(runner, "run", broken)
    with pytest.raises(KdbenchError) as caught:
        tune.run_study(config(env))
    assert str(caught.value) == (f"study 'e': {tune.MAX_FAILED_IN_A_ROW} trials failed in a row (last: "
                                 "RuntimeError: plugin bug); 0 of 2 trials counted; fix the cause and resume it")
    run = parent_run(env)
    assert run.info.status == "FAILED" and "failed in a row" in run.data.tags["failure_reason"]


def test_a_dead_workers_trial_does_not_end_the_study_short(env):
    """A RUNNING trial of a worker on another host (no pid to check) used to fill the budget, so the
    study ended with 0 of 1 trials and exit 0; now the worker waits until it is stale, then replaces it."""
    import optuna
    from optuna.trial import TrialState

    from kdbench.workflows import studies

    storage = studies.open_storage(None, f"sqlite:///{env}/mlflow.db", heartbeat=3)
    orphan = optuna.create_study(storage=storage, study_name="e", direction="maximize").ask()  # never beats
    result = tune.run_study(config(env, trials=1, heartbeat=3))
    states = [trial.state for trial in result.study.trials]
    assert result.trials_counted == 1 and states[orphan.number] == TrialState.FAIL
    assert TrialState.RUNNING not in states
