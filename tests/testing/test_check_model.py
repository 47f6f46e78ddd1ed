"""check_model passes good models and names what to fix in bad ones."""
import pytest
from torch import nn

from kdbench.contracts import Model, Tap
from kdbench.errors import KdbenchError
from kdbench.testing import check_model


class Net(nn.Module):
    def __init__(self, num_classes, input_shape, extra=False, logits=None):
        super().__init__()
        if len(input_shape) != 2:
            raise KdbenchError(f"1-D only, not {input_shape}")
        channels, length = input_shape
        self.stage1 = nn.Sequential(nn.Conv1d(channels, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8 * length, logits or num_classes)
        self.spare = nn.Linear(3, 3) if extra else None

    def forward(self, x):
        return self.fc(self.stage1(x).flatten(1))


TAPS = {"stage1": "stage1", "pool": Tap("fc", input=True)}


def test_good_model_passes(env):
    check_model(Model("kdtest_net", Net, taps=TAPS))  # refuses (3, 32, 32) with KdbenchError: fine
    check_model(Model("kdtest_net", Net, taps=TAPS), input_shapes=[(1, 40), (2, 17)])


@pytest.mark.parametrize("model, pattern", [
    (Model("kdtest_net", Net, taps={**TAPS, "stage2": "stage9"}), r"tap 'stage2' names module 'stage9'"),
    (Model("kdtest_net", Net, taps={**TAPS, "layer1": "stage1"}), r"tap names \['layer1'\] are not conventional"),
    (Model("kdtest_net", Net, taps={**TAPS, "stage3": "stage1"}), r"numbered 1..N without gaps"),
    (Model("kdtest_net", Net, taps={"stage1": "stage1"}), r"has no tap \['pool'\]"),
    (Model("kdtest_net", Net, taps=TAPS, kwargs={"extra": True}), r"parameters \['spare.weight', 'spare.bias'\] .* get no gradient"),
    (Model("kdtest_net", Net, taps=TAPS, kwargs={"logits": 7}), r"logits of shape \[batch, num_classes\] = \(4, 10\)"),
    (Model("kdtest_net", lambda n, s: nn.Linear(s[-1], n)), r"build for input .* raised RuntimeError|raise KdbenchError|has no tap"),
])
def test_bad_models(env, fails, model, pattern):
    fails(pattern, check_model, model, input_shapes=[(1, 40)])


def test_model_that_crashes_on_other_shapes(env, fails):
    def build(num_classes, shape):
        channels, length = shape  # ValueError on 3-D shapes instead of a KdbenchError
        return Net(num_classes, shape)

    fails(r"build for input \(3, 32, 32\) raised ValueError.*raise KdbenchError", check_model, Model("kdtest_net", build, taps=TAPS))


def fuse_stage(net, dtype):
    """A fuse of the kit's 1-D net: the stage's convolution and ReLU kept, the classifier in dtype."""
    net.fc.to(dtype)
    return net


def fuse_without_relu(net, dtype):
    net.stage1[1] = nn.Identity()  # the stage then reads negative values: not the original's
    return net


def test_a_models_fuse_is_checked_against_the_original(env, fails):
    check_model(Model("kdtest_net", Net, taps=TAPS, fuse=fuse_stage), input_shapes=[(1, 40)])
    check_model(Model("kdtest_net", Net, taps=TAPS, fuse=lambda net, dtype: None), input_shapes=[(1, 40)])
    fails(r"fuse for input \(1, 40\): its fused form's logits is .* off the original's", check_model,
          Model("kdtest_net", Net, taps=TAPS, fuse=fuse_without_relu), input_shapes=[(1, 40)])
    fails(r"fuse for input \(1, 40\) raised ZeroDivisionError", check_model,
          Model("kdtest_net", Net, taps=TAPS, fuse=lambda net, dtype: 1 / 0), input_shapes=[(1, 40)])
