"""Methods of branch methods-a: each loss against an independent computation (numpy, loops,
closed forms), gradients, search spaces and pair checks. No training."""
import math
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F

from kdbench.core import plugins
from kdbench.contracts import Outputs, Probe, Step
from kdbench.errors import KdbenchError
from kdbench_builtin.methods import at, at_grad

NEW = ["logits", "nst", "sp", "cc", "rkd", "pkt", "dkd", "dist", "kdsvd", "at", "at_grad"]
REG = plugins.registry().methods
torch.manual_seed(0)


def method(name):
    return REG[name].obj


def hp_of(name, **over):
    return SimpleNamespace(**{**method(name).hparam_defaults(), **over})


def probe_of(name, s_shapes, t_shapes, num_classes=5, **over):
    return Probe(hp_of(name, **over), num_classes, (1, 40), dict(s_shapes), dict(t_shapes),
                 list(s_shapes), list(t_shapes), lambda: None)


def step_of(name, s_feats=None, t_feats=None, z_s=None, z_t=None, y=None, modules=None,
            epoch=0, epochs=1, b=None, ncls=5, **over):
    b = b or (len(next(iter(s_feats.values()))) if s_feats else len(z_s))
    g = torch.Generator().manual_seed(1)
    z_s = torch.randn(b, ncls, generator=g, requires_grad=True) if z_s is None else z_s
    z_t = torch.randn(b, ncls, generator=g) if z_t is None else z_t
    y = torch.arange(b) % ncls if y is None else y
    return Step(torch.zeros(b, 1, 8), y, Outputs(z_s, s_feats or {}), Outputs(z_t, t_feats or {}),
                hp_of(name, **over), modules, epoch, epochs, "main")


def rnd(*shape, grad=True, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else sum(shape))
    return torch.randn(*shape, generator=g, dtype=torch.float64).float().requires_grad_(grad)


def npy(t):
    return t.detach().double().numpy()


def ce_np(z, y):
    z = npy(z)
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -np.mean([logp[i, y[i]] for i in range(len(y))])


def softmax_np(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def pool_np(f, size):
    """Block-average pooling of [B, C, *sp] to spatial ``size`` (exact divisors only)."""
    f = npy(f)
    if f.ndim == 3:
        r = f.shape[2] // size[0]
        return f.reshape(*f.shape[:2], size[0], r).mean(3)
    r1, r2 = f.shape[2] // size[0], f.shape[3] // size[1]
    return f.reshape(*f.shape[:2], size[0], r1, size[1], r2).mean((3, 5))


# --------------------------------------------------------------------------- logits


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


# --------------------------------------------------------------------------- nst


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


# --------------------------------------------------------------------------- sp


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


def test_sp_orders_stages_numerically():
    feats = {f"stage{i}": rnd(2, 2, 3, seed=i) for i in (10, 2, 1)}
    from kdbench_builtin.methods._common import stage_names
    assert stage_names(feats) == ["stage1", "stage2", "stage10"]


# --------------------------------------------------------------------------- cc


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

    st = step_of("cc", {"pool": fs}, {"pool": ft}, modules=mods)
    got = method("cc").loss(st)["cc"].item()
    ref = 0.02 * ((taylor(es, 0.4, 2) - taylor(et, 0.4, 2)) ** 2).sum() / 25
    assert got == pytest.approx(ref, rel=1e-4)
    # a high order reproduces the exact Gaussian RBF on unit vectors
    st = step_of("cc", {"pool": fs}, {"pool": ft}, modules=mods, order=12, weight=1.0)
    ref_exact = ((exact(es, 0.4) - exact(et, 0.4)) ** 2).sum() / 25
    assert method("cc").loss(st)["cc"].item() == pytest.approx(ref_exact, rel=1e-4)


def test_cc_zero_when_embeddings_equal():
    mods = cc_probe_modules(6, 6)
    mods["embed_t"].load_state_dict(mods["embed_s"].state_dict())
    f = rnd(4, 6)
    st = step_of("cc", {"pool": f}, {"pool": f.detach().clone()}, modules=mods)
    assert method("cc").loss(st)["cc"].item() == 0.0


# --------------------------------------------------------------------------- rkd


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


# --------------------------------------------------------------------------- pkt


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


# --------------------------------------------------------------------------- dkd


def dkd_np(zs, zt, y, T):
    zs, zt = npy(zs) / T, npy(zt) / T
    tck = nck = 0.0
    for i in range(len(y)):
        ps, pt = softmax_np(zs[i]), softmax_np(zt[i])
        a, b = pt[y[i]], ps[y[i]]
        tck += a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
        qs, qt = softmax_np(np.delete(zs[i], y[i])), softmax_np(np.delete(zt[i], y[i]))
        nck += (qt * np.log(qt / qs)).sum()
    B = len(y)
    return tck / B * T * T, nck / B * T * T


@pytest.mark.parametrize("epoch,epochs,factor", [(0, 240, 1 / 20), (19, 240, 1.0), (0, 24, 0.5), (1, 24, 1.0),
                                                 (0, 2, 1.0)])
def test_dkd_value_and_warmup(epoch, epochs, factor):
    zs, zt = rnd(4, 6), rnd(4, 6, grad=False, seed=3) * 2
    y = torch.tensor([0, 5, 2, 2])
    out = method("dkd").loss(step_of("dkd", z_s=zs, z_t=zt, y=y, epoch=epoch, epochs=epochs))
    tck, nck = dkd_np(zs, zt, y.tolist(), 4.0)
    assert out["tckd"].item() == pytest.approx(factor * 1.0 * tck, rel=1e-4)
    assert out["nckd"].item() == pytest.approx(factor * 8.0 * nck, rel=1e-4)
    assert out["ce"].item() == pytest.approx(ce_np(zs, y), rel=1e-5)


def test_dkd_zero_and_batch_of_one():
    z = rnd(1, 5)
    out = method("dkd").loss(step_of("dkd", z_s=z, z_t=z.detach().clone(), y=torch.tensor([3])))
    assert abs(out["tckd"].item()) < 1e-6 and abs(out["nckd"].item()) < 1e-6


# --------------------------------------------------------------------------- dist


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


# --------------------------------------------------------------------------- kdsvd


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


# --------------------------------------------------------------------------- at (mappings)


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
    for mapping in at.MAPPINGS:
        st = step_of("at", {"stage1": fs}, {"stage1": ft}, mapping=mapping)
        vals[mapping] = method("at").loss(st)["at"].item()
        ref = 1000 * ((amap(a_s, mapping) - amap(a_t, mapping)) ** 2).mean()
        assert vals[mapping] == pytest.approx(ref, rel=1e-4)
    # the default is the original formula, unchanged
    st = step_of("at", {"stage1": fs}, {"stage1": ft})
    assert st.hp.mapping == "mean_p" and method("at").loss(st)["at"].item() == vals["mean_p"]
    assert vals["sum_p"] == pytest.approx(vals["mean_p"], rel=1e-5)  # equal after L2-normalising
    assert vals["max_p"] != pytest.approx(vals["mean_p"], rel=1e-3)


# --------------------------------------------------------------------------- at_grad


class Linear(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x):
        return Outputs(x.flatten(1) @ self.w.t())


def test_at_grad_closed_form_and_gradients():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 2, 4, generator=g), torch.tensor([0, 2, 1])  # input [B, C, L]
    s, t = Linear(torch.randn(3, 8, generator=g)), Linear(torch.randn(3, 8, generator=g))
    st = step_of("at_grad", z_s=s(x).logits, z_t=t(x).logits.detach(), y=y, ncls=3, beta=2.0)
    st.x = x
    st.student_net, st.teacher_net = s, t
    out = method("at_grad").loss(st)

    def J(w):  # ∂CE_i/∂x_i = (softmax(W x_i) − e_{y_i})ᵀ W for a linear net
        w = npy(w)
        xs = x.flatten(1).double().numpy()
        p = softmax_np(xs @ w.T)
        p[np.arange(3), y.numpy()] -= 1
        return p @ w

    ref = 2.0 / 2 * ((J(s.w) - J(t.w)) ** 2).sum(1).mean()
    assert out["at_grad"].item() == pytest.approx(ref, rel=1e-5)
    sum(out.values()).backward()
    assert s.w.grad is not None and s.w.grad.abs().sum() > 0
    assert t.w.grad is None  # the teacher's gradient map never updates the teacher
    # equal networks: zero
    st.teacher_net = Linear(s.w.detach().clone())
    assert method("at_grad").loss(st)["at_grad"].item() < 1e-12
    # 2-D inputs work too
    x2 = torch.randn(2, 1, 2, 2, generator=g)
    assert at_grad.grad_at_term(Linear(torch.randn(3, 4)), Linear(torch.randn(3, 4)), x2, torch.tensor([0, 1])) > 0


def test_at_grad_refuses_without_networks():
    pr = probe_of("at_grad", {}, {})
    method("at_grad").check(pr)  # the engine's Step carries the networks
    with pytest.raises(KdbenchError, match="student_net"):
        at_grad.check(pr, step_fields={"x", "y"})  # an engine whose Step lacks them is refused
    with pytest.raises(KdbenchError, match="at_grad needs"):
        method("at_grad").loss(step_of("at_grad", z_s=rnd(2, 5)))


# --------------------------------------------------------------------------- all methods: gradients


def _feats(shape_kind, b, c, seed, grad):
    sizes = [(8,), (4,)] if shape_kind == "1d" else [(4, 4), (2, 2)]
    return {f"stage{i + 1}": rnd(b, c, *sz, seed=seed + i, grad=grad) for i, sz in enumerate(sizes)} | {
        "pool": rnd(b, c * 2, seed=seed + 9, grad=grad)
    }


@pytest.mark.parametrize("shape_kind", ["1d", "2d"])
@pytest.mark.parametrize("name", [n for n in NEW if n != "at_grad"])
def test_gradients_reach_student_and_modules_not_teacher(name, shape_kind):
    b, k = 4, 5
    fs = _feats(shape_kind, b, 3, 0, True)
    ft = _feats(shape_kind, b, 6, 20, True)  # a wider teacher, spatially larger stage 1 on 2-D
    if shape_kind == "2d":
        ft["stage1"] = rnd(b, 6, 8, 8, seed=40)
    z_s, z_t = rnd(b, k, seed=50), rnd(b, k, seed=51)
    m = method(name)
    from kdbench.core.taps import expand
    fs = {n: fs[n] for n in (expand(m.taps, list(fs)) if m.taps else [])}
    ft = {n: ft[n] for n in (expand(m.taps, list(ft)) if m.taps else [])}
    pr = probe_of(name, {n: tuple(v.shape[1:]) for n, v in fs.items()}, {n: tuple(v.shape[1:]) for n, v in ft.items()})
    if m.check:
        m.check(pr)
    mods = m.build(pr) if m.build else None
    st = step_of(name, fs, ft, z_s=z_s, z_t=z_t, modules=mods, ncls=k)
    terms = m.loss(st)
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    kd_terms = [n for n in terms if n != "ce"]
    assert kd_terms
    used = [v for v in list(fs.values()) + [z_s] if v.grad is not None and v.grad.abs().sum() > 0]
    assert used, f"{name}: no gradient reached the student"
    for v in list(ft.values()) + [z_t]:
        assert v.grad is None, f"{name}: gradient reached a teacher tensor"
    if mods is not None:
        for p in mods.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: module parameter without gradient"
    # the distillation terms alone (without CE) also reach the student
    fs2 = {n: v.detach().requires_grad_(True) for n, v in fs.items()}
    z_s2 = z_s.detach().requires_grad_(True)
    terms = m.loss(step_of(name, fs2, ft, z_s=z_s2, z_t=z_t, modules=mods, ncls=k))
    sum(terms[n] for n in kd_terms).backward()
    assert any(v.grad is not None and v.grad.abs().sum() > 0 for v in list(fs2.values()) + [z_s2])


# --------------------------------------------------------------------------- search spaces and checks


@pytest.mark.parametrize("name", NEW)
def test_search_space_samples_only_valid_values(name):
    m = method(name)
    space = m.search_space()
    assert space, f"{name} has nothing to tune"
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        for h in space:
            v = h.suggest(trial)
            assert h.check(v) == v
        return 0.0

    optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).optimize(objective, n_trials=50)
    for h in m.hparams:
        h.check(h.default)
        assert h.low is not None or h.choices is not None or h.kind in (bool, str), f"{name}.{h.name} unbounded"
    assert m.citation and m.description


BAD_PAIRS = {
    "logits": ({}, {}, 1),
    "dkd": ({}, {}, 2),
    "dist": ({}, {}, 1),
    "nst": ({"stage1": (3, 4), "stage2": (3, 2)}, {"stage1": (3, 4)}, 5),
    "sp": ({"pool": (4,)}, {"stage1": (3, 4)}, 5),
    "kdsvd": ({"stage1": (3, 4)}, {"stage1": (3, 4)}, 5),
    "cc": ({"pool": (4,)}, {"stage1": (3, 4)}, 5),
    "rkd": ({"stage1": (3, 4)}, {"pool": (4,)}, 5),
    "pkt": ({"pool": (4,)}, {}, 5),
    "at": ({"stage1": (3, 4), "stage2": (3, 2)}, {"stage1": (3, 4)}, 5),
    "at_grad": ({}, {}, 1),
}


@pytest.mark.parametrize("name", NEW)
def test_check_rejects_bad_pair(name):
    s, t, classes = BAD_PAIRS[name]
    with pytest.raises(KdbenchError) as exc:
        method(name).check(probe_of(name, s, t, num_classes=classes))
    assert "\n" not in str(exc.value)
