"""``timm:NAME`` models (plugins/kdbench_builtin/models/timm_source.py) against a fake ``timm``.

timm is optional and is not installed in CI (it pulls torchvision), so these tests put a small
fake ``timm`` module in ``sys.modules``. It mirrors the parts of timm's API the source uses, as
read in huggingface/pytorch-image-models:

* ``timm/__init__.py``: top-level ``create_model``, ``list_models``, ``is_model``,
  ``get_pretrained_cfg``;
* ``timm/models/_factory.py: create_model(model_name, pretrained=False, ..., **kwargs)`` — raises
  ``RuntimeError('Unknown model (%s)')`` for an unknown name;
* ``timm/models/_registry.py: list_models(filter='')`` (fnmatch wildcard filter, sorted),
  ``is_model(name)`` (architecture part before the ``.tag``), ``get_pretrained_cfg(name)`` (a
  ``PretrainedCfg`` with ``input_size`` and ``fixed_input_size``);
* ``timm/models/_features.py: FeatureInfo`` — ``model.feature_info`` is a list of dicts with at
  least ``num_chs``, ``reduction`` (non-decreasing) and ``module`` (a ``named_modules()`` name),
  optionally ``hook_type`` ('forward' | 'forward_pre');
* ``timm/models/resnet.py: ResNet`` — stem ``conv1``/``bn1``/``act1`` with feature_info
  ``dict(num_chs=64, reduction=2, module='act1')``, stages ``layer1..4`` with
  ``dict(num_chs, reduction, module='layerN')``, head ``global_pool`` + ``fc`` from
  ``create_classifier`` (``fc`` is ``nn.Identity`` when ``num_classes=0``),
  ``get_classifier() -> self.fc``;
* ``timm/models/_efficientnet_builder.py: EfficientNetBuilder.__call__`` — a stem entry
  ``dict(module='bn1', num_chs, stage=0, reduction=2)`` only when the first block has stride 2,
  then ``dict(stage=stack_idx + 1, reduction, module='blocks.N' | 'blocks.N.M.conv_pw', ...)`` with
  ``hook_type='forward_pre'`` for the 'expansion' feature location; head ``classifier``.

The real check (timm 1.0.31 on CPU: resnet18, mobilenetv3_small_050, mobilenetv3_large_100,
convnext_atto, vit_tiny_patch16_224, densenet121) produced the same feature_info layouts.
"""
import fnmatch
import subprocess
import sys
import types

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from kdbench.core import plugins
from kdbench.cli import main
from kdbench.contracts import Model, Tap
from kdbench.errors import KdbenchError
from kdbench.core.taps import Tapped

# --------------------------------------------------------------------------- the fake timm


class FakeResNet(nn.Module):
    """timm/models/resnet.py: ResNet, three BasicBlock-free stages (a conv-bn-relu each)."""

    def __init__(self, num_classes=1000, in_chans=3, width=8, **_):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=width, reduction=2, module="act1")]
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        chs, reduction = width, 4
        for i, out in enumerate((width, 2 * width, 4 * width), start=1):
            stride = 1 if i == 1 else 2
            reduction *= stride
            self.add_module(f"layer{i}", nn.Sequential(
                nn.Conv2d(chs, out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()))
            self.feature_info.append(dict(num_chs=out, reduction=reduction, module=f"layer{i}"))
            chs = out
        self.num_features = chs
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(chs, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self, name_only=False):
        return "fc" if name_only else self.fc

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.global_pool(x))


class FakeEfficientNet(nn.Module):
    """timm/models/efficientnet.py with _efficientnet_builder.py's feature_info: ``stage`` keys,
    a ``bn1`` stem entry only when the first block has stride 2, and (feature_location
    'expansion') a ``forward_pre`` hook on a block's ``conv_pw``."""

    def __init__(self, num_classes=1000, in_chans=3, first_stride=2, **_):
        super().__init__()
        self.conv_stem = nn.Conv2d(in_chans, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.feature_info = []
        if first_stride > 1:
            self.feature_info.append(dict(module="bn1", num_chs=8, stage=0, reduction=2))
        block1 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=first_stride, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(nn.Sequential(block1), nn.Sequential(_InvertedResidual(8, 16)))
        r1 = 2 * first_stride
        self.feature_info.append(dict(stage=1, reduction=r1, module="blocks.0", num_chs=8))
        self.feature_info.append(dict(stage=2, reduction=2 * r1, module="blocks.1.0.conv_pw",
                                      hook_type="forward_pre", num_chs=8))
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(16, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self):
        return self.classifier

    def forward(self, x):
        return self.classifier(self.global_pool(self.blocks(self.bn1(self.conv_stem(x)))))


class _InvertedResidual(nn.Module):
    """timm/models/_efficientnet_blocks.py: InvertedResidual (conv_pw expands, conv_dw strides)."""

    def __init__(self, c_in, c_mid):
        super().__init__()
        self.conv_pw = nn.Conv2d(c_in, c_mid, 1)
        self.conv_dw = nn.Conv2d(c_mid, c_mid, 3, stride=2, padding=1, groups=c_mid)

    def forward(self, x):
        return self.conv_dw(self.conv_pw(x))


class FakePlain(nn.Module):
    """A timm model without ``feature_info``."""

    def __init__(self, num_classes=1000, in_chans=3, **_):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head = nn.Linear(4, num_classes)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.head(self.body(x))


class FakeViT(FakePlain):
    """timm/models/vision_transformer.py: built for one ``img_size`` (fixed_input_size=True)."""

    def __init__(self, num_classes=1000, in_chans=3, img_size=224, **_):
        super().__init__(num_classes, in_chans)
        self.img_size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)

    def forward(self, x):
        if tuple(x.shape[-2:]) != self.img_size:
            raise AssertionError(f"Input height ({x.shape[-2]}) doesn't match model ({self.img_size[0]}).")
        return super().forward(x)


ARCHS = {
    "tiny": FakeResNet,
    "fake_a": FakeResNet,
    "fake_b": FakeResNet,
    "effnet_s2": FakeEfficientNet,
    "effnet_s1": lambda **kw: FakeEfficientNet(first_stride=1, **kw),
    "plain": FakePlain,
    "vit_fake": FakeViT,
}


def make_fake_timm():
    timm = types.ModuleType("timm")
    timm.calls = []

    def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                    include_tags=None):
        names = sorted(ARCHS)
        return sorted(fnmatch.filter(names, filter)) if filter else names

    def is_model(model_name):
        return model_name.split(".", 1)[0] in ARCHS

    def get_pretrained_cfg(model_name, allow_unregistered=True):
        fixed = model_name.startswith("vit_")
        return types.SimpleNamespace(input_size=(3, 224, 224), fixed_input_size=fixed)

    def create_model(model_name, pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                     checkpoint_path="", **kwargs):
        timm.calls.append(dict(model_name=model_name, pretrained=pretrained, **kwargs))
        if pretrained:
            raise AssertionError("the fake has no weights: kdbench must never ask for them")
        if not is_model(model_name):
            raise RuntimeError("Unknown model (%s)" % model_name)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return ARCHS[model_name.split(".", 1)[0]](**kwargs)

    timm.list_models, timm.is_model = list_models, is_model
    timm.get_pretrained_cfg, timm.create_model = get_pretrained_cfg, create_model
    timm.__version__ = "0.0.fake"
    return timm


@pytest.fixture
def fake_timm(monkeypatch, env):
    timm = make_fake_timm()
    monkeypatch.setitem(sys.modules, "timm", timm)
    plugins.reset()
    return timm


@pytest.fixture
def no_timm(monkeypatch, env):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    plugins.reset()


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(KdbenchError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def run_tapped(model: Model, net: nn.Module, shape=(3, 32, 32)):
    taps = model.taps_of(net)
    tapped = Tapped(net, taps, list(taps), model.name).eval()
    with torch.no_grad():
        out = tapped(torch.randn(2, *shape))
    tapped.remove()
    return taps, out


# --------------------------------------------------------------------------- tests


def test_loading_kdbench_does_not_import_timm():
    code = ("import sys; from kdbench.core import plugins; reg = plugins.load(); "
            "assert 'timm' in reg.model_sources, reg.model_sources; "
            "assert 'timm' not in sys.modules, 'timm imported at load'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_registry_resolves_timm_name_once(fake_timm):
    reg = plugins.registry()
    assert not reg.failures, reg.failures
    entry = reg.entry("models", "timm:tiny")
    assert isinstance(entry.obj, Model) and entry.obj.name == "timm:tiny"
    assert entry.plugin == "builtin-models" and entry.source == reg.model_sources["timm"].source
    assert reg.models["timm:tiny"] is entry and reg.entry("models", "timm:tiny") is entry
    assert fake_timm.calls == []  # resolving checks the name; nothing is built yet


def test_build_is_random_init_with_dataset_channels_and_classes(fake_timm):
    model = plugins.registry().model("timm:tiny")
    net = model.make(7, (3, 32, 32))
    assert fake_timm.calls == [dict(model_name="tiny", pretrained=False, num_classes=7, in_chans=3)]
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    gray = model.make(5, (1, 28, 28))
    assert fake_timm.calls[-1] == dict(model_name="tiny", pretrained=False, num_classes=5, in_chans=1)
    assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    msg = one_line_error(model.make, 7, (3, 32, 32), pretrained=True)
    assert "pretrained" in msg and len(fake_timm.calls) == 2


def test_resnet_style_taps_resolve_through_hooks(fake_timm):
    model = plugins.registry().model("timm:tiny")
    net = model.make(10, (3, 32, 32))
    taps, out = run_tapped(model, net)
    assert taps == {"stem": Tap("act1"), "stage1": Tap("layer1"), "stage2": Tap("layer2"),
                    "stage3": Tap("layer3"), "pool": Tap("fc", input=True)}
    shapes = {k: tuple(v.shape) for k, v in out.feats.items()}
    assert shapes == {"stem": (2, 8, 16, 16), "stage1": (2, 8, 8, 8), "stage2": (2, 16, 4, 4),
                      "stage3": (2, 32, 2, 2), "pool": (2, 32)}
    assert out.logits.shape == (2, 10)
    # pool is the classifier's input: the global average of the last stage
    torch.testing.assert_close(out.feats["pool"], out.feats["stage3"].mean((2, 3)))
    torch.testing.assert_close(out.logits, net.fc(out.feats["pool"]))


def test_efficientnet_style_taps_follow_stage_keys_and_hook_type(fake_timm):
    reg = plugins.registry()
    model = reg.model("timm:effnet_s2")
    net = model.make(10, (3, 32, 32))
    taps, out = run_tapped(model, net)
    assert taps == {"stem": Tap("bn1"), "stage1": Tap("blocks.0"),
                    "stage2": Tap("blocks.1.0.conv_pw", input=True), "pool": Tap("classifier", input=True)}
    assert tuple(out.feats["stem"].shape) == (2, 8, 16, 16)
    assert tuple(out.feats["stage2"].shape) == (2, 8, 8, 8)  # conv_pw's input, not its output
    assert tuple(out.feats["pool"].shape) == (2, 16)
    # first block without a stride: no stem entry, the first stage is at reduction 2
    model = reg.model("timm:effnet_s1")
    taps, out = run_tapped(model, model.make(10, (3, 32, 32)))
    assert "stem" not in taps and taps["stage1"] == Tap("blocks.0")
    assert tuple(out.feats["stage1"].shape) == (2, 8, 16, 16)


def test_without_feature_info_only_pool_and_identity_classifier_has_no_pool(fake_timm):
    reg = plugins.registry()
    model = reg.model("timm:plain")
    net = model.make(3, (3, 16, 16))
    taps, out = run_tapped(model, net, (3, 16, 16))
    assert taps == {"pool": Tap("head", input=True)} and tuple(out.feats["pool"].shape) == (2, 4)
    headless = reg.model("timm:tiny").make(0, (3, 32, 32))  # num_classes=0: fc is nn.Identity
    assert "pool" not in reg.model("timm:tiny").taps_of(headless)


def test_fixed_input_size_models_are_built_for_the_dataset_size(fake_timm):
    model = plugins.registry().model("timm:vit_fake")
    net = model.make(10, (3, 32, 32))
    assert fake_timm.calls[-1]["img_size"] == (32, 32)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    model.make(10, (3, 224, 224))
    assert "img_size" not in fake_timm.calls[-1]  # already its size
    model.make(10, (3, 32, 32), img_size=64)
    assert fake_timm.calls[-1]["img_size"] == 64  # the caller's choice wins


def test_missing_package_is_one_line_saying_pip_install(no_timm):
    reg = plugins.registry()
    assert "timm" in reg.model_sources and not reg.failures
    msg = one_line_error(reg.entry, "models", "timm:resnet18")
    assert "pip install timm" in msg, msg
    assert "timm:resnet18" not in reg.models


def test_unknown_name_is_one_line_with_close_matches(fake_timm):
    reg = plugins.registry()
    msg = one_line_error(reg.entry, "models", "timm:tinny")
    assert msg.startswith("timm has no model 'tinny'") and "tiny" in msg, msg
    msg = one_line_error(reg.entry, "models", "timm:effnet")
    assert "effnet_s1" in msg and "effnet_s2" in msg, msg
    msg = one_line_error(reg.entry, "models", "timm:hf-hub:someone/model")
    assert "nothing is downloaded" in msg
    assert fake_timm.calls == []


def test_non_image_input_shape_is_one_line(fake_timm):
    model = plugins.registry().model("timm:tiny")
    for shape in [(40,), (1, 40)]:
        msg = one_line_error(model.make, 10, shape)
        assert "timm:tiny" in msg and "(C, H, W)" in msg and str(shape) in msg, msg
    assert fake_timm.calls == []

    def broken(*args, **kwargs):
        raise TypeError("bad kw\nsecond line")

    fake_timm.create_model = broken
    msg = one_line_error(model.make, 10, (3, 32, 32))
    assert msg.endswith("TypeError: bad kw"), msg


def test_cli_lists_the_source_and_rejects_an_unknown_timm_model(fake_timm):
    runner = CliRunner()
    listed = runner.invoke(main, ["list", "models"])
    assert listed.exit_code == 0, listed.output
    (line,) = [l for l in listed.output.splitlines() if l.strip().startswith("timm:NAME")]
    assert "timm" in line and "kdbench" in line
    result = runner.invoke(main, ["run", "--student", "timm:nope", "--epochs", "1", "--device", "cpu"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: timm has no model 'nope'"), result.output
    assert "Traceback" not in result.output


def test_timm_whose_own_import_fails_is_not_reported_as_missing(monkeypatch, env):
    # timm/layers/create_norm.py imports torchvision at module level: a missing torchvision
    # must be named, not reported as a missing timm
    def broken_import(name, *args, _real=__import__, **kwargs):
        if name == "timm":
            raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
        return _real(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "timm", raising=False)
    monkeypatch.setattr("builtins.__import__", broken_import)
    plugins.reset()
    msg = one_line_error(plugins.registry().entry, "models", "timm:resnet18")
    assert "torchvision" in msg and "not installed" not in msg, msg
