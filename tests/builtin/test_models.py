"""The CIFAR model zoo: parameter counts against the published numbers, FLOPs against an analytic
count, taps, wrong input shapes, and RepDistiller-format checkpoints."""
import pytest
import torch

from kdbench.core import metrics
from kdbench.core.engine import load_checkpoint
from kdbench.errors import KdbenchError
from kdbench.core.plugins import load as load_plugins
from kdbench.core.taps import Tapped

CIFAR = (3, 32, 32)

# Published parameter counts (millions, 100 classes) from the CRD / RepDistiller tables and the
# METHODS.md reference notes; compared at the published precision.
PUBLISHED_PARAMS_M = {
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet56": 0.86,
    "resnet110": 1.73,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.26,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "mobilenetv2": 0.81,
    "shufflenetv1": 0.95,
    "shufflenetv2": 1.36,
    "resnet50": 23.71,
}

ZOO = sorted(PUBLISHED_PARAMS_M) + [
    "resnet8", "resnet14", "resnet44", "wrn_16_1", "vgg11", "vgg16", "vgg19", "resnet18", "resnet34",
]
ZOO = sorted(set(ZOO))


@pytest.fixture(scope="module")
def registry():
    reg = load_plugins()
    assert not reg.failures, reg.failures
    return reg


def build(registry, name, num_classes=100, shape=CIFAR):
    torch.manual_seed(0)
    return registry.model(name).make(num_classes, shape)


def test_every_zoo_model_is_registered(registry):
    missing = [n for n in ZOO if n not in registry.models]
    assert not missing


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_count_matches_published(registry, name):
    params = metrics.count_params(build(registry, name)) / 1e6
    # the published figures are truncated or rounded to two decimals
    assert abs(params - PUBLISHED_PARAMS_M[name]) <= 0.0075, (name, params)


def test_exact_parameter_counts(registry):
    # exact values of the reference implementation (100 classes), guarding against silent drift
    exact = {"resnet56": 861_620, "resnet32x4": 7_433_860, "resnet8x4": 1_233_540, "wrn_40_2": 2_255_156}
    for name, n in exact.items():
        assert metrics.count_params(build(registry, name)) == n, name


def analytic_resnet_flops(depth: int, widths, num_classes: int = 100) -> int:
    """2·MACs of a CIFAR ResNet (BasicBlocks, 1x1 projection shortcuts): convs and the fc."""
    n = (depth - 2) // 6

    def conv(k, c_in, c_out, hw):
        return 2 * k * k * c_in * c_out * hw * hw

    total = conv(3, 3, widths[0], 32)
    c_in, hw = widths[0], 32
    for stage, c in enumerate(widths[1:]):
        if stage > 0:
            hw //= 2
        for b in range(n):
            total += conv(3, c_in if b == 0 else c, c, hw) + conv(3, c, c, hw)
            if b == 0 and (stage > 0 or c_in != c):
                total += conv(1, c_in, c, hw)
        c_in = c
    return total + 2 * widths[-1] * num_classes


@pytest.mark.parametrize(
    "name,depth,widths,approx_g",
    [("resnet56", 56, (16, 16, 32, 64), 0.25), ("resnet32x4", 32, (32, 64, 128, 256), 2.17)],
)
def test_flops_match_analytic_count(registry, name, depth, widths, approx_g):
    flops = metrics.flops_per_sample(build(registry, name), CIFAR)
    assert flops == analytic_resnet_flops(depth, widths)
    assert abs(flops / 1e9 - approx_g) < 0.01


def _spatial(shape):
    return shape[2] if len(shape) == 4 else None


@pytest.mark.parametrize("name", ZOO)
def test_taps_resolve_and_have_sensible_shapes(registry, name):
    model = registry.model(name)
    net = build(registry, name)
    taps = model.taps_of(net)
    stages = sorted((k for k in taps if k.startswith("stage") and not k.endswith("_pre")),
                    key=lambda k: int(k[5:]))
    assert {"stem", "pool", "stage1"} <= set(taps), taps
    assert len(stages) >= 3
    assert all(f"{s}_pre" in taps for s in stages)
    tapped = Tapped(net, taps, list(taps), name)
    tapped.eval()
    with torch.no_grad():
        out = tapped(torch.randn(2, *CIFAR))
    assert out.logits.shape == (2, 100)
    feats = {k: tuple(v.shape) for k, v in out.feats.items()}
    assert len(feats["stem"]) == 4 and feats["stem"][0] == 2
    sizes = [_spatial(feats[s]) for s in stages]
    assert all(len(feats[s]) == 4 for s in stages), feats
    assert sizes == sorted(sizes, reverse=True), (name, sizes)  # shallow -> deep
    assert sizes[0] > sizes[-1]
    for s in stages:
        assert feats[f"{s}_pre"] == feats[s], (name, s)
    assert len(feats["pool"]) == 2 and feats["pool"][1] == net.state_dict()[_classifier_weight(net)].shape[1]


def _classifier_weight(net):
    return [k for k in net.state_dict() if k.endswith("weight")][-1]


def test_pre_activation_taps_are_pre_relu(registry):
    # the stage output is the ReLU of the pre-activation tap (ShuffleNetV2: then channel-shuffled;
    # WRN: the pre-activation tap is the next BN of the raw stage output, so only its sign is checked)
    for name in ("resnet8", "shufflenetv1", "shufflenetv2", "vgg8", "wrn_16_1"):
        net = build(registry, name)
        taps = registry.model(name).taps_of(net)
        tapped = Tapped(net, taps, ["stage1", "stage1_pre"], name).train()
        with torch.no_grad():
            out = tapped(torch.randn(2, *CIFAR))
        pre, post = out.feats["stage1_pre"], out.feats["stage1"]
        assert pre.min() < 0, name
        if name == "shufflenetv2":
            torch.testing.assert_close(pre.clamp(min=0).sum(1), post.sum(1))
        elif name != "wrn_16_1":
            torch.testing.assert_close(pre.clamp(min=0), post)


@pytest.mark.parametrize("name", ZOO)
def test_wrong_input_shape_is_a_one_line_error(registry, name):
    for shape in [(1, 40), (1, 32, 32), (3, 16, 16)]:
        with pytest.raises(KdbenchError) as info:
            registry.model(name).make(10, shape)
        assert "\n" not in str(info.value) and name in str(info.value)


# literal key names of RepDistiller checkpoints (models/resnet.py, wrn.py, vgg.py, ...)
REFERENCE_KEYS = {
    "resnet8x4": ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn2.bias",
                  "layer1.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "fc.weight", "fc.bias"],
    "resnet56": ["layer3.8.conv2.weight", "layer2.0.downsample.0.weight", "fc.weight"],
    "wrn_40_2": ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.convShortcut.weight",
                 "block3.layer.5.conv2.weight", "bn1.weight", "fc.weight"],
    "vgg13": ["block0.0.weight", "block0.0.bias", "block0.1.running_mean", "block0.3.weight",
              "block4.4.weight", "classifier.weight"],
    "mobilenetv2": ["conv1.0.weight", "conv1.1.weight", "blocks.0.0.conv.0.weight", "blocks.6.0.conv.7.bias",
                    "conv2.0.weight", "classifier.0.weight"],
    "shufflenetv1": ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer3.3.bn3.weight", "linear.weight"],
    "shufflenetv2": ["layer1.0.conv5.weight", "layer1.1.conv3.weight", "conv2.weight", "bn2.weight",
                     "linear.weight"],
    "resnet50": ["conv1.weight", "layer1.0.shortcut.0.weight", "layer4.2.conv3.weight", "linear.weight"],
}


@pytest.mark.parametrize("name", sorted(REFERENCE_KEYS))
def test_reference_checkpoint_loads(registry, name, tmp_path):
    teacher = build(registry, name)
    state = teacher.state_dict()
    for key in REFERENCE_KEYS[name]:
        assert key in state, (name, key)
    # no extra per-module keys: only parameters and BN buffers, as in the reference
    assert all(k.rsplit(".", 1)[1] in {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
               for k in state)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": state, "epoch": 240, "accuracy": 0.0}, path)
    torch.manual_seed(123)
    fresh = registry.model(name).make(100, CIFAR)
    load_checkpoint(fresh, str(path), f"teacher {name!r}")
    x = torch.randn(2, *CIFAR)
    teacher.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(teacher(x), fresh(x))


def test_mismatching_checkpoint_names_the_key(registry, tmp_path):
    net = build(registry, "resnet8x4")
    state = net.state_dict()
    renamed = dict(state)
    renamed["layer1.0.conv_one.weight"] = renamed.pop("layer1.0.conv1.weight")
    path = tmp_path / "bad.pth"
    torch.save({"model": renamed}, path)
    with pytest.raises(KdbenchError, match=r"missing key 'layer1\.0\.conv1\.weight'"):
        load_checkpoint(build(registry, "resnet8x4"), str(path), "teacher")
    # a checkpoint of another architecture: first differing shape is named
    torch.save({"model": build(registry, "resnet32x4").state_dict()}, path)
    with pytest.raises(KdbenchError, match=r"missing key|'conv1\.weight' has shape"):
        load_checkpoint(build(registry, "resnet8"), str(path), "teacher")
    # wrong number of classes: the fc shape is named
    torch.save({"model": build(registry, "resnet8x4", num_classes=10).state_dict()}, path)
    with pytest.raises(KdbenchError, match=r"'fc\.weight' has shape \(10, 256\)"):
        load_checkpoint(net, str(path), "teacher")


def test_vgg_takes_64x64_like_the_reference(registry):
    net = build(registry, "vgg8", shape=(3, 64, 64))
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 100)
