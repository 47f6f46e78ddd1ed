"""kdbench.testing: the conformance kit passes good plugins and names what to fix in bad ones."""
import itertools
import random
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import make_dist
from kdbench.core import plugins
from kdbench.contracts import Dataset, HParam, Method, Model, Recipe, Tap
from kdbench.errors import KdbenchError
from kdbench.testing import check_dataset, check_method, check_model

EXAMPLE = Path(__file__).resolve().parents[1] / "plugins" / "kdbench-example"


def ce(step):
    return {"ce": F.cross_entropy(step.student.logits, step.y)}


def method(**kw):
    return Method(**{"name": "kdtest_m", "loss": ce, **kw})


def fails(pattern, fn, *args, **kw):
    with pytest.raises(AssertionError) as info:
        fn(*args, **kw)
    assert re.search(pattern, str(info.value)), str(info.value)
    return str(info.value)


@pytest.fixture
def example(env, monkeypatch, tmp_path):
    """The example package registered in-process (as its entry point would after pip install)."""
    root = make_dist(tmp_path / "site-example", "kdbench-example", "0.1.0", {"example": "kdbench_example"}, {})
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    plugins.reset()
    yield
    sys.modules.pop("kdbench_example", None)
    plugins.reset()


# --------------------------------------------------------------------------- good plugins pass


def test_builtins_conform(env):
    check_method("kd")
    check_method("fitnets", loss_trials=1)  # a hint stage and a regressor module
    check_model("cnn1d_2x16")
    check_dataset("mnist1d")


def test_example_package_conforms(example):
    entry = plugins.registry().methods["wsld"]
    assert entry.source == "kdbench-example 0.1.0"
    check_method("wsld")


# --------------------------------------------------------------------------- methods


def test_unregistered_and_refused_methods(env, add_dist):
    fails(r"method 'nope' is not registered .*pip install -e \.", check_method, "nope")
    src = (
        "from kdbench import hookimpl\nfrom kdbench.contracts import Method, HParam\n"
        "import torch.nn.functional as F\n"
        "@hookimpl\ndef register_methods(register):\n"
        "    register(Method(name='kdtest_bs', loss=lambda s: {'ce': F.cross_entropy(s.student.logits, s.y)},\n"
        "                    hparams=(HParam('w', 1.0, space=(2.0, 0.1)),)))\n"
    )
    add_dist("kdbench-bs", "0.3", {"bs": "kdtest_bs"}, {"kdtest_bs": src})
    fails(r"method 'kdtest_bs' is not registered because a plugin failed to load: bs \(kdbench-bs 0\.3\): "
          r".*search space \(2\.0, 0\.1\) is empty", check_method, "kdtest_bs")


@pytest.mark.parametrize("hparam, message", [
    (HParam("w", 1.0, space=(2.0, 0.1)),
     "method 'kdtest_m': hyperparameter 'w' search space (2.0, 0.1) is empty — give space=(low, high) with low < high"),
    (HParam("w", 1.0, low=0.0, space=(-1.0, 1.0)),
     "method 'kdtest_m': hyperparameter 'w' search space (-1.0, 1.0) reaches -1.0, which is not a valid value"),
    (HParam("w", 1.0, space=(0.0, 1.0), log=True), "log search space (0.0, 1.0) must be positive"),
    (HParam("w", 1.0), "hyperparameter 'w' is tunable but has no search space — give space=(low, high), or tune=False"),
    (HParam("w", 5.0, high=1.0, space=(0.1, 1.0)), "hyperparameter 'w': the default 5.0 is not valid"),
])
def test_bad_declarations(env, hparam, message):
    text = fails(".", check_method, method(hparams=(hparam,)), run=False)
    assert message in text and text.startswith("method 'kdtest_m': "), text


def loss_with(fn):
    return method(loss=lambda step: {"ce": F.cross_entropy(step.student.logits, step.y), **fn(step)})


STRAY = nn.Linear(10, 10)


class Frozen(nn.Module):
    """A module whose parameter no loss uses."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(10, 10)
        self.unused = nn.Linear(10, 10)


@pytest.mark.parametrize("bad, pattern", [
    (method(loss=lambda s: {"ce": F.cross_entropy(s.student.logits, s.y, reduction="none")}),
     r"term 'ce' has shape \(64,\) — reduce it to a scalar"),
    (loss_with(lambda s: {"kd": s.student.logits.sum() * float("nan")}), r"term 'kd' is nan"),
    (method(loss=lambda s: {"ce": F.cross_entropy(s.student.logits.detach(), s.y)}), r"is not differentiable"),
    (method(loss=lambda s: {"ce": 1.0}), r"term 'ce' is a float, not a tensor"),
    (method(loss=lambda s: [F.cross_entropy(s.student.logits, s.y)]), r"must return a non-empty dict"),
    (loss_with(lambda s: {"kd": STRAY(s.student.logits).pow(2).mean()}),  # a layer outside build()
     r"neither the student's nor in build\(\)'s module: .* create them in build\(probe\)"),
    (method(build=lambda probe: Frozen(),
            loss=lambda s: {"ce": F.cross_entropy(s.modules.used(s.student.logits), s.y)}),
     r"parameters \['unused.weight', 'unused.bias'\] of build\(\)'s module get no gradient"),
    (loss_with(lambda s: {"kd": (s.teacher_net.train()(s.x).logits - s.student.logits).pow(2).mean()}),
     r"changed the teacher's .*running_mean"),
    (loss_with(lambda s: {"kd": s.student.feats["nope"].mean()}), r"raised KeyError: 'nope'"),
    (method(taps=["stage9"]), r"cannot be set up on mnist1d cnn1d_4x32 → cnn1d_2x16 .*no tap 'stage9'"),
])
def test_bad_losses(env, bad, pattern):
    fails(pattern, check_method, bad, run=False, loss_trials=0)


def test_nondeterministic_method_is_caught(env):
    noisy = loss_with(lambda s: {"noise": random.random() * s.student.logits.pow(2).mean()})
    fails(r"two runs with seed 0 differ .* not from random/numpy", check_method, noisy, samples=128, loss_trials=0)


def test_one_epoch_run_failure_is_reported(env):
    calls = itertools.count()

    def nan_later(step):  # fine on the kit's probe batch, NaN once training is under way
        scale = float("nan") if next(calls) >= 2 else 1.0
        return {"ce": F.cross_entropy(step.student.logits, step.y) * scale}

    fails(r"a one-epoch run on mnist1d cnn1d_4x32 → cnn1d_2x16 failed: loss became non-finite",
          check_method, method(loss=nan_later), samples=256, loss_trials=0)


# --------------------------------------------------------------------------- models


class Net(nn.Module):
    def __init__(self, num_classes, input_shape, extra=False, logits=None):
        super().__init__()
        if len(input_shape) != 2:
            raise KdbenchError(f"1-D only, not {input_shape}")
        c, length = input_shape
        self.stage1 = nn.Sequential(nn.Conv1d(c, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8 * length, logits or num_classes)
        self.spare = nn.Linear(3, 3) if extra else None

    def forward(self, x):
        return self.fc(self.stage1(x).flatten(1))


TAPS = {"stage1": "stage1", "pool": Tap("fc", input=True)}


def test_good_model_passes(env):
    check_model(Model("kdtest_net", Net, taps=TAPS))  # refuses (3, 32, 32) with KdbenchError: fine
    check_model(Model("kdtest_net", Net, taps=TAPS), input_shapes=[(1, 40), (2, 17)])


@pytest.mark.parametrize("model, pattern", [
    (Model("kdtest_net", Net, taps={**TAPS, "stage2": "stage9"}), r"tap 'stage2' names module 'stage9'"),
    (Model("kdtest_net", Net, taps={**TAPS, "layer1": "stage1"}), r"tap names \['layer1'\] are not conventional"),
    (Model("kdtest_net", Net, taps={**TAPS, "stage3": "stage1"}), r"numbered 1..N without gaps"),
    (Model("kdtest_net", Net, taps={"stage1": "stage1"}), r"has no tap \['pool'\]"),
    (Model("kdtest_net", Net, taps=TAPS, kwargs={"extra": True}), r"parameters \['spare.weight', 'spare.bias'\] .* get no gradient"),
    (Model("kdtest_net", Net, taps=TAPS, kwargs={"logits": 7}), r"logits of shape \[batch, num_classes\] = \(4, 10\)"),
    (Model("kdtest_net", lambda n, s: nn.Linear(s[-1], n)), r"build for input .* raised RuntimeError|raise KdbenchError|has no tap"),
])
def test_bad_models(env, model, pattern):
    fails(pattern, check_model, model, input_shapes=[(1, 40)])


def test_model_that_crashes_on_other_shapes(env):
    def build(n, shape):
        c, length = shape  # ValueError on 3-D shapes instead of a KdbenchError
        return Net(n, shape)

    fails(r"build for input \(3, 32, 32\) raised ValueError.*raise KdbenchError", check_model, Model("kdtest_net", build, taps=TAPS))


# --------------------------------------------------------------------------- datasets


def synthetic(val_overlap=False, labels_offset=0, noisy=False, num_classes=4):
    def load(split):
        g = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
        x = torch.randn(40, 1, 8, generator=g)
        if noisy:
            x = x + torch.randn(x.shape) * 1e-3
        if split == "val" and val_overlap:
            x[:3] = load("train")[0][:3]
        return x, torch.arange(40) % 4 + labels_offset

    return Dataset("kdtest_ds", load, num_classes, (1, 8), Recipe(epochs=2, batch_size=8, lr=0.1))


def test_good_dataset_passes(env):
    check_dataset(synthetic())


@pytest.mark.parametrize("ds, pattern", [
    (synthetic(val_overlap=True), r"3 validation sample\(s\) also appear in 'train' — carve val from train"),
    (synthetic(labels_offset=1), r"labels span 1..4 but num_classes=4"),
    (synthetic(num_classes=6), r"'train' holds 4 of num_classes=6 classes"),
    (synthetic(noisy=True), r"split 'train' differs between two loads"),
    (Dataset("kdtest_ds", synthetic().load, 4, (1, 9), Recipe(epochs=2, batch_size=8, lr=0.1)),
     r"samples of shape \(1, 8\), input_shape declares \(1, 9\)"),
    (Dataset("kdtest_ds", synthetic().load, 4, (1, 8), Recipe(epochs=2, batch_size=8, lr=0.1), mean=(0.1, 0.2)),
     r"mean has 2 values; give one per channel \(1\)"),
    (Dataset("kdtest_ds", synthetic().load, 4, (1, 8), Recipe(epochs=2, batch_size=8, lr=0.1), default_student="nope"),
     r"default_student='nope' is not a registered model"),
])
def test_bad_datasets(env, ds, pattern):
    fails(pattern, check_dataset, ds)
