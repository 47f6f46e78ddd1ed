"""nst: MMD² of the channels' spatial patterns against explicit kernel sums."""
import math

import numpy as np
import pytest
import torch

from methods.kit import method, npy, pool_np, rnd, step_of


def nst_np(fs, ft, kernel, c=0.0, d=2, sigma=1.0):
    fs, ft = npy(fs), npy(ft)
    if fs.shape[2:] != ft.shape[2:]:
        if np.prod(fs.shape[2:]) > np.prod(ft.shape[2:]):
            fs = pool_np(torch.tensor(fs), ft.shape[2:])
        else:
            ft = pool_np(torch.tensor(ft), fs.shape[2:])
    B = fs.shape[0]
    S = fs.reshape(B, fs.shape[1], -1)
    T = ft.reshape(B, ft.shape[1], -1)
    S = S / np.linalg.norm(S, axis=2, keepdims=True)
    T = T / np.linalg.norm(T, axis=2, keepdims=True)

    def k(x, y):
        if kernel == "linear":
            return float(x @ y)
        if kernel == "poly":
            return float(x @ y + c) ** d
        return math.exp(-float(((x - y) ** 2).sum()) / (2 * sigma**2))

    def mean_k(A, Bm):
        return np.mean([k(A[b, i], Bm[b, j]) for b in range(B) for i in range(A.shape[1]) for j in range(Bm.shape[1])])

    return mean_k(T, T) + mean_k(S, S) - 2 * mean_k(S, T)


@pytest.mark.parametrize("kernel,extra", [("poly", {}), ("poly", {"c": 1.0, "d": 3}), ("linear", {}),
                                          ("gaussian", {"sigma": 0.7})])
@pytest.mark.parametrize("shapes", [((2, 3, 4), (2, 5, 8)), ((2, 3, 2, 2), (2, 4, 4, 4)), ((1, 2, 6), (1, 3, 6))])
def test_nst_value(kernel, extra, shapes):
    s1, t1 = rnd(*shapes[0]), rnd(*shapes[1], grad=False, seed=3)
    s2, t2 = rnd(*shapes[0], seed=11), rnd(*shapes[1], grad=False, seed=12)
    st = step_of("nst", {"stage1": s1, "stage2": s2}, {"stage1": t1, "stage2": t2}, kernel=kernel, **extra)
    out = method("nst").loss(st)
    ref = nst_np(s1, t1, kernel, **extra) + nst_np(s2, t2, kernel, **extra)
    assert out["nst"].item() == pytest.approx(50 * ref, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kernel", ["poly", "linear", "gaussian"])
def test_nst_zero_when_equal(kernel):
    f = rnd(3, 4, 6).relu().detach()
    st = step_of("nst", {"stage1": f}, {"stage1": f.clone()}, kernel=kernel)
    assert abs(method("nst").loss(st)["nst"].item()) < 1e-4
