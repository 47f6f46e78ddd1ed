"""Contracts: hyperparameters, recipes, taps, datasets, models."""
import pytest
import torch
from torch import nn

from kdbench.core import plugins
from kdbench.contracts import HParam, Recipe, Tap, resolve_hparams
from kdbench.core.splits import load_split
from kdbench.errors import KdbenchError
from kdbench.core.taps import Tapped, expand


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


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).flatten(1))


def test_taps_read_outputs_inputs_and_pre_activation_of_inplace_relu():
    torch.manual_seed(0)
    net = Net()
    taps = {"stage1": Tap("relu"), "stage1_pre": Tap("relu", input=True), "pool": Tap("fc", input=True)}
    tapped = Tapped(net, taps, ["stage1", "stage1_pre", "pool"], "net")
    x = torch.randn(5, 1, 4)
    out = tapped(x)
    pre = net.conv(x)
    assert (pre < 0).any()  # the in-place ReLU would have destroyed these without the pre-hook copy
    torch.testing.assert_close(out.feats["stage1_pre"], pre)
    torch.testing.assert_close(out.feats["stage1"], pre.clamp(min=0))
    torch.testing.assert_close(out.feats["pool"], pre.clamp(min=0).flatten(1))
    torch.testing.assert_close(out.logits, net(x))
    with pytest.raises(KdbenchError, match=r"net has no tap 'stage9' \(it has: stage1, stage1_pre, pool\)"):
        Tapped(net, taps, ["stage9"], "net")


def test_expand_patterns_keep_declared_order():
    names = ["stem", "stage1", "stage2", "stage1_pre", "stage2_pre", "pool"]
    assert expand(["stage[0-9]", "stage[0-9][0-9]"], names) == ["stage1", "stage2"]
    assert expand(["pool", "stage1"], names) == ["stage1", "pool"]
    with pytest.raises(KdbenchError, match="no tap 'stage3'"):
        expand(["stage3"], names)
    with pytest.raises(KdbenchError, match="no tap matching"):
        expand(["block*"], names)


def test_mnist1d_splits(env):
    ds = plugins.registry().dataset("mnist1d")
    splits = {s: load_split(ds, s, torch.device("cpu"), {}) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 3600, "val": 400, "test": 1000}
    assert splits["train"].x.shape[1:] == (1, 40) and splits["train"].x.dtype == torch.float32
    assert sorted(splits["test"].y.unique().tolist()) == list(range(10))
    again = load_split(ds, "val", torch.device("cpu"), {})
    assert torch.equal(again.x, splits["val"].x)  # the validation carve is fixed
    # validation samples are not in train
    train_rows = {tuple(r.tolist()) for r in splits["train"].x[:, 0]}
    assert not any(tuple(r.tolist()) in train_rows for r in splits["val"].x[:, 0])


def test_model_refuses_an_input_shape_it_cannot_take(env):
    model = plugins.registry().model("cnn1d_2x16")
    with pytest.raises(KdbenchError, match=r"cnn1d takes \(channels, length\) inputs, not \(3, 32, 32\)"):
        model.make(10, (3, 32, 32))
