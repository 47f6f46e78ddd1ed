"""The step benchmark's teacher-fusion experiment (tests/benchmarks/teacher_fusion.py): the fused
teacher computes the original's logits and stage features, its cuDNN branch passes the right
arguments (checked with the cuDNN ops replaced by their documented formula,
relu(conv(x) + alpha * z + bias)), a layer cuDNN refuses stays correct, and a forward is 39
kernels instead of 153."""
import collections
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from kdbench.core import plugins
from kdbench.core.taps import Tapped

PATH = Path(__file__).parents[1] / "benchmarks" / "teacher_fusion.py"
spec = importlib.util.spec_from_file_location("teacher_fusion", PATH)
fusion = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fusion)


@pytest.fixture(scope="module")
def teacher():
    """resnet32x4 in eval mode with BatchNorm statistics and affine parameters far from the
    identity, so that a wrong fold shows."""
    torch.manual_seed(0)
    model = plugins.load().models["resnet32x4"].obj
    net = model.make(100, (3, 32, 32))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return net.eval().requires_grad_(False), model.taps(net)


def stage_features(net, taps, x, fuse=None):
    """Logits and stage1..3 through the engine's taps, hooked before an optional fusion."""
    tapped = Tapped(net, taps, ["stage1", "stage2", "stage3"], "teacher")
    if fuse:
        fuse(net)
    with torch.no_grad():
        out = tapped(x)
    return out.logits, out.feats


def relative(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_fused_teacher_gives_the_original_logits_and_stage_features_in_fp32(teacher):
    net, taps = teacher
    logits, feats = stage_features(copy.deepcopy(net), taps, X)
    done = {}
    fused_logits, fused_feats = stage_features(
        copy.deepcopy(net), taps, X, lambda n: done.update(fusion.fuse_teacher(n, torch.float32)))
    assert done == {"blocks": 15, "stem": True, "dtype": "float32"}
    assert relative(fused_logits, logits) < 1e-5
    for name in feats:
        assert relative(fused_feats[name], feats[name]) < 1e-5, name


def test_fused_teacher_under_bf16_autocast_is_within_bf16_noise(teacher):
    net, _ = teacher
    fused = copy.deepcopy(net)
    fusion.fuse_teacher(fused, torch.bfloat16)
    assert fused.layer1[0].c1.weight.dtype == torch.bfloat16
    got = fusion.compare(net, fused, X, "bf16")
    assert got["max_rel_diff"] < 0.03 and got["top1_agree"] == 1.0, got


def fake_cudnn(monkeypatch, calls, refuse_add=False):
    """cuDNN's conv-bias-add-activation as documented, relu(conv(x) + alpha * z + bias), counted
    in ``calls`` as the one kernel it is (its reference ops run outside any dispatch mode)."""
    def conv_relu(x, w, b, stride, padding, dilation, groups):
        calls["relu"] += 1
        with _disable_current_modes():
            return torch.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))

    def conv_add_relu(x, w, z, alpha, b, stride, padding, dilation, groups):
        calls["add_relu"] += 1
        if refuse_add:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED\nmore lines")
        with _disable_current_modes():
            return torch.relu(F.conv2d(x, w, b, stride, padding, dilation, groups) + alpha * z)

    monkeypatch.setattr(fusion, "cudnn_fusable", lambda x: True)
    monkeypatch.setattr(torch, "cudnn_convolution_relu", conv_relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", conv_add_relu)


def test_the_cudnn_branch_passes_strides_paddings_biases_and_shortcuts_right(teacher, monkeypatch):
    net, taps = teacher
    logits, feats = stage_features(copy.deepcopy(net), taps, X)
    calls = collections.Counter()
    fake_cudnn(monkeypatch, calls)
    fused = copy.deepcopy(net)
    fused_logits, fused_feats = stage_features(fused, taps, X, lambda n: fusion.fuse_teacher(n, torch.float32))
    assert calls == {"relu": 16, "add_relu": 15}  # the stem and each block's first conv; each block's second
    assert relative(fused_logits, logits) < 1e-5
    for name in feats:
        assert relative(fused_feats[name], feats[name]) < 1e-5, name
    assert fusion.failed_layers(fused) == {}


def test_a_layer_cudnn_refuses_stays_unfused_and_correct(teacher, monkeypatch):
    net, _ = teacher
    calls = collections.Counter()
    fake_cudnn(monkeypatch, calls, refuse_add=True)
    fused = copy.deepcopy(net)
    fusion.fuse_teacher(fused, torch.float32)
    with torch.no_grad():
        assert relative(fused(X), net(X)) < 1e-5
        refused = fusion.failed_layers(fused)
        assert len(refused) == 15 and set(refused.values()) == {"cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"}
        fused(X)  # decided once: the refused layers are not tried again
    assert calls == {"relu": 32, "add_relu": 15}


def kernels(net, x) -> int:
    """Dispatched operators that launch a kernel (views and allocations left out)."""
    counts = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), Count():
        net(x)
    views = {"detach", "empty", "view", "t", "expand", "unsqueeze", "select", "slice", "_unsafe_view"}
    return sum(n for name, n in counts.items() if name not in views)


def test_a_fused_forward_launches_a_quarter_of_the_kernels(teacher, monkeypatch):
    net, _ = teacher
    # 34 convolutions, 34 BatchNorms, 31 ReLUs, 15 adds, 37 casts (35 weights, the input, the bias)
    assert kernels(net, X) == 153
    calls = collections.Counter()
    fake_cudnn(monkeypatch, calls)
    fused = copy.deepcopy(net)
    fusion.fuse_teacher(fused, torch.bfloat16)
    # 31 fused convolutions, 3 shortcut convolutions (their bias inside), the input's cast, the
    # pooling, the classifier's two casts and its matmul
    assert kernels(fused, X) + sum(calls.values()) == 39
