"""cc: RepDistiller's consecutive-sample correlation (default) and the paper's Taylor-RBF correlation
congruence (variant) against explicit sums and the exact kernel."""
import math

import numpy as np
import pytest
import torch

from methods.kit import method, npy, probe_of, rnd, step_of


def cc_probe_modules(ds=6, dt=10, **over):
    pr = probe_of("cc", {"pool": (ds,)}, {"pool": (dt,)}, **over)
    torch.manual_seed(0)
    return method("cc").build(pr)


def test_cc_value_against_exact_rbf_and_taylor():
    mods = cc_probe_modules()
    fs, ft = rnd(5, 6), rnd(5, 10, grad=False, seed=4)

    def emb(lin, f):
        e = npy(f) @ npy(lin.weight).T + npy(lin.bias)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    es, et = emb(mods["embed_s"], fs), emb(mods["embed_t"], ft)
    assert es.shape == (5, 128)

    def taylor(e, g, P):
        K = np.zeros((5, 5))
        for i in range(5):
            for j in range(5):
                K[i, j] = sum(math.exp(-2 * g) * (2 * g) ** p / math.factorial(p) * (es_dot(e, i, j)) ** p
                              for p in range(P + 1))
        return K

    def es_dot(e, i, j):
        return float(e[i] @ e[j])

    def exact(e, g):
        return np.array([[math.exp(-g * ((e[i] - e[j]) ** 2).sum()) for j in range(5)] for i in range(5)])

    st = step_of("cc", {"pool": fs}, {"pool": ft}, modules=mods, variant="paper", paper_weight=0.02)
    got = method("cc").loss(st)["cc"].item()
    ref = 0.02 * ((taylor(es, 0.4, 2) - taylor(et, 0.4, 2)) ** 2).sum() / 25
    assert got == pytest.approx(ref, rel=1e-4)
    # a high order reproduces the exact Gaussian RBF on unit vectors
    st = step_of("cc", {"pool": fs}, {"pool": ft}, modules=mods, order=12, variant="paper")
    ref_exact = ((exact(es, 0.4) - exact(et, 0.4)) ** 2).sum() / 25
    assert method("cc").loss(st)["cc"].item() == pytest.approx(ref_exact, rel=1e-4)


def test_cc_zero_when_embeddings_equal():
    mods = cc_probe_modules(6, 6)
    mods["embed_t"].load_state_dict(mods["embed_s"].state_dict())
    f = rnd(4, 6)
    st = step_of("cc", {"pool": f}, {"pool": f.detach().clone()}, modules=mods)
    assert method("cc").loss(st)["cc"].item() == 0.0


def test_cc_default_is_repdistillers_consecutive_correlation():
    # RepDistiller distiller_zoo/CC.py Correlation on LinearEmbed outputs (no normalisation):
    # delta = |f_s − f_t|; loss = mean((delta[:-1] * delta[1:]).sum(1)); weight -b 0.02
    mods = cc_probe_modules()
    fs, ft = rnd(5, 6), rnd(5, 10, grad=False, seed=4)
    es = npy(fs) @ npy(mods["embed_s"].weight).T + npy(mods["embed_s"].bias)
    et = npy(ft) @ npy(mods["embed_t"].weight).T + npy(mods["embed_t"].bias)
    total = 0.0
    for i in range(4):
        total += sum(abs(es[i, d] - et[i, d]) * abs(es[i + 1, d] - et[i + 1, d]) for d in range(128))
    got = method("cc").loss(step_of("cc", {"pool": fs}, {"pool": ft}, modules=mods))
    assert got["cc"].item() == pytest.approx(0.02 * total / 4, rel=1e-4)
    one = method("cc").loss(step_of("cc", {"pool": fs[:1]}, {"pool": ft[:1]}, modules=mods))
    assert one["cc"].item() == 0.0  # a batch of one has no consecutive pair
