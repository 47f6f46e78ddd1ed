"""Resuming a study with other settings is refused in one line naming them (issue 15, item 11)."""
import pytest

from kdbench.core import plugins
from kdbench.errors import KdbenchError
from kdbench.workflows import studies, tune


def opened(env, **changes):
    cfg = tune.TuneConfig(**{"method": "kd", "recipe": {"epochs": 1}, "study": "s", **changes})
    _, plan = tune._plan_study(cfg, plugins.registry())
    storage = studies.open_storage(None, f"sqlite:///{env}/mlflow.db")
    return tune._open_study(cfg, plan, storage, "s")


def test_resume_with_other_settings_is_refused(env):
    first = opened(env)
    assert first.user_attrs["settings"]["recipe.epochs"] == 1
    opened(env, trials=50, seeds=3)  # the budget, retrain seeds: may change
    with pytest.raises(KdbenchError) as caught:
        opened(env, recipe={"epochs": 6}, pruner="none")
    assert str(caught.value) == ("study 's' was run with --pruner median (now none), --epochs 1 (now 6); "
                                 "resume it with the same settings or pass another --study")


def test_a_study_from_before_compares_its_recipe(env):
    study = opened(env)
    study._storage.set_study_user_attr(study._study_id, "settings", None)  # as stored by older kdbench
    opened(env)
    with pytest.raises(KdbenchError, match="--epochs 1 \\(now 2\\)"):
        opened(env, recipe={"epochs": 2})
