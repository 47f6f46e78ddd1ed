"""CIFAR ResNets (He et al. 2016, the 6n+2 family) with the shapes and state-dict keys of the
RepDistiller reference (``models/resnet.py``), so its teacher checkpoints load unchanged:
``conv1``/``bn1`` stem, ``layer1..3`` of BasicBlocks (``conv1``, ``bn1``, ``conv2``, ``bn2``,
``downsample.0/1``), ``fc``. resnet8x4/resnet32x4 are the 4x-wide variants.

The reference applies the block's final ReLU functionally; here it is a parameter-free
``out_relu`` module (same state dict) so a tap can read the pre-activation as its input.

As a frozen teacher on CUDA, a network of BasicBlocks has an inference form (``Model.fuse``,
:func:`fuse`): every convolution with its BatchNorm, ReLU and shortcut add one cuDNN call. Its
``stem``, ``stage1..3`` and ``pool`` taps are kept; ``stage*_pre`` (inside a block) are not.
"""
import torch
from torch import nn

from kdbench.contracts import Model, Tap
from kdbench.fusion import FusedResidual, fuse_stem

from ._common import cifar_only, kaiming_init


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.out_relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.out_relu(out + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.out_relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.out_relu(out + shortcut)


class ResNetCifar(nn.Module):
    def __init__(self, num_classes: int, input_shape, depth: int = 20,
                 widths=(16, 16, 32, 64), block: str = "basic", name: str = "resnet"):
        super().__init__()
        cifar_only(name, input_shape)
        block_cls = BasicBlock if block == "basic" else Bottleneck
        per = 6 if block == "basic" else 9
        assert (depth - 2) % per == 0, depth
        n = (depth - 2) // per
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block_cls, widths[1], n, 1)
        self.layer2 = self._make_layer(block_cls, widths[2], n, 2)
        self.layer3 = self._make_layer(block_cls, widths[3], n, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(widths[3] * block_cls.expansion, num_classes)
        kaiming_init(self)

    def _make_layer(self, block_cls, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block_cls.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block_cls.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block_cls.expansion),
            )
        layers = [block_cls(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block_cls.expansion
        layers += [block_cls(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def fuse(net: "ResNetCifar", dtype: torch.dtype) -> "ResNetCifar | None":
    """``Model.fuse``: ``net`` (an eval-mode copy) with its stem and every BasicBlock fused, in
    place (:class:`kdbench.fusion.FusedResidual`); the model's own forward still runs (``layer1``'s
    output is still ``stage1``, the stem's ReLU, now an Identity, still ``stem``). None for
    Bottleneck networks: nothing fused."""
    layers = (net.layer1, net.layer2, net.layer3)
    if not all(isinstance(block, BasicBlock) for layer in layers for block in layer):
        return None
    for layer in layers:
        for i, block in enumerate(layer):
            shortcut = (block.downsample[0], block.downsample[1]) if block.downsample is not None else None
            layer[i] = FusedResidual([(block.conv1, block.bn1), (block.conv2, block.bn2)], shortcut, dtype)
    fuse_stem(net, dtype=dtype)
    net.fc.to(dtype)
    return net


def three_stage_taps(net: nn.Module, classifier: str = "fc") -> dict:
    """stem (``relu``), stage1..3 (``layer1..3``) and their pre-activations (the input of the
    last block's ``out_relu``), pool (the classifier's input)."""
    taps = {"stem": Tap("relu")}
    for i in (1, 2, 3):
        taps[f"stage{i}"] = Tap(f"layer{i}")
    for i in (1, 2, 3):
        last = len(getattr(net, f"layer{i}")) - 1
        taps[f"stage{i}_pre"] = Tap(f"layer{i}.{last}.out_relu", input=True)
    taps["pool"] = Tap(classifier, input=True)
    return taps


def resnet_taps(net: nn.Module) -> dict:
    return three_stage_taps(net, "fc")


_VARIANTS = {
    # name: (depth, widths)
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}

MODELS = [
    Model(
        name=name,
        build=ResNetCifar,
        kwargs={"depth": depth, "widths": widths, "name": name},
        taps=resnet_taps,
        fuse=fuse,
        description=f"CIFAR ResNet-{depth}, widths {widths[1:]} (RepDistiller layout), 32x32 input",
    )
    for name, (depth, widths) in _VARIANTS.items()
]
