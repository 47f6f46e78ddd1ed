"""MobileNetV2 for CIFAR as used by RepDistiller (``models/mobilenetv2.py``, from "Knowledge
Distillation via Route Constrained Optimization"): expansion 6, width multiplier 0.5 — the
reference's ``mobile_half``, registered in its model dict as ``MobileNetV2``; here
``mobilenetv2``. State-dict keys as in the reference: ``conv1.{0,1}``,
``blocks.I.J.conv.{0..7}``, ``conv2.{0,1}``, ``classifier.0``.

Taps follow the reference's feature list: ``stem`` = conv1, ``stage1..4`` = outputs of blocks 1,
2, 4 and 6 (16, 8, 4 and 2 pixels wide at 32x32 input). Inverted-residual blocks end
linearly (no activation), so ``stageI_pre`` is the same tensor as ``stageI`` (the reference's
``get_bn_before_relu`` also points at those blocks' last BN). ``pool`` = the classifier input.
"""

from torch import nn

from kdbench.contracts import Model, Tap

from ._common import check_image, he_init

# expansion t, channels c, repeats n, first stride s
SETTING = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
           (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]


def conv_bn_relu(c_in: int, c_out: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, input_shape, expand: int = 6, width: float = 0.5,
                 name: str = "mobilenetv2"):
        super().__init__()
        check_image(name, input_shape, lambda h, w: h == w and h % 32 == 0, "square, multiple-of-32")
        c = int(32 * width)
        self.conv1 = conv_bn_relu(3, c, 3, 2)
        self.blocks = nn.ModuleList()
        for t, ch, n, s in SETTING:
            c_out = int(ch * width)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(c, c_out, s if i == 0 else 1, t or expand))
                c = c_out
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = conv_bn_relu(c, self.last_channel, 1, 1)
        self.avgpool = nn.AvgPool2d(input_shape[1] // 16, ceil_mode=True)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        he_init(self)

    def forward(self, x):
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        out = self.avgpool(self.conv2(out))
        return self.classifier(out.flatten(1))


_STAGE_BLOCKS = (1, 2, 4, 6)
TAPS = {
    "stem": Tap("conv1"),
    **{f"stage{i + 1}": Tap(f"blocks.{b}") for i, b in enumerate(_STAGE_BLOCKS)},
    **{f"stage{i + 1}_pre": Tap(f"blocks.{b}") for i, b in enumerate(_STAGE_BLOCKS)},
    "pool": Tap("classifier", input=True),
}

MODELS = [
    Model(
        name="mobilenetv2",
        build=MobileNetV2,
        kwargs={"expand": 6, "width": 0.5},
        taps=TAPS,
        description="MobileNetV2 for CIFAR, expansion 6, width 0.5 (RepDistiller's MobileNetV2 / mobile_half)",
    )
]
