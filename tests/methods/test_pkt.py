"""pkt: the conditional-probability KL against numpy."""
import math

import numpy as np
import pytest

from methods.kit import method, npy, rnd, step_of


def pkt_np(fs, ft, eps=1e-7):
    def P(f):
        f = npy(f).reshape(len(f), -1)
        f = f / (np.linalg.norm(f, axis=1, keepdims=True))
        s = (f @ f.T + 1) / 2
        return s / s.sum(1, keepdims=True)

    p, q = P(ft), P(fs)
    B = len(p)
    return sum(p[i, j] * math.log((p[i, j] + eps) / (q[i, j] + eps)) for i in range(B) for j in range(B)) / B**2


@pytest.mark.parametrize("shapes", [((6, 4), (6, 7)), ((3, 2, 5), (3, 3, 2, 2))])
def test_pkt_value_and_zero(shapes):
    fs, ft = rnd(*shapes[0]), rnd(*shapes[1], grad=False, seed=6)
    out = method("pkt").loss(step_of("pkt", {"pool": fs}, {"pool": ft}))
    assert out["pkt"].item() == pytest.approx(30000 * pkt_np(fs, ft), rel=1e-3)
    same = method("pkt").loss(step_of("pkt", {"pool": fs}, {"pool": fs.detach().clone()}))
    assert abs(same["pkt"].item()) < 1e-3
