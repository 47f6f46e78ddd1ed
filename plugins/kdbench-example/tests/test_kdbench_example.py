"""The package's own tests: kdbench's conformance kit, plus the formula on hand-made logits."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kdbench.contracts import Outputs, Step
from kdbench.testing import check_method

import kdbench_example


def test_conformance():
    check_method("wsld")


def test_weights_follow_the_paper():
    y = torch.tensor([0, 0])
    z_t = torch.tensor([[3.0, 0.0], [3.0, 0.0]])  # the teacher fits both samples
    z_s = torch.tensor([[-3.0, 0.0], [6.0, 0.0]])  # the student misses the first, nails the second
    w = kdbench_example.sample_weights(z_s, z_t, y)
    ce_s = F.cross_entropy(z_s, y, reduction="none")
    ce_t = F.cross_entropy(z_t, y, reduction="none")
    assert torch.allclose(w, 1 - torch.exp(-ce_s / ce_t))
    assert w[0] > 0.99 and w[1] < 0.5  # soft labels matter where the student is worse


def test_loss_reduces_to_ce_plus_weighted_kd():
    torch.manual_seed(0)
    z_s = torch.randn(8, 5, requires_grad=True)
    z_t, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    hp = SimpleNamespace(T=2.0, alpha=1.5)
    step = Step(x=torch.zeros(8, 1), y=y, student=Outputs(z_s), teacher=Outputs(z_t), hp=hp, modules=None,
                epoch=0, epochs=1, stage="main")
    terms = kdbench_example.loss(step)
    kl = F.kl_div(F.log_softmax(z_s / 2, 1), F.softmax(z_t / 2, 1), reduction="none").sum(1) * 4
    expected = 1.5 * (kdbench_example.sample_weights(z_s, z_t, y) * kl).mean()
    assert terms["wsl"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(z_s, y).item())
