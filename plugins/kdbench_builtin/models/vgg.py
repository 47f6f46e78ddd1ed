"""CIFAR VGGs with batch norm and a single linear classifier, with the shapes and state-dict keys
of the RepDistiller reference (``models/vgg.py``, the ``*_bn`` builders that its ``vgg8`` …
``vgg19`` names map to): ``block0..4`` Sequentials of (conv, BN, ReLU) with the last ReLU left
out, ``classifier``. Conv layers have biases, as in the reference.

The reference applies each block's final ReLU functionally; here they are parameter-free
``relu0..relu4`` modules (same state dict). Taps: ``stem`` = relu0 output, ``stage1..4`` =
relu1..relu4 outputs, ``stageI_pre`` = their inputs (the block's last BN), ``pool`` = the
classifier input. 32x32 inputs (64x64 too: the reference then pools once more before block4).

As a frozen teacher on CUDA (``Model.fuse``, :func:`fuse`) each block's convolutions are fused with
their BatchNorm and ReLU, one cuDNN call each; a block's last convolution keeps its BatchNorm
folded but not the ReLU (``reluI``'s input is ``stageI_pre``), so every tap is kept.
"""

import torch
from torch import nn

from kdbench.contracts import Model, Tap
from kdbench.fusion import FusedConv

from ._common import check_image, he_init

CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(widths, c_in: int) -> nn.Sequential:
    layers = []
    for w in widths:
        layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c_in = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, num_classes: int, input_shape, cfg=CFG["vgg13"], name: str = "vgg"):
        super().__init__()
        check_image(name, input_shape, lambda h, w: h == w and h in (32, 64), "32x32 or 64x64")
        self.pool_extra = input_shape[1] == 64
        c_in = 3
        for i, widths in enumerate(cfg):
            setattr(self, f"block{i}", _block(widths, c_in))
            setattr(self, f"relu{i}", nn.ReLU())
            c_in = widths[-1]
        for i in range(4):
            setattr(self, f"pool{i}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        he_init(self)

    def forward(self, x):
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if self.pool_extra:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.pool4(x).flatten(1))


def fuse(net: VGG, dtype: torch.dtype) -> VGG:
    """``Model.fuse``: every (conv, BN, ReLU) of ``net``'s blocks (an eval-mode copy) fused in
    place; a block's last (conv, BN) folded with no ReLU, which its ``reluI`` module applies."""
    for i in range(5):
        layers = list(getattr(net, f"block{i}"))
        fused = []
        for j in range(0, len(layers), 3):
            conv, bn = layers[j], layers[j + 1]
            fused.append(FusedConv(conv, bn, relu=j + 2 < len(layers), dtype=dtype))
        setattr(net, f"block{i}", nn.Sequential(*fused))
    net.classifier.to(dtype)
    return net


TAPS = {
    "stem": Tap("relu0"),
    **{f"stage{i}": Tap(f"relu{i}") for i in range(1, 5)},
    **{f"stage{i}_pre": Tap(f"relu{i}", input=True) for i in range(1, 5)},
    "pool": Tap("classifier", input=True),
}

MODELS = [
    Model(
        name=name,
        build=VGG,
        kwargs={"cfg": cfg, "name": name},
        taps=TAPS,
        fuse=fuse,
        description=f"{name.upper()} with BN for CIFAR (RepDistiller layout, one linear classifier)",
    )
    for name, cfg in CFG.items()
]
