"""sp: the batch similarity of the last stage map against numpy."""
import numpy as np
import pytest

from methods.kit import method, npy, rnd, step_of


def sp_np(fs, ft):
    def G(f):
        f = npy(f).reshape(len(f), -1)
        g = f @ f.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    B = len(fs)
    return ((G(fs) - G(ft)) ** 2).sum() / B**2


@pytest.mark.parametrize("shapes", [((4, 3, 6), (4, 8, 3)), ((4, 3, 2, 2), (4, 6, 4, 4)), ((1, 2, 3), (1, 4, 3))])
def test_sp_value_last_stage(shapes):
    s_last, t_last = rnd(*shapes[0]), rnd(*shapes[1], grad=False, seed=5)
    st = step_of("sp", {"stage1": rnd(shapes[0][0], 2, 5), "stage2": s_last},
                 {"stage1": rnd(shapes[0][0], 2, 5, seed=9), "stage2": t_last})
    out = method("sp").loss(st)
    assert out["sp"].item() == pytest.approx(3000 * sp_np(s_last, t_last), rel=1e-4, abs=1e-7)
    if shapes[0][0] == 1:
        assert out["sp"].item() == 0.0  # one sample: both similarities are [[1]]
