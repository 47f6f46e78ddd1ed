"""Wide ResNets (Zagoruyko & Komodakis 2016, depth 6n+4, pre-activation blocks) with the shapes
and state-dict keys of the RepDistiller reference (``models/wrn.py``): ``conv1``,
``block1..3.layer.N.{bn1,conv1,bn2,conv2,convShortcut}``, final ``bn1``, ``fc``.

Taps follow the reference's feature list: ``stem`` = conv1 output, ``stageI`` = block I output
(pre-activation network: no ReLU at the stage end), ``stageI_pre`` = the BN applied to it before
the next ReLU (input of block I+1's first ``relu1``, or of the final ``relu``), as the reference's
``preact`` features are.
"""

import torch
from torch import nn

from kdbench.contracts import Model, Tap

from ._common import cifar_only, he_init


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.equal = c_in == c_out
        self.convShortcut = None if self.equal else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        # identity blocks add the raw input; projecting blocks project the activated input
        return torch.add(x if self.equal else self.convShortcut(act), out)


class NetworkBlock(nn.Module):
    def __init__(self, n: int, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, num_classes: int, input_shape, depth: int = 16, widen: int = 1, name: str = "wrn"):
        super().__init__()
        cifar_only(name, input_shape)
        assert (depth - 4) % 6 == 0, depth
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(ch[3], num_classes)
        he_init(self, linear_std=None)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.avgpool(self.relu(self.bn1(out)))
        return self.fc(out.flatten(1))


TAPS = {
    "stem": Tap("conv1"),
    "stage1": Tap("block1"),
    "stage2": Tap("block2"),
    "stage3": Tap("block3"),
    "stage1_pre": Tap("block2.layer.0.relu1", input=True),
    "stage2_pre": Tap("block3.layer.0.relu1", input=True),
    "stage3_pre": Tap("relu", input=True),
    "pool": Tap("fc", input=True),
}

MODELS = [
    Model(
        name=f"wrn_{d}_{w}",
        build=WideResNet,
        kwargs={"depth": d, "widen": w, "name": f"wrn_{d}_{w}"},
        taps=TAPS,
        description=f"Wide ResNet-{d}-{w} for CIFAR (RepDistiller layout), 32x32 input",
    )
    for d, w in [(16, 1), (16, 2), (40, 1), (40, 2)]
]
