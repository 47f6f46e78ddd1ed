"""at: every attention mapping against numpy, with pooling of the larger map."""
import numpy as np
import pytest

from kdbench.losses import ATTENTION_MAPPINGS

from methods.kit import method, npy, pool_np, rnd, step_of


@pytest.mark.parametrize("shape_s,shape_t", [((2, 3, 8), (2, 5, 4)), ((2, 3, 4, 4), (2, 2, 2, 2))])
def test_at_mappings(shape_s, shape_t):
    fs, ft = rnd(*shape_s), rnd(*shape_t, grad=False, seed=2)

    def amap(f, mapping, p=2.0):
        f = np.abs(f)
        a = {"mean_p": (f**p).mean(1), "sum_abs": f.sum(1), "sum_p": (f**p).sum(1), "max_p": (f**p).max(1)}[mapping]
        a = a.reshape(len(a), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    a_s, a_t = npy(fs), pool_np(ft, shape_s[2:]) if np.prod(shape_t[2:]) > np.prod(shape_s[2:]) else npy(ft)
    if np.prod(shape_s[2:]) > np.prod(shape_t[2:]):
        a_s = pool_np(fs, shape_t[2:])
    vals = {}
    for mapping in ATTENTION_MAPPINGS:
        st = step_of("at", {"stage1": fs}, {"stage1": ft}, mapping=mapping)
        vals[mapping] = method("at").loss(st)["at"].item()
        ref = 1000 * ((amap(a_s, mapping) - amap(a_t, mapping)) ** 2).mean()
        assert vals[mapping] == pytest.approx(ref, rel=1e-4)
    # the default is the original formula, unchanged
    st = step_of("at", {"stage1": fs}, {"stage1": ft})
    assert st.hp.mapping == "mean_p" and method("at").loss(st)["at"].item() == vals["mean_p"]
    assert vals["sum_p"] == pytest.approx(vals["mean_p"], rel=1e-5)  # equal after L2-normalising
    assert vals["max_p"] != pytest.approx(vals["mean_p"], rel=1e-3)
