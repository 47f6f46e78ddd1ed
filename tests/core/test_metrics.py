"""Metrics against values computed by hand."""
import pytest
import torch
from torch import nn

from kdbench.core import metrics


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4],   # label 1: top-1 hit
                           [0.9, 0.1, 0.8, 0.7, 0.6, 0.5],   # label 5: rank 5 -> top-5 hit
                           [0.9, 0.1, 0.8, 0.7, 0.6, 0.5]])  # label 1: rank 6 -> miss
    y = torch.tensor([1, 5, 1])
    assert metrics.topk_correct(logits, y).tolist() == [1, 2]


def test_convergence_by_hand():
    curve = [0.50, 0.80, 0.86, 0.95, 0.90]   # final 0.90: 90 % → 0.81, 95 % → 0.855, 99 % → 0.891
    seconds = [1.0, 2.0, 3.0, 4.0, 5.0]
    m = metrics.convergence(curve, seconds)
    assert (m["epochs_to_90"], m["epochs_to_95"], m["epochs_to_99"]) == (3, 3, 4)
    assert (m["seconds_to_90"], m["seconds_to_99"]) == (3.0, 4.0)
    assert m["auc"] == pytest.approx((0.50 + 0.80 + 0.86 + 0.95 + 0.90) / 5)


def test_gap_closed():
    assert metrics.gap_closed(0.95, 0.90, 0.98) == pytest.approx(0.625)
    assert metrics.gap_closed(0.95, 0.90, 0.90) is None


def test_flops_and_params_of_a_small_conv_net_by_hand():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),          # out 8×8×8: MACs 8·8·8·(3·3·3) = 13824
        nn.ReLU(),
        nn.Conv2d(8, 4, 1, stride=2),           # out 4×4×4: MACs 4·4·4·8 = 512
        nn.Flatten(),
        nn.Linear(64, 10),                      # MACs 640
    )
    assert metrics.flops_per_sample(net, (3, 8, 8)) == 2 * (13824 + 512 + 640)
    assert metrics.count_params(net) == (3 * 9 * 8 + 8) + (8 * 4 + 4) + (64 * 10 + 10)
    assert metrics.count_params(None) == 0
