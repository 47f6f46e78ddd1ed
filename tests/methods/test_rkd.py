"""rkd: distance and angle terms against loops over pairs and triplets."""
import numpy as np
import pytest

from methods.kit import method, npy, rnd, step_of


def huber(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d**2, d - 0.5).mean()


def rkd_np(fs, ft):
    def dist(f):
        B = len(f)
        d = np.array([[np.linalg.norm(f[i] - f[j]) for j in range(B)] for i in range(B)])
        return d / d[~np.eye(B, dtype=bool)].mean()

    def ang(f):
        B = len(f)
        out = np.zeros((B, B, B))
        for j in range(B):
            for i in range(B):
                for k in range(B):
                    u, v = f[i] - f[j], f[k] - f[j]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    out[j, i, k] = 0.0 if nu == 0 or nv == 0 else u @ v / (nu * nv)
        return out

    fs, ft = npy(fs).reshape(len(fs), -1), npy(ft).reshape(len(ft), -1)
    return huber(dist(fs), dist(ft)), huber(ang(fs), ang(ft))


@pytest.mark.parametrize("shapes", [((5, 6), (5, 9)), ((4, 2, 3), (4, 12)), ((3, 2, 2, 2), (3, 5))])
def test_rkd_value(shapes):
    fs, ft = rnd(*shapes[0]), rnd(*shapes[1], grad=False, seed=8) * 3
    out = method("rkd").loss(step_of("rkd", {"pool": fs}, {"pool": ft}))
    d, a = rkd_np(fs, ft)
    assert out["rkd_dist"].item() == pytest.approx(25 * d, rel=1e-4)
    assert out["rkd_angle"].item() == pytest.approx(50 * a, rel=1e-4)


def test_rkd_zero_and_batch_of_one():
    f = rnd(4, 6)
    out = method("rkd").loss(step_of("rkd", {"pool": f}, {"pool": 2 * f.detach()}))  # scale-invariant
    assert out["rkd_dist"].item() < 1e-10 and out["rkd_angle"].item() < 1e-10
    one = method("rkd").loss(step_of("rkd", {"pool": rnd(1, 6)}, {"pool": rnd(1, 6, seed=2)}))
    assert one["rkd_dist"].item() == 0.0 and one["rkd_angle"].item() == 0.0
