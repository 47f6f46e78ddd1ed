"""A frozen teacher's inference form (``Model.fuse``; the CIFAR ResNets' in
plugins/kdbench_builtin/models/resnet_cifar.py, built of ``kdbench.fusion`` pieces) and how the
engine uses it (``engine.fuse_teacher``): the fused teacher computes the original's logits and stage
features, its cuDNN branch passes the right arguments (checked with the cuDNN ops replaced by their
documented formula, relu(conv(x) + alpha * z + bias)), a layer cuDNN refuses stays correct, a
forward is 39 kernels instead of 153; in a run it serves the teacher's forward passes without
gradients only, after a check against the original that a wrong fusion fails."""
import collections
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import kdbench.fusion
from kdbench.contracts import Augment, Dataset, Recipe
from kdbench.core import engine, lockstep, plugins
from kdbench.core.plan import RunConfig, make_plan
from kdbench.core.plugins import Entry
from kdbench.core.taps import Tapped
from kdbench_builtin.models import resnet_cifar


def far_from_identity(net):
    """BatchNorm statistics and affine parameters far from the identity, so that a wrong fold shows."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = plugins.load().models["resnet32x4"].obj
    net = far_from_identity(model.make(100, (3, 32, 32)))
    return net, model.taps(net)


def fused(net, dtype=torch.float32):
    return resnet_cifar.fuse(copy.deepcopy(net), dtype)


def stage_features(net, taps, x):
    """Logits and stem, stage1..3 and pool through the engine's taps."""
    tapped = Tapped(net, taps, ["stem", "stage1", "stage2", "stage3", "pool"], "teacher")
    with torch.no_grad():
        out = tapped(x)
    tapped.remove()
    return out.logits, out.feats


def relative(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_fused_teacher_gives_the_original_logits_and_stage_features_in_fp32(teacher):
    net, taps = teacher
    logits, feats = stage_features(net, taps, X)
    net_fused = fused(net)
    assert sum(isinstance(m, kdbench.fusion.FusedResidual) for m in net_fused.modules()) == 15
    assert isinstance(net_fused.conv1, kdbench.fusion.FusedConv)
    fused_logits, fused_feats = stage_features(net_fused, taps, X)
    assert relative(fused_logits, logits) < 1e-5
    for name in feats:
        assert relative(fused_feats[name], feats[name]) < 1e-5, name


@pytest.mark.parametrize("name, dropped", [
    ("vgg13", []),  # a block's last convolution keeps its ReLU apart: stageI_pre is kept
    ("resnet50", ["stage1_pre", "stage2_pre", "stage3_pre", "stage4_pre"]),  # Bottlenecks
    ("resnet18", ["stage1_pre", "stage2_pre", "stage3_pre", "stage4_pre"]),  # identity shortcuts too
])
def test_the_other_fusable_teachers_keep_their_logits_and_taps(name, dropped):
    """The published table's other fusable teachers (vgg13, ResNet50) and resnet18: logits and every
    tap the fused network keeps within 1e-5 in float32; only taps inside a block are dropped."""
    torch.manual_seed(0)
    model = plugins.load().models[name].obj
    net = far_from_identity(model.make(100, (3, 32, 32)))
    taps = model.taps_of(net)
    net_fused = model.fuse(copy.deepcopy(net), torch.float32)
    modules = dict(net_fused.named_modules())
    kept = [tap for tap, where in taps.items() if where.module in modules]
    assert [tap for tap in taps if tap not in kept] == dropped
    a, b = Tapped(net, taps, kept, name), Tapped(net_fused, taps, kept, name)
    with torch.no_grad():
        out, fused_out = a(X[:4]), b(X[:4])
    assert relative(fused_out.logits, out.logits) < 1e-5
    for tap in kept:
        assert relative(fused_out.feats[tap], out.feats[tap]) < 1e-5, tap
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net_fused.modules())


def test_fused_teacher_under_bf16_autocast_is_within_bf16_noise(teacher):
    net, _ = teacher
    net_fused = fused(net, torch.bfloat16)
    assert net_fused.layer1[0].path[0].weight.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        a, b = net(X).float(), net_fused(X).float()
    assert relative(b, a) < 0.03 and torch.equal(a.argmax(1), b.argmax(1))


def test_bottleneck_networks_have_nothing_to_fuse():
    net = resnet_cifar.ResNetCifar(10, (3, 32, 32), depth=11, block="bottleneck").eval()
    assert resnet_cifar.fuse(net, torch.float32) is None


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

    monkeypatch.setattr(kdbench.fusion, "cudnn_fusable", lambda x: True)
    monkeypatch.setattr(torch, "cudnn_convolution_relu", conv_relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", conv_add_relu)


def test_the_cudnn_branch_passes_strides_paddings_biases_and_shortcuts_right(teacher, monkeypatch):
    net, taps = teacher
    logits, feats = stage_features(net, taps, X)
    calls = collections.Counter()
    fake_cudnn(monkeypatch, calls)
    net_fused = fused(net)
    fused_logits, fused_feats = stage_features(net_fused, taps, X)
    assert calls == {"relu": 16, "add_relu": 15}  # the stem and each block's first conv; each block's second
    assert relative(fused_logits, logits) < 1e-5
    for name in feats:
        assert relative(fused_feats[name], feats[name]) < 1e-5, name
    assert kdbench.fusion.failed_layers(net_fused) == {}


def test_a_layer_cudnn_refuses_stays_unfused_and_correct(teacher, monkeypatch):
    net, _ = teacher
    calls = collections.Counter()
    fake_cudnn(monkeypatch, calls, refuse_add=True)
    net_fused = fused(net)
    with torch.no_grad():
        assert relative(net_fused(X), net(X)) < 1e-5
        refused = kdbench.fusion.failed_layers(net_fused)
        assert len(refused) == 15 and set(refused.values()) == {"cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"}
        net_fused(X)  # decided once: the refused layers are not tried again
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
    net_fused = fused(net, torch.bfloat16)
    # 31 fused convolutions, 3 shortcut convolutions (their bias inside), the input's cast, the
    # pooling and the classifier's matmul (its weights held in bf16)
    assert kernels(net_fused, X) + sum(calls.values()) == 37


# --------------------------------------------------------------------------- in a run


@pytest.fixture
def cifar_plan(monkeypatch):
    """Plans of a 64-sample CIFAR-shaped dataset, resnet8 → resnet8, fusion on for the CPU."""
    monkeypatch.setattr(engine, "TEACHER_FUSION", "always")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (64,), generator=g)
    reg = plugins.registry()
    ds = Dataset(name="cifar_fusion_test", load=lambda split: (x, y), num_classes=10, input_shape=(3, 32, 32),
                 recipe=Recipe(epochs=1, batch_size=16, lr=0.05, schedule="constant", milestones=()),
                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), augment=Augment(crop_pad=4, flip=True))
    monkeypatch.setitem(reg.datasets, ds.name, Entry(ds, "test", "test", "0"))

    def plan(method, **config):
        return make_plan(RunConfig(method=method, dataset=ds.name, teacher="resnet8", student="resnet8",
                                   device="cpu", **config), reg)

    return plan


def teacher_of(plan):
    torch.manual_seed(1)
    return far_from_identity(engine.build_teacher(plan, torch.device("cpu")))


def fit(plan, teacher_net):
    setup = engine.setup_student(plan, teacher_net, torch.device("cpu"))
    logs = []
    result = engine.run_student(plan, setup, torch.device("cpu"), logs.append, with_test=False)
    return setup, result, [log.metrics for log in logs]


def test_a_run_trains_on_the_fused_teacher_within_rounding_of_the_original(cifar_plan, monkeypatch):
    plan = cifar_plan("at")
    teacher_net = teacher_of(plan)
    calls = collections.Counter()
    forward = kdbench.fusion.FusedResidual.forward
    monkeypatch.setattr(kdbench.fusion.FusedResidual, "forward", lambda self, x: calls.update(["block"]) or forward(self, x))
    setup, result, logs = fit(plan, teacher_net)
    assert result.tags["teacher_fusion"] == "fused"
    assert setup.trainee.teacher.inference is not None
    assert calls["block"] > 0 and calls["block"] % 3 == 0  # resnet8: 3 blocks per teacher forward
    monkeypatch.setattr(engine, "TEACHER_FUSION", "off")
    _, unfused, unfused_logs = fit(plan, teacher_net)
    assert "teacher_fusion" not in unfused.tags
    for name, value in unfused_logs[0].items():
        if "loss" in name:
            assert logs[0][name] == pytest.approx(value, rel=1e-4), name


def test_a_loss_differentiating_through_the_teacher_gets_the_original():
    """A Tapped with an inference form runs it without gradients only: the original with them."""
    net = far_from_identity(plugins.load().models["resnet8"].obj.make(10, (3, 32, 32)))
    taps = resnet_cifar.resnet_taps(net)
    tapped = Tapped(net, taps, ["stage3"], "teacher")
    tapped.use_inference(Tapped(fused(net), taps, ["stage3"], "teacher (fused)"))
    x = X[:2].clone().requires_grad_(True)
    with torch.no_grad():
        assert tapped(x).logits.grad_fn is None
    out = tapped(x)
    (grad,) = torch.autograd.grad(out.feats["stage3"].sum(), x)
    assert grad.abs().sum() > 0
    assert "inference" not in dict(tapped.named_children())  # not a submodule: no state of its own here


def test_a_method_reading_a_tap_inside_a_block_runs_the_original_teacher(cifar_plan, caplog):
    plan = cifar_plan("ab")  # ab reads stage*_pre: the input of a block's last ReLU, fused away
    with caplog.at_level(logging.WARNING, logger="kdbench"):
        setup = engine.setup_student(plan, teacher_of(plan), torch.device("cpu"))
    assert setup.trainee.teacher.inference is None
    assert setup.trainee.teacher_fusion == "unfused: the method reads tap 'stage1_pre', which the fused teacher does not keep"
    assert caplog.records == []  # expected: a tag, no line


def stem_without_relu(net, dtype):  # the stem fused without its ReLU: stem and everything after it change
    net = resnet_cifar.fuse(net, dtype)
    net.conv1.relu = False
    return net


def broken(net, dtype):
    raise ValueError("boom\nsecond line")


@pytest.mark.parametrize("fuse, why", [(stem_without_relu, "its fused form's logits is "),
                                       (broken, "its model's fuse failed: ValueError: boom")])
def test_a_fused_form_that_computes_something_else_or_fails_is_refused_with_one_line(cifar_plan, caplog, fuse, why):
    model = plugins.registry().models["resnet8"].obj
    object.__setattr__(model, "fuse", fuse)  # Model is frozen
    try:
        plan = cifar_plan("kd")
        with caplog.at_level(logging.WARNING, logger="kdbench"):
            setup = engine.setup_student(plan, teacher_of(plan), torch.device("cpu"))
    finally:
        object.__setattr__(model, "fuse", resnet_cifar.fuse)
    assert setup.trainee.teacher.inference is None
    assert setup.trainee.teacher_fusion.startswith("unfused: " + why)
    (record,) = caplog.records
    assert record.getMessage().startswith("kdbench: teacher 'resnet8' runs unfused: " + why)


def test_a_lockstep_group_shares_one_fused_teacher_unless_a_member_reads_a_fused_away_tap(cifar_plan):
    plans = [cifar_plan(name) for name in ("kd", "at")]
    teacher_net = teacher_of(plans[0])
    taps = plans[0].teacher_obj.taps_of(teacher_net)
    setups = [engine.setup_student(plan, teacher_net, torch.device("cpu")) for plan in plans]
    group = lockstep.share_teacher(setups, teacher_net, taps, "teacher 'resnet8'")
    assert group.tapped.inference is not None and group.tapped.inference.wanted == ["stage1", "stage2", "stage3"]
    assert [s.trainee.teacher_fusion for s in setups] == ["fused", "fused"]
    group.tapped.remove()
    mixed = [engine.setup_student(cifar_plan(name), teacher_net, torch.device("cpu")) for name in ("kd", "ab")]
    group = lockstep.share_teacher(mixed, teacher_net, taps, "teacher 'resnet8'")
    assert group.tapped.inference is None
    assert {s.trainee.teacher_fusion for s in mixed} == {
        "unfused: a lockstep group member reads taps the fused teacher does not keep"}
