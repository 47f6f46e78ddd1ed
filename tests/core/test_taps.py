"""Feature taps: forward hooks on outputs and inputs, pattern expansion, and which taps a method
reads (one rule for the engine and for each part of a combined method)."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdbench.contracts import Method, Tap
from kdbench.core.taps import Tapped, expand, wanted_taps
from kdbench.errors import KdbenchError


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


def _loss(step):
    return {}


def test_wanted_taps_expands_patterns_on_each_network_or_asks_the_method():
    student, teacher = ["stem", "stage1", "stage2", "pool"], ["stem", "stage1", "stage2", "stage3", "pool"]
    hp = SimpleNamespace(k=2)
    patterns = Method("pat", _loss, taps=("stage?",))
    assert wanted_taps(patterns, hp, student, teacher) == (["stage1", "stage2"], ["stage1", "stage2", "stage3"])
    assert wanted_taps(patterns, hp, student, None) == (["stage1", "stage2"], [])  # no teacher
    seen = []

    def pick(hp_, s_taps, t_taps):
        seen.append((hp_.k, s_taps, t_taps))
        return s_taps[: hp_.k]

    chooser = Method("fn", _loss, taps=pick)
    assert wanted_taps(chooser, hp, student, teacher) == (["stem", "stage1"], ["stem", "stage1"])  # same on both
    assert wanted_taps(chooser, hp, student, None) == (["stem", "stage1"], [])
    assert seen == [(2, student, teacher), (2, student, None)]
    with pytest.raises(KdbenchError, match="no tap 'stage3'"):  # the student is expanded first
        wanted_taps(Method("deep", _loss, taps=("stage3",)), hp, student, teacher)
