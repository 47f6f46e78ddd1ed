"""logits: the logit MSE against an independent computation."""
import pytest
import torch

from methods.kit import ce_np, method, npy, rnd, step_of


def test_logits_value_and_zero():
    z_s, z_t = rnd(3, 4), rnd(3, 4, grad=False, seed=7)
    y = torch.tensor([0, 3, 1])
    st = step_of("logits", z_s=z_s, z_t=z_t, y=y, weight=0.5, ncls=4)
    out = method("logits").loss(st)
    ref = sum((npy(z_s)[i, j] - npy(z_t)[i, j]) ** 2 for i in range(3) for j in range(4)) / 12
    assert out["logits"].item() == pytest.approx(0.5 * ref, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce_np(z_s, y), rel=1e-5)
    same = method("logits").loss(step_of("logits", z_s=z_s, z_t=z_s.detach().clone(), y=y, ncls=4))
    assert same["logits"].item() == 0.0
