"""ImageNet-style ResNets (four stages, 64..512 planes) adapted to CIFAR with a 3x3 stride-1 stem
and no max-pool, with the shapes and state-dict keys of the RepDistiller reference
(``models/resnetv2.py``): ``conv1``, ``bn1``, ``layer1..4`` (blocks with ``conv1..3``, ``bn1..3``,
``shortcut.0/1``), ``linear``. The reference's teacher ``ResNet50`` is registered as ``resnet50`` (plus
resnet18/34 of the same file).

Final ReLUs are parameter-free modules (``out_relu``; the reference uses F.relu) so
``stageI_pre`` taps read the pre-activation as that module's input.

As a frozen teacher on CUDA (``Model.fuse``, :func:`fuse`) every block is a
:class:`kdbench.fusion.FusedResidual`: each convolution with its BatchNorm, ReLU and shortcut add
one cuDNN call. Its ``stem``, ``stage1..4`` and ``pool`` taps are kept; ``stage*_pre`` are not.
"""
import torch
from torch import nn

from kdbench.contracts import Model, Tap
from kdbench.fusion import FusedResidual, fuse_stem

from ._common import check_image, kaiming_init


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    if stride == 1 and c_in == c_out:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(c_in, planes, stride)
        self.out_relu = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.out_relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(c_in, planes * 4, stride)
        self.out_relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.out_relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_classes: int, input_shape, block: str = "bottleneck", blocks=(3, 4, 6, 3),
                 name: str = "resnet50"):
        super().__init__()
        check_image(name, input_shape, lambda h, w: h >= 32 and w >= 32, "at least 32x32")
        block_cls = Bottleneck if block == "bottleneck" else BasicBlock
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        c_in = 64
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)), 1):
            layers = []
            for j in range(n):
                layers.append(block_cls(c_in, planes, stride if j == 0 else 1))
                c_in = planes * block_cls.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * block_cls.expansion, num_classes)
        kaiming_init(self)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


def fuse(net: ResNet, dtype: torch.dtype) -> ResNet:
    """``Model.fuse``: the stem and every block of ``net`` (an eval-mode copy) fused in place."""
    for i in (1, 2, 3, 4):
        layer = getattr(net, f"layer{i}")
        for j, block in enumerate(layer):
            names = ("1", "2", "3") if isinstance(block, Bottleneck) else ("1", "2")
            path = [(getattr(block, "conv" + n), getattr(block, "bn" + n)) for n in names]
            shortcut = (block.shortcut[0], block.shortcut[1]) if len(block.shortcut) else None
            layer[j] = FusedResidual(path, shortcut, dtype)
    fuse_stem(net, dtype=dtype)
    net.linear.to(dtype)
    return net


def resnet_taps(net: nn.Module) -> dict:
    taps = {"stem": Tap("relu")}
    for i in (1, 2, 3, 4):
        taps[f"stage{i}"] = Tap(f"layer{i}")
    for i in (1, 2, 3, 4):
        last = len(getattr(net, f"layer{i}")) - 1
        taps[f"stage{i}_pre"] = Tap(f"layer{i}.{last}.out_relu", input=True)
    taps["pool"] = Tap("linear", input=True)
    return taps


def _model(name: str, block: str, blocks) -> Model:
    depth = name.lower().removeprefix("resnet")
    return Model(
        name=name,
        build=ResNet,
        kwargs={"block": block, "blocks": blocks, "name": name},
        taps=resnet_taps,
        fuse=fuse,
        description=f"ResNet-{depth} (ImageNet layout, 3x3 stem for CIFAR; RepDistiller resnetv2)",
    )


MODELS = [
    _model("resnet18", "basic", (2, 2, 2, 2)),
    _model("resnet34", "basic", (3, 4, 6, 3)),
    _model("resnet50", "bottleneck", (3, 4, 6, 3)),
]
