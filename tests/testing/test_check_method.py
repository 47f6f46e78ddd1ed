"""check_method passes good methods and names what to fix in bad ones."""
import itertools
import random
import sys
from pathlib import Path

import pytest
import torch.nn.functional as F
from torch import nn

from helpers import make_dist
from kdbench.core import plugins
from kdbench.contracts import HParam, Method
from kdbench.testing import check_method

EXAMPLE = Path(__file__).resolve().parents[2] / "plugins" / "kdbench-example"


def ce(step):
    return {"ce": F.cross_entropy(step.student.logits, step.y)}


def method(**kw):
    return Method(**{"name": "kdtest_m", "loss": ce, **kw})


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


def test_example_package_conforms(example):
    entry = plugins.registry().methods["wsld"]
    assert entry.source == "kdbench-example 0.1.0"
    check_method("wsld")


def test_unregistered_and_refused_methods(env, add_dist, fails):
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
def test_bad_declarations(env, fails, hparam, message):
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
def test_bad_losses(env, fails, bad, pattern):
    fails(pattern, check_method, bad, run=False, loss_trials=0)


def test_nondeterministic_method_is_caught(env, fails):
    noisy = loss_with(lambda s: {"noise": random.random() * s.student.logits.pow(2).mean()})
    fails(r"two runs with seed 0 differ .* not from random/numpy", check_method, noisy, samples=128, loss_trials=0)


def test_one_epoch_run_failure_is_reported(env, fails):
    calls = itertools.count()

    def nan_later(step):  # fine on the kit's probe batch, NaN once training is under way
        scale = float("nan") if next(calls) >= 2 else 1.0
        return {"ce": F.cross_entropy(step.student.logits, step.y) * scale}

    fails(r"a one-epoch run on mnist1d cnn1d_4x32 → cnn1d_2x16 failed: loss became non-finite",
          check_method, method(loss=nan_later), samples=256, loss_trials=0)
