"""Small 1-D CNNs for sequence data such as MNIST-1D.

``depth`` conv layers (kernel 5, BN, ReLU) of ``width`` channels in two stages; each stage ends
with a stride-2 conv, so the two stages of any depth have the same lengths (L/2, L/4) and
teacher/student feature maps line up. The classifier reads the flattened last stage.
"""
from torch import nn

from kdbench.contracts import Model, Tap
from kdbench.errors import KdbenchError


class CNN1d(nn.Module):
    def __init__(self, num_classes: int, input_shape, width: int = 32, depth: int = 4):
        super().__init__()
        if len(input_shape) != 2:
            raise KdbenchError(f"cnn1d takes (channels, length) inputs, not {tuple(input_shape)}")
        if depth < 2 or depth % 2:
            raise KdbenchError(f"cnn1d depth must be even and >= 2, got {depth}")
        channels, length = input_shape
        per_stage = depth // 2
        stages, c_in = [], channels
        for _ in range(2):
            layers = []
            for i in range(per_stage):
                stride = 2 if i == per_stage - 1 else 1
                layers += [nn.Conv1d(c_in, width, 5, stride, 2, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
                c_in = width
            stages.append(nn.Sequential(*layers))
        self.stage1, self.stage2 = stages
        self.flatten = nn.Flatten()
        out_len = (((length + 1) // 2) + 1) // 2
        self.fc = nn.Linear(width * out_len, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.stage2(self.stage1(x))))


def _taps(net: CNN1d) -> dict:
    last = len(net.stage1) - 1  # each stage ends with its ReLU
    return {
        "stage1": Tap("stage1"),
        "stage2": Tap("stage2"),
        "stage1_pre": Tap(f"stage1.{last}", input=True),
        "stage2_pre": Tap(f"stage2.{last}", input=True),
        "pool": Tap("fc", input=True),
    }


def _variant(width: int, depth: int) -> Model:
    return Model(
        name=f"cnn1d_{depth}x{width}",
        build=CNN1d,
        kwargs={"width": width, "depth": depth},
        taps=_taps,
        description=f"1-D CNN, {depth} conv layers x {width} channels in 2 stages",
    )


MODELS = [_variant(w, d) for d, w in [(4, 32), (2, 16), (2, 8), (4, 16), (6, 64)]]
