"""dist: inter- and intra-class Pearson terms against numpy's corrcoef."""
import numpy as np
import pytest
import torch

from methods.kit import method, npy, rnd, softmax_np, step_of


def test_dist_value_with_corrcoef():
    zs, zt = rnd(5, 7), rnd(5, 7, grad=False, seed=2) * 3
    out = method("dist").loss(step_of("dist", z_s=zs, z_t=zt, ncls=7, beta=2.0, gamma=1.5))
    ys, yt = softmax_np(npy(zs) / 4), softmax_np(npy(zt) / 4)
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(5)])
    intra = 1 - np.mean([np.corrcoef(ys[:, c], yt[:, c])[0, 1] for c in range(7)])
    assert out["inter"].item() == pytest.approx(2.0 * 16 * inter, rel=1e-4)
    assert out["intra"].item() == pytest.approx(1.5 * 16 * intra, rel=1e-4)


def test_dist_zero_and_batch_of_one():
    z = rnd(4, 6)
    out = method("dist").loss(step_of("dist", z_s=z, z_t=z.detach().clone(), ncls=6))
    assert abs(out["inter"].item()) < 1e-4 and abs(out["intra"].item()) < 1e-4
    one = method("dist").loss(step_of("dist", z_s=rnd(1, 6), z_t=rnd(1, 6, seed=1), ncls=6, y=torch.tensor([2])))
    assert one["intra"].item() == 0.0 and one["inter"].item() > 0
