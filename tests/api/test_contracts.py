"""Contracts: hyperparameters, recipes, models (taps: tests/core/test_taps.py; splits:
tests/core/test_splits.py)."""
import pytest

from kdbench.contracts import HParam, Recipe, resolve_hparams
from kdbench.core import plugins
from kdbench.errors import KdbenchError


def test_hparam_parse_and_ranges():
    t = HParam("T", 4.0, low=0.0, open_low=True, space=(1.0, 20.0), log=True)
    assert t.check("2.5") == 2.5
    with pytest.raises(KdbenchError, match=r"hyperparameter T=0.0 must be > 0.0"):
        t.check("0")
    with pytest.raises(KdbenchError, match="not a valid float"):
        t.check("hot")
    n = HParam("k", 3, low=1, high=5, space=(1, 5))
    assert n.check("4") == 4 and isinstance(n.check("4"), int)
    with pytest.raises(KdbenchError, match="not a valid int"):
        n.check("2.5")
    with pytest.raises(KdbenchError, match=r"k=6 must be <= 5"):
        n.check(6)
    c = HParam("kernel", "poly", choices=("linear", "poly"))
    with pytest.raises(KdbenchError, match=r"not one of \['linear', 'poly'\]"):
        c.check("rbf")
    b = HParam("flag", False, tune=False)
    assert b.check("yes") is True and b.check("off") is False


def test_resolve_hparams_rejects_unknown_keys_with_a_hint():
    hps = (HParam("T", 4.0, low=0.0), HParam("alpha", 0.9, low=0.0, high=1.0))
    assert resolve_hparams(hps, {"alpha": "0.5"}, "method 'kd'") == {"T": 4.0, "alpha": 0.5}
    with pytest.raises(KdbenchError) as err:
        resolve_hparams(hps, {"alpah": "0.5"}, "method 'kd'")
    assert str(err.value) == "method 'kd' has no hyperparameter 'alpah'; did you mean alpha? (it has: T, alpha)"


def test_declaration_validation():
    with pytest.raises(ValueError, match="tunable but has no search space"):
        HParam("w", 1.0).validate_declaration()
    with pytest.raises(ValueError, match="log search space must be positive"):
        HParam("w", 1.0, space=(0.0, 2.0), log=True).validate_declaration()
    with pytest.raises(KdbenchError, match="must be <= 1.0"):
        HParam("a", 0.5, high=1.0, space=(0.1, 2.0)).validate_declaration()
    HParam("w", 1.0, low=0.0, space=(0.1, 2.0)).validate_declaration()


def test_recipe_epochs_rescale_milestones():
    r = Recipe(epochs=240, batch_size=64, lr=0.05, milestones=(150, 180, 210))
    assert r.with_(epochs=24).milestones == (15, 18, 21)
    with pytest.raises(KdbenchError, match="recipe has no field"):
        r.with_(epoch=3)


def test_model_refuses_an_input_shape_it_cannot_take(env):
    model = plugins.registry().model("cnn1d_2x16")
    with pytest.raises(KdbenchError, match=r"cnn1d takes \(channels, length\) inputs, not \(3, 32, 32\)"):
        model.make(10, (3, 32, 32))
