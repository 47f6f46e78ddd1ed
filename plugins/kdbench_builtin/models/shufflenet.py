"""ShuffleNetV1 (groups 3) and ShuffleNetV2 (1x) for CIFAR with the shapes and state-dict keys of
the RepDistiller reference (``models/ShuffleNetv1.py``, ``models/ShuffleNetv2.py``; registered
there as ``ShuffleV1``/``ShuffleV2``). Stem is a 1x1 conv (no downsampling), classifier ``linear``.

The reference applies ReLUs functionally; here they are parameter-free modules (same state dict)
so the pre-activation taps are module inputs. In ShuffleNetV2's basic block the reference's
pre-activation is ``cat([x1, bn3(...)])``; ``x1`` is a slice of the block input, which is always
non-negative (every block output is ReLU'd or a shuffle of ReLU'd channels), so
``relu(cat([x1, pre]))`` equals the reference's ``cat([x1, relu(pre)])`` and the input of that
ReLU is exactly the reference's pre-activation.
"""
import torch
from torch import nn

from kdbench.contracts import Model

from ._common import cifar_only
from .resnet_cifar import three_stage_taps


class ShuffleBlock(nn.Module):
    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        g = self.groups
        return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


# --------------------------------------------------------------------------- V1


class BottleneckV1(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = c_out // 4
        g = 1 if c_in == 24 else groups
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU(inplace=True)
        self.shuffle1 = ShuffleBlock(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(mid, c_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, 2, 1)) if stride == 2 else nn.Sequential()
        self.out_relu = nn.ReLU()

    def forward(self, x):
        out = self.shuffle1(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return self.out_relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes: int, input_shape, out_planes=(240, 480, 960), blocks=(4, 8, 4),
                 groups: int = 3, name: str = "shufflenetv1"):
        super().__init__()
        cifar_only(name, input_shape)
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=True)
        c_in = 24
        for i, (planes, n) in enumerate(zip(out_planes, blocks), 1):
            layers = []
            for j in range(n):
                cat = c_in if j == 0 else 0  # the stride-2 block concatenates its pooled input
                layers.append(BottleneckV1(c_in, planes - cat, 2 if j == 0 else 1, groups))
                c_in = planes
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.avgpool = nn.AvgPool2d(4)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.avgpool(out).flatten(1))


# --------------------------------------------------------------------------- V2


class SplitBlock(nn.Module):
    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio

    def forward(self, x):
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class BasicBlockV2(nn.Module):
    def __init__(self, channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.out_relu = nn.ReLU()
        self.shuffle = ShuffleBlock()

    def forward(self, x):
        x1, x2 = self.split(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x2)))))
        pre = self.bn3(self.conv3(out))
        return self.shuffle(self.out_relu(torch.cat([x1, pre], 1)))  # x1 >= 0: see module doc


class DownBlockV2(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = c_out // 2
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.shuffle = ShuffleBlock()

    def forward(self, x):
        left = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(self.relu(self.bn3(self.conv3(x)))))
        right = self.relu(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


V2_SIZES = {
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2: ((224, 488, 976, 2048), (3, 7, 3)),
}


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int, input_shape, size: float = 1, name: str = "shufflenetv2"):
        super().__init__()
        cifar_only(name, input_shape)
        channels, blocks = V2_SIZES[size]
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=True)
        c_in = 24
        for i in range(3):
            layers = [DownBlockV2(c_in, channels[i])] + [BasicBlockV2(channels[i]) for _ in range(blocks[i])]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            c_in = channels[i]
        self.conv2 = nn.Conv2d(channels[2], channels[3], 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(channels[3])
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(4)
        self.linear = nn.Linear(channels[3], num_classes)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.linear(self.avgpool(out).flatten(1))


def shufflenet_taps(net: nn.Module) -> dict:
    return three_stage_taps(net, "linear")


MODELS = [
    Model(
        name="shufflenetv1",
        build=ShuffleNetV1,
        taps=shufflenet_taps,
        description="ShuffleNetV1 (g=3, 240/480/960) for CIFAR (RepDistiller's ShuffleV1)",
    ),
    Model(
        name="shufflenetv2",
        build=ShuffleNetV2,
        taps=shufflenet_taps,
        description="ShuffleNetV2 1x (116/232/464, 1024) for CIFAR (RepDistiller's ShuffleV2)",
    ),
]
