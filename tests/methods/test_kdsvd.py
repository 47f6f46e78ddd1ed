"""kdsvd: the SVD relation loss against numpy's SVD in loops, connectors, the surrogate gradient."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench_builtin.methods import kdsvd
from methods.kit import method, npy, probe_of, rnd, step_of


def kdsvd_np(feats_s, feats_t, k, conn=None):
    """Loops over samples with numpy's SVD; conn: per-stage [C_t, C_s] matrices or None."""
    B = len(feats_s[0])
    total, prev = 0.0, None
    for l, (fs, ft) in enumerate(zip(feats_s, feats_t)):
        vs_all, vt_all = [], []
        for b in range(B):
            ms = npy(fs[b]).reshape(fs.shape[1], -1).T  # [N, C]
            mt = npy(ft[b]).reshape(ft.shape[1], -1).T
            if conn is not None and conn[l] is not None:
                ms = ms @ conn[l].T
            _, st, vht = np.linalg.svd(mt, full_matrices=False)
            _, _, vhs = np.linalg.svd(ms, full_matrices=False)
            n = min(k, len(st))
            vt = vht[:n].T.copy()
            for m in range(n):
                if vt[np.abs(vt[:, m]).argmax(), m] < 0:
                    vt[:, m] *= -1
            cand = vhs[: k + 3].T
            vs = np.zeros_like(vt)
            for m in range(n):
                cos = cand.T @ vt[:, m]
                j = np.abs(cos).argmax()
                vs[:, m] = cand[:, j] * np.sign(cos[j])
            scale = st[:n] / np.linalg.norm(st[:n])
            vs_all.append(vs * scale)
            vt_all.append(vt * scale)
        if prev is not None:
            for b in range(B):
                for m in range(vt_all[b].shape[1]):
                    for i in range(vt_all[b].shape[0]):
                        for j in range(prev[1][b].shape[0]):
                            rs = math.exp(-(vs_all[b][i, m] - prev[0][b][j, m]) ** 2 / 8)
                            rt = math.exp(-(vt_all[b][i, m] - prev[1][b][j, m]) ** 2 / 8)
                            total += (rs - rt) ** 2 / B
        prev = (vs_all, vt_all)
    return total


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("shapes", [
    [((3, 4, 12), (3, 4, 24)), ((3, 6, 6), (3, 6, 12))],  # 1-D, student maps half the teacher's length
    [((2, 4, 3, 3), (2, 4, 4, 4)), ((2, 5, 2, 2), (2, 5, 2, 2))],  # 2-D
])
def test_kdsvd_value_same_widths(k, shapes):
    fs = [rnd(*s).relu() for s, _ in shapes]
    ft = [rnd(*t, grad=False, seed=21 + i).relu() for i, (_, t) in enumerate(shapes)]
    st = step_of("kdsvd", {"stage1": fs[0], "stage2": fs[1]}, {"stage1": ft[0], "stage2": ft[1]}, k=k)
    pr = probe_of("kdsvd", {"stage1": shapes[0][0][1:], "stage2": shapes[1][0][1:]},
                  {"stage1": shapes[0][1][1:], "stage2": shapes[1][1][1:]}, k=k)
    assert method("kdsvd").build(pr) is None  # equal widths: no connector
    got = method("kdsvd").loss(st)["kdsvd"].item()
    assert got == pytest.approx(kdsvd_np(fs, ft, k), rel=1e-3, abs=1e-7)
    assert got > 0


def test_kdsvd_connector_for_channel_mismatch():
    fs = [rnd(3, 4, 16), rnd(3, 4, 8)]
    ft = [rnd(3, 8, 16, grad=False, seed=1), rnd(3, 8, 8, grad=False, seed=2)]
    pr = probe_of("kdsvd", {"stage1": (4, 16), "stage2": (4, 8)}, {"stage1": (8, 16), "stage2": (8, 8)})
    mods = method("kdsvd").build(pr)
    assert set(mods.keys()) == {"stage1", "stage2"} and mods["stage1"].weight.shape == (8, 4)
    st = step_of("kdsvd", {"stage1": fs[0], "stage2": fs[1]}, {"stage1": ft[0], "stage2": ft[1]}, modules=mods)
    got = method("kdsvd").loss(st)["kdsvd"].item()
    ref = kdsvd_np(fs, ft, 1, [npy(mods["stage1"].weight), npy(mods["stage2"].weight)])
    assert got == pytest.approx(ref, rel=1e-3)


def test_kdsvd_zero_when_equal_and_finite_grad_on_rank_deficient_maps():
    ft = [rnd(2, 4, 8).relu().detach(), rnd(2, 4, 4, seed=3).relu().detach()]
    st = step_of("kdsvd", {"stage1": ft[0].clone(), "stage2": ft[1].clone()}, {"stage1": ft[0], "stage2": ft[1]})
    assert method("kdsvd").loss(st)["kdsvd"].item() < 1e-8
    # a map with repeated zero singular values (exact SVD backward would divide by zero)
    f1 = torch.zeros(2, 6, 5)
    f1[:, 0] = 1.0
    f1.requires_grad_(True)
    f2 = rnd(2, 6, 3)
    st = step_of("kdsvd", {"stage1": f1, "stage2": f2},
                 {"stage1": rnd(2, 6, 5, grad=False, seed=4), "stage2": rnd(2, 6, 3, grad=False, seed=5)})
    sum(method("kdsvd").loss(st).values()).backward()
    assert torch.isfinite(f1.grad).all() and torch.isfinite(f2.grad).all()


def test_kdsvd_surrogate_gradient_matches_exact_svd_when_well_separated():
    """Direction of the one-step power-iteration gradient of the top singular vector."""
    m = torch.tensor([[5.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.2], [0.1, 0.3, 0.0]], dtype=torch.float64)
    m1 = m.clone().requires_grad_(True)
    v_exact = torch.linalg.svd(m1)[2][0]
    v_exact = v_exact * v_exact[0].sign()
    w = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    (g_exact,) = torch.autograd.grad((v_exact * w).sum(), m1)
    m2 = m.clone().requires_grad_(True)
    v_hat = v_exact.detach().unsqueeze(0).unsqueeze(2)
    v_sur = F.normalize((m2.T @ m2).unsqueeze(0) @ v_hat, dim=1)[0, :, 0]
    (g_sur,) = torch.autograd.grad((v_sur * w).sum(), m2)
    assert torch.allclose(v_sur, v_exact.detach(), atol=1e-9)
    assert F.cosine_similarity(g_exact.flatten(), g_sur.flatten(), dim=0) > 0.9
