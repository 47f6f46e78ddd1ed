"""Tests of the methods-b plugins: values against independent computations, gradients, search
spaces and pair checks, on 1-D [B, C, L] and 2-D [B, C, H, W] features."""
import itertools
import math
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F

from kdbench.contracts import Outputs, Probe, Step
from kdbench.errors import KdbenchError
from kdbench_builtin.methods import (ab, adversarial, crd, darkrank, fitnets, fsp, ft, reviewkd,
                                     rocket, vid)
from kdbench_builtin.methods._common_b import set_identity

MODULES = {m.METHODS[0].name: m for m in (fitnets, vid, ab, ft, fsp, crd, reviewkd, darkrank, rocket, adversarial)}
NAMES = sorted(MODULES)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def method(name):
    return MODULES[name].METHODS[0]


def hp(name, **over):
    values = method(name).hparam_defaults()
    values.update(over)
    return SimpleNamespace(**values)


def shapes(dims, c_s=4, c_t=6, s1=8, s2=4):
    """Per-sample tap shapes of a 2-stage student/teacher (stage1, stage2, pre taps, pool)."""
    def one(c):
        sp1, sp2 = (s1,) * dims, (s2,) * dims
        return {"stage1": (c, *sp1), "stage2": (c, *sp2), "stage1_pre": (c, *sp1), "stage2_pre": (c, *sp2),
                "pool": (c * s2 ** dims,)}
    return one(c_s), one(c_t)


def make_probe(name, s_shapes, t_shapes, num_classes=5, **over):
    return Probe(hp(name, **over), num_classes, (1, 40), dict(s_shapes), dict(t_shapes),
                 list(s_shapes), list(t_shapes), lambda: None)


def feats(shp, b, gen, grad=False):
    out = {}
    for k in ("stage1", "stage2"):
        pre = torch.randn(b, *shp[k], generator=gen)
        out[k + "_pre"], out[k] = pre, pre.relu()
    out["pool"] = out["stage2"].flatten(1).clone()
    if grad:
        out = {k: v.requires_grad_() for k, v in out.items()}
    return out


def make_step(name, s_out, t_out, y, modules, stage="main", epoch=0, **over):
    return Step(torch.zeros(len(y), 1), y, s_out, t_out, hp(name, **over), modules, epoch, 10, stage)


def eval_identity_bn(bn_layer):
    bn_layer.eval()
    bn_layer.eps = 0.0  # running mean 0, var 1: the identity


# --------------------------------------------------------------------------- generic checks


def _stage_losses(name, hpv):
    m = method(name)
    out = [(st.name, st.loss) for st in (m.stages(hpv) if m.stages else [])]
    return out + [("main", m.loss)]


MODULES_UNUSED = {("ab", "main"), ("fsp", "main"), ("fitnets", "main")}  # pre-stage modules, idle later (fitnets: hint_main=0)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_student_and_modules_never_teacher(name, dims):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    s_shp, t_shp = shapes(dims)
    probe = make_probe(name, s_shp, t_shp)
    m = method(name)
    m.check(probe) if m.check else None
    modules = m.build(probe) if m.build else None
    for stage_name, loss_fn in _stage_losses(name, probe.hp):
        s_f, t_f = feats(s_shp, 6, gen, grad=True), feats(t_shp, 6, gen, grad=True)
        s_logits = torch.randn(6, 5, generator=gen).requires_grad_()
        t_logits = torch.randn(6, 5, generator=gen).requires_grad_()
        y = torch.tensor([0, 1, 2, 3, 4, 0])
        teacher = None if not m.needs_teacher else Outputs(t_logits, t_f)
        if modules is not None:
            modules.train()
            modules.zero_grad(set_to_none=True)
        terms = loss_fn(make_step(name, Outputs(s_logits, s_f), teacher, y, modules, stage=stage_name))
        total = sum(terms.values())
        assert torch.isfinite(total)
        total.backward()
        assert all(v.grad is None for v in [t_logits, *t_f.values()]), "gradient reached the teacher"
        student_grads = [v.grad for v in [s_logits, *s_f.values()] if v.grad is not None]
        trains_student = not any(st.name == stage_name and not st.train_student for st in (m.stages(probe.hp) if m.stages else []))
        if trains_student:
            assert any(g.abs().sum() > 0 for g in student_grads), f"{stage_name}: no gradient reached the student"
        if modules is not None:
            grads = [p.grad for p in modules.parameters() if p.grad is not None]
            if (name, stage_name) in MODULES_UNUSED:
                assert not grads, f"{stage_name}: the init-stage modules should be idle in the main stage"
            else:
                assert any(g.abs().sum() > 0 for g in grads), f"{stage_name}: no gradient reached the method's modules"


@pytest.mark.parametrize("name", NAMES)
def test_search_space_samples_only_valid_values(name):
    space = method(name).search_space()
    assert space, "a method with nothing to tune"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        for h in space:
            value = h.suggest(trial)
            assert h.check(value) == value
        return 0.0

    study.optimize(objective, n_trials=50)
    assert len(study.trials) == 50


def test_declarations_load():
    from kdbench.core import plugins

    reg = plugins.registry()
    assert not reg.failures
    assert set(NAMES) <= set(reg.methods)


BAD_PAIRS = {
    "fitnets": lambda: make_probe("fitnets", {"stage1": (4, 5)}, {"stage1": (4, 3)}),  # 5 vs 3: no integer ratio
    "vid": lambda: make_probe("vid", {"stage1": (4, 8)}, {"stage1": (4, 8), "stage2": (4, 4)}),
    "ab": lambda: make_probe("ab", {"stage1": (4, 8)}, {"stage1": (4, 8)}),  # no pre-ReLU taps
    "ft": lambda: make_probe("ft", {"pool": (4,)}, {"pool": (4,)}),
    "fsp": lambda: make_probe("fsp", *shapes(1), connector=False),  # 4 vs 6 channels
    "crd": lambda: make_probe("crd", {"stage1": (4, 8)}, {"pool": (4,)}),
    "reviewkd": lambda: make_probe("reviewkd", {"stage1": (4, 8)}, {"stage1": (4, 8), "stage2": (4, 4)}),
    "darkrank": lambda: make_probe("darkrank", {"stage1": (4, 8)}, {"stage1": (4, 8), "pool": (4,)}),
    "rocket": lambda: make_probe("rocket", {"stage1": (4, 8)}, {}, tap=3),
    "adversarial": lambda: make_probe("adversarial", {}, {}, num_classes=1),
}


@pytest.mark.parametrize("name", NAMES)
def test_check_rejects_bad_pair_in_one_line(name):
    with pytest.raises(KdbenchError) as err:
        method(name).check(BAD_PAIRS[name]())
    assert "\n" not in str(err.value) and str(err.value)


def test_fsp_single_stage_rejected_and_matching_channels_accepted():
    with pytest.raises(KdbenchError):
        fsp.check(make_probe("fsp", {"stage1": (4, 8)}, {"stage1": (4, 8)}))
    fsp.check(make_probe("fsp", *shapes(1, c_s=4, c_t=4), connector=False))
    assert fsp.build(make_probe("fsp", *shapes(1, c_s=4, c_t=4), connector=False)) is None


# --------------------------------------------------------------------------- fitnets


def test_fitnets_auto_picks_middle_stage():
    names = ["stage1", "stage2"]
    assert fitnets.pair(hp("fitnets"), names, names) == ("stage1", "stage1")
    three = ["stage1", "stage2", "stage3", "pool"]
    assert fitnets.pair(hp("fitnets"), three, three) == ("stage2", "stage2")
    assert fitnets.pair(hp("fitnets", hint=3, guided=1), three, three) == ("stage1", "stage3")
    with pytest.raises(KdbenchError):
        fitnets.check(make_probe("fitnets", *shapes(1), hint=4))


def _fitnets_value(s, t, weight):
    return weight * np.mean((np.maximum(s, 0) - t) ** 2)


@pytest.mark.parametrize("dims", [1, 2])
def test_fitnets_hint_identity_regressor(dims):
    s_shp, t_shp = shapes(dims, c_s=4, c_t=4)
    mods = fitnets.build(make_probe("fitnets", s_shp, t_shp))
    conv, bn_ = mods["reg"][0], mods["reg"][1]
    assert conv.kernel_size == (1,) * dims
    set_identity(conv)
    eval_identity_bn(bn_)
    g = torch.Generator().manual_seed(0)
    s_f, t_f = feats(s_shp, 3, g), feats(t_shp, 3, g)
    step = make_step("fitnets", Outputs(torch.zeros(3, 5), s_f), Outputs(torch.zeros(3, 5), t_f), torch.zeros(3, dtype=torch.long), mods, stage="hint")
    got = fitnets.hint_loss(step)["hint"].item()
    assert got == pytest.approx(_fitnets_value(s_f["stage1"].numpy(), t_f["stage1"].numpy(), 100.0), rel=1e-5)
    same = make_step("fitnets", Outputs(torch.zeros(3, 5), s_f), Outputs(torch.zeros(3, 5), s_f), torch.zeros(3, dtype=torch.long), mods)
    assert fitnets.hint_loss(same)["hint"].item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("dims", [1, 2])
def test_fitnets_strided_and_transposed_regressors(dims):
    g = torch.Generator().manual_seed(0)
    # student map 2x larger: a stride-2 conv; set it to a 2-tap (or 2x2) average = average pooling
    s_shp, t_shp = shapes(dims, c_s=3, c_t=3, s1=8, s2=4)
    t_shp = {**t_shp, "stage1": (3,) + (4,) * dims}
    mods = fitnets.build(make_probe("fitnets", s_shp, t_shp))
    conv = mods["reg"][0]
    assert conv.stride == (2,) * dims
    conv.weight.data.zero_()
    for c in range(3):
        conv.weight.data[(c, c)] = 1.0 / 2 ** dims
    eval_identity_bn(mods["reg"][1])
    s = torch.rand(2, *s_shp["stage1"], generator=g)
    t = torch.rand(2, *t_shp["stage1"], generator=g)
    s_np = s.numpy()
    pooled = s_np.reshape(2, 3, 4, 2).mean(-1) if dims == 1 else s_np.reshape(2, 3, 4, 2, 4, 2).mean((3, 5))
    step = make_step("fitnets", Outputs(torch.zeros(2, 5), {"stage1": s, "stage2": s}), Outputs(torch.zeros(2, 5), {"stage1": t, "stage2": t}),
                     torch.zeros(2, dtype=torch.long), mods)
    assert fitnets.hint_loss(step)["hint"].item() == pytest.approx(100 * np.mean((pooled - t.numpy()) ** 2), rel=1e-5)
    # student map 2x smaller: a transposed conv (kernel 2, stride 2) set to nearest upsampling
    t_up = {**t_shp, "stage1": (3,) + (16,) * dims}
    mods = fitnets.build(make_probe("fitnets", s_shp, t_up))
    tconv = mods["reg"][0]
    assert isinstance(tconv, (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d))
    tconv.weight.data.zero_()
    for c in range(3):
        tconv.weight.data[(c, c)] = 1.0
    eval_identity_bn(mods["reg"][1])
    t2 = torch.rand(2, *t_up["stage1"], generator=g)
    up = np.repeat(s_np, 2, axis=2) if dims == 1 else np.repeat(np.repeat(s_np, 2, axis=2), 2, axis=3)
    step = make_step("fitnets", Outputs(torch.zeros(2, 5), {"stage1": s, "stage2": s}), Outputs(torch.zeros(2, 5), {"stage1": t2, "stage2": t2}),
                     torch.zeros(2, dtype=torch.long), mods)
    assert fitnets.hint_loss(step)["hint"].item() == pytest.approx(100 * np.mean((up - t2.numpy()) ** 2), rel=1e-5)


def test_fitnets_main_stage_is_hinton_kd():
    z_s = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    z_t = np.array([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    y = np.array([1, 2])
    T, a = 4.0, 0.9
    sm = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
    ce = -np.mean(np.log(sm(z_s)[np.arange(2), y]))
    p_t, p_s = sm(z_t / T), sm(z_s / T)
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s))) / 2 * T * T
    step = make_step("fitnets", Outputs(torch.tensor(z_s), {}), Outputs(torch.tensor(z_t), {}), torch.tensor(y), None)
    terms = fitnets.loss(step)
    assert set(terms) == {"ce", "kd"}
    assert terms["ce"].item() == pytest.approx((1 - a) * ce, rel=1e-6)
    assert terms["kd"].item() == pytest.approx(a * kl, rel=1e-6)


# --------------------------------------------------------------------------- vid


def _identity_vid(mod):
    for layer in mod.mu:
        if hasattr(layer, "weight"):
            set_identity(layer)
            layer.bias.data.zero_()


@pytest.mark.parametrize("dims", [1, 2])
def test_vid_identity_regressor_matches_gaussian_nll(dims):
    s_shp, t_shp = shapes(dims, c_s=3, c_t=3)
    mods = vid.build(make_probe("vid", s_shp, t_shp))
    for m_ in mods:
        _identity_vid(m_)
    assert mods[0].var().detach().numpy() == pytest.approx(np.full(3, 5.0), rel=1e-6)
    g = torch.Generator().manual_seed(0)
    s_f, t_f = feats(s_shp, 2, g), feats(t_shp, 2, g)
    step = make_step("vid", Outputs(torch.zeros(2, 5), s_f), Outputs(torch.zeros(2, 5), t_f), torch.zeros(2, dtype=torch.long), mods)
    want = 0.0
    for k in ("stage1", "stage2"):
        d = s_f[k].numpy() - t_f[k].numpy()  # μ = identity on non-negative (post-ReLU) maps
        want += np.mean(0.5 * (d ** 2 / 5.0 + math.log(5.0)))
    assert vid.vid_term(step).item() == pytest.approx(want, rel=1e-5)
    same = make_step("vid", Outputs(torch.zeros(2, 5), s_f), Outputs(torch.zeros(2, 5), s_f), torch.zeros(2, dtype=torch.long), mods)
    assert vid.vid_term(same).item() == pytest.approx(2 * 0.5 * math.log(5.0), rel=1e-5)  # the log σ² floor


def test_vid_pools_larger_student_map_and_maps_channels():
    s_shp = {"stage1": (3, 8)}
    t_shp = {"stage1": (3, 4)}
    mods = vid.build(make_probe("vid", s_shp, t_shp))
    _identity_vid(mods[0])
    s, t = torch.rand(1, 3, 8), torch.rand(1, 3, 4)  # a batch of one
    step = make_step("vid", Outputs(torch.zeros(1, 5), {"stage1": s}), Outputs(torch.zeros(1, 5), {"stage1": t}), torch.zeros(1, dtype=torch.long), mods)
    pooled = s.numpy().reshape(1, 3, 4, 2).mean(-1)
    want = np.mean(0.5 * ((pooled - t.numpy()) ** 2 / 5.0 + math.log(5.0)))
    assert vid.vid_term(step).item() == pytest.approx(want, rel=1e-5)
    wide = vid.build(make_probe("vid", {"stage1": (3, 8)}, {"stage1": (7, 8)}))
    assert wide[0].mu(torch.rand(2, 3, 8)).shape == (2, 7, 8)


# --------------------------------------------------------------------------- ab


def _ab_loop(s, t, m):
    total = 0.0
    for a, b in zip(s.ravel(), t.ravel()):
        if b <= 0 and a > -m:
            total += (a + m) ** 2
        elif b > 0 and a <= m:
            total += (a - m) ** 2
    return total


@pytest.mark.parametrize("dims", [1, 2])
def test_ab_margin_loss_matches_loop(dims):
    s_shp, t_shp = shapes(dims, c_s=3, c_t=3)
    mods = ab.build(make_probe("ab", s_shp, t_shp))
    for seq in mods:
        set_identity(seq[0])
        eval_identity_bn(seq[1])
    g = torch.Generator().manual_seed(0)
    s_f, t_f = feats(s_shp, 4, g), feats(t_shp, 4, g)
    step = make_step("ab", Outputs(torch.zeros(4, 5), s_f), Outputs(torch.zeros(4, 5), t_f), torch.zeros(4, dtype=torch.long), mods, stage="init", margin=0.5)
    want = (0.5 * _ab_loop(s_f["stage1_pre"].numpy(), t_f["stage1_pre"].numpy(), 0.5)
            + 1.0 * _ab_loop(s_f["stage2_pre"].numpy(), t_f["stage2_pre"].numpy(), 0.5)) / 4 * 3 / 1000
    assert ab.init_loss(step)["ab"].item() == pytest.approx(want, rel=1e-5)


def test_ab_hand_worked_and_zero_beyond_margin():
    s = torch.tensor([[[-2.0, -0.5, 0.5, 2.0]]])
    t = torch.tensor([[[-1.0, -1.0, 1.0, 1.0]]])
    # -2 (t off, below -m): 0; -0.5 (t off): (0.5)^2; 0.5 (t on, below m): (-0.5)^2; 2: 0
    assert ab.boundary_loss(s, t, 1.0).item() == pytest.approx(0.5)
    assert ab.boundary_loss(t * 3, t, 1.0).item() == 0.0


def test_ab_main_stage_is_ce_only_by_default():
    z = torch.randn(3, 5)
    y = torch.tensor([0, 1, 2])
    terms = ab.METHODS[0].loss(make_step("ab", Outputs(z, {}), Outputs(torch.randn(3, 5), {}), y, None))
    assert set(terms) == {"ce"}
    assert terms["ce"].item() == pytest.approx(-F.log_softmax(z, 1)[range(3), y].mean().item(), rel=1e-6)


# --------------------------------------------------------------------------- ft


def test_ft_factor_l1_matches_numpy_and_is_scale_invariant():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    an = a.numpy().reshape(2, -1)
    bn_ = b.numpy().reshape(2, -1)
    want = np.mean(np.abs(an / np.linalg.norm(an, axis=1, keepdims=True) - bn_ / np.linalg.norm(bn_, axis=1, keepdims=True)))
    assert ft.factor_l1(a, b).item() == pytest.approx(want, rel=1e-5)
    assert ft.factor_l1(3 * a, a).item() == pytest.approx(0.0, abs=1e-7)
    big = torch.randn(2, 3, 4, 4, generator=g)  # 2-D, the larger map pooled to the smaller
    pooled = F.avg_pool2d(big, 2)
    assert ft.factor_l1(big, pooled).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dims", [1, 2])
def test_ft_stages_train_the_right_modules(dims):
    s_shp, t_shp = shapes(dims)
    probe = make_probe("ft", s_shp, t_shp)
    mods = ft.build(probe)
    assert mods["enc"][3].out_channels == 3  # k = 0.5 of 6 teacher channels
    g = torch.Generator().manual_seed(0)
    (pre,) = ft.METHODS[0].stages(probe.hp)
    assert not pre.train_student
    s_f, t_f = feats(s_shp, 3, g, grad=True), feats(t_shp, 3, g)
    y = torch.zeros(3, dtype=torch.long)
    pre.loss(make_step("ft", Outputs(torch.zeros(3, 5), s_f), Outputs(torch.zeros(3, 5), t_f), y, mods, stage="paraphraser"))["recon"].backward()
    assert all(p.grad is not None for p in mods["dec"].parameters()) and all(p.grad is None for p in mods["trans"].parameters())
    mods.zero_grad(set_to_none=True)
    mods.train()
    terms = ft.loss(make_step("ft", Outputs(torch.zeros(3, 5, requires_grad=True), s_f), Outputs(torch.zeros(3, 5), t_f), y, mods))
    terms["ft"].backward()
    assert not mods["enc"].training, "the paraphraser is frozen (eval) in the main stage"
    assert all(p.grad is None for p in mods["enc"].parameters())
    assert all(p.grad is not None for p in mods["trans"].parameters())


# --------------------------------------------------------------------------- fsp


def _gram_loop(f1, f2):
    b, c1, n = f1.shape
    c2 = f2.shape[1]
    out = np.zeros((b, c1, c2))
    for i in range(b):
        for p in range(c1):
            for q in range(c2):
                out[i, p, q] = sum(f1[i, p, x] * f2[i, q, x] for x in range(n)) / n
    return out


@pytest.mark.parametrize("dims", [1, 2])
def test_fsp_matrix_with_pooling_matches_loop(dims):
    g = torch.Generator().manual_seed(0)
    f1 = torch.randn(2, 3, *(8,) * dims, generator=g)
    f2 = torch.randn(2, 4, *(4,) * dims, generator=g)
    f1_np = f1.numpy()
    pooled = f1_np.reshape(2, 3, 4, 2).mean(-1) if dims == 1 else f1_np.reshape(2, 3, 4, 2, 4, 2).mean((3, 5))
    want = _gram_loop(pooled.reshape(2, 3, -1), f2.numpy().reshape(2, 4, -1))
    assert fsp.fsp_matrix(f1, f2).numpy() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("dims", [1, 2])
def test_fsp_identity_connector_equals_no_connector_and_zero_for_same(dims):
    s_shp, t_shp = shapes(dims, c_s=4, c_t=4)
    g = torch.Generator().manual_seed(0)
    s_f, t_f = feats(s_shp, 3, g), feats(t_shp, 3, g)
    y = torch.zeros(3, dtype=torch.long)
    plain = fsp.init_loss(make_step("fsp", Outputs(None, s_f), Outputs(None, t_f), y, None, connector=False))["fsp"]
    conn = fsp.build(make_probe("fsp", s_shp, t_shp))
    for c in conn:
        set_identity(c)
    with_conn = fsp.init_loss(make_step("fsp", Outputs(None, s_f), Outputs(None, t_f), y, conn))["fsp"]
    gs = _gram_loop(s_f["stage1"].numpy().reshape(3, 4, -1).reshape(3, 4, 4 ** dims, 2 ** dims).mean(-1) if dims == 1 else
                    F.avg_pool2d(s_f["stage1"], 2).numpy().reshape(3, 4, -1), s_f["stage2"].numpy().reshape(3, 4, -1)) if dims == 2 else None
    assert plain.item() == pytest.approx(with_conn.item(), rel=1e-6)
    if gs is not None:
        gt = _gram_loop(F.avg_pool2d(t_f["stage1"], 2).numpy().reshape(3, 4, -1), t_f["stage2"].numpy().reshape(3, 4, -1))
        assert plain.item() == pytest.approx(50 * np.mean((gs - gt) ** 2), rel=1e-5)
    same = fsp.init_loss(make_step("fsp", Outputs(None, s_f), Outputs(None, s_f), y, None, connector=False))["fsp"]
    assert same.item() == 0.0
    mism = fsp.build(make_probe("fsp", *shapes(dims)))  # 4 → 6 channels through connectors
    assert [c.out_channels for c in mism] == [6, 6]


# --------------------------------------------------------------------------- crd


def _nce_np(a, keys, tau):
    logits = a @ keys.T / tau
    logits -= logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -np.mean(logp[np.arange(len(a)), np.arange(len(a))])


def _crd_identity(d, k, n=0):
    probe = make_probe("crd", {"pool": (d,)}, {"pool": (d,)}, feat_dim=d, nce_k=k)
    probe.num_train = n
    mods = crd.build(probe)
    for lin in (mods.embed_s, mods.embed_t):
        lin.weight.data.copy_(torch.eye(d))
        lin.bias.data.zero_()
    return mods


def test_crd_without_index_is_in_batch_info_nce():
    g = torch.Generator().manual_seed(0)
    mods = _crd_identity(4, 8)
    nrm = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
    s1, t1 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    y = torch.zeros(3, dtype=torch.long)
    step = make_step("crd", Outputs(torch.zeros(3, 5), {"pool": s1}), Outputs(torch.zeros(3, 5), {"pool": t1}), y, mods)
    es1, et1 = nrm(s1.numpy()), nrm(t1.numpy())
    assert crd.crd_term(step).item() == pytest.approx(_nce_np(es1, et1, 0.07) + _nce_np(et1, es1, 0.07), rel=1e-5)


def _bank_nce_np(a, mem, idx, neg, tau):
    out = []
    for i in range(len(a)):
        keys = [mem[idx[i]]] + [mem[j] for j in neg if j != idx[i]]
        logits = np.array(keys) @ a[i] / tau
        logits -= logits.max()
        out.append(-(logits[0] - np.log(np.exp(logits).sum())))
    return np.mean(out)


def test_crd_memory_bank_nce_and_momentum_update_match_numpy():
    d, n = 4, 10
    mods = _crd_identity(d, 16384, n)
    assert mods.memory_s.shape == (n, d) and "memory_t" in mods.state_dict()
    g = torch.Generator().manual_seed(2)
    s1, t1 = torch.randn(3, d, generator=g), torch.randn(3, d, generator=g)
    index = torch.tensor([7, 2, 5])
    mem_s, mem_t = mods.memory_s.clone().numpy(), mods.memory_t.clone().numpy()
    torch.manual_seed(5)
    neg = mods.negatives(torch.device("cpu"))
    assert neg.shape == (n - 1,) and int(neg.min()) >= 0 and int(neg.max()) < n  # nce_k clamped to n − 1
    torch.manual_seed(5)  # the same draw inside crd_term
    step = make_step("crd", Outputs(torch.zeros(3, 5), {"pool": s1}), Outputs(torch.zeros(3, 5), {"pool": t1}),
                     torch.zeros(3, dtype=torch.long), mods)
    step.index = index
    value = crd.crd_term(step).item()
    nrm = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
    es, et = nrm(s1.numpy()), nrm(t1.numpy())
    idx, negs = index.numpy(), neg.numpy()
    want = _bank_nce_np(es, mem_t, idx, negs, 0.07) + _bank_nce_np(et, mem_s, idx, negs, 0.07)
    assert value == pytest.approx(want, rel=1e-5)
    # momentum 0.5 update of the batch's rows only, renormalised
    np.testing.assert_allclose(mods.memory_s[index].numpy(), nrm(0.5 * mem_s[idx] + 0.5 * es), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mods.memory_t[index].numpy(), nrm(0.5 * mem_t[idx] + 0.5 * et), rtol=1e-5, atol=1e-6)
    others = [i for i in range(n) if i not in idx]
    np.testing.assert_array_equal(mods.memory_t[others].numpy(), mem_t[others])


def test_crd_anchor_never_meets_itself_as_a_negative():
    mods = _crd_identity(4, 64, 3)
    x = torch.randn(1, 4)
    step = make_step("crd", Outputs(torch.zeros(1, 5), {"pool": x}), Outputs(torch.zeros(1, 5), {"pool": x}),
                     torch.zeros(1, dtype=torch.long), mods)
    step.index = torch.tensor([1])
    mods.memory_s[:] = 0
    mods.memory_t[:] = 0
    mods.memory_s[1] = F.normalize(x, dim=1)[0]
    mods.memory_t[1] = F.normalize(x, dim=1)[0]
    torch.manual_seed(0)  # 2 negatives from rows {0, 1, 2}; own row masked, others give logit 0
    neg = mods.negatives(torch.device("cpu"))
    k = int((neg != 1).sum())
    tau = 0.5  # a temperature at which the value is well above float32 rounding
    step.hp.tau = tau
    torch.manual_seed(0)
    mods.memory_s[1] = mods.memory_t[1] = F.normalize(x, dim=1)[0]
    v = crd.crd_term(step).item()
    want = 2 * -(1 / tau - np.log(np.exp(1 / tau) + k))
    assert v == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- reviewkd


def _pool_np(a, level):
    b, c, n = a.shape
    return a.reshape(b, c, level, n // level).mean(-1)


def test_reviewkd_hcl_matches_pyramid_by_hand():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    an, bn_ = a.numpy(), b.numpy()
    terms = [np.mean((an - bn_) ** 2)] + [np.mean((_pool_np(an, l) - _pool_np(bn_, l)) ** 2) for l in (4, 2, 1)]
    ws = [1, 0.5, 0.25, 0.125]
    assert reviewkd.hcl(a, b).item() == pytest.approx(sum(w * t for w, t in zip(ws, terms)) / sum(ws), rel=1e-5)
    a2, b2 = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)  # 2-D: level 4 skipped
    full = F.mse_loss(a2, b2).item()
    l2 = F.mse_loss(F.avg_pool2d(a2, 2), F.avg_pool2d(b2, 2)).item()
    l1 = (a2.mean((2, 3)) - b2.mean((2, 3))).pow(2).mean().item()
    assert reviewkd.hcl(a2, b2).item() == pytest.approx((full + 0.5 * l2 + 0.25 * l1) / 1.75, rel=1e-5)
    assert reviewkd.hcl(a, a).item() == 0.0
    assert reviewkd.hcl(torch.ones(1, 3, 8), torch.ones(1, 3, 4)).item() == 0.0  # size mismatch pooled


@pytest.mark.parametrize("dims", [1, 2])
def test_reviewkd_fusion_shapes_and_warmup(dims):
    s_shp, t_shp = shapes(dims)
    mods = reviewkd.build(make_probe("reviewkd", s_shp, t_shp, mid=5))
    assert mods[0].att is not None and mods[1].att is None  # the deepest stage has nothing to fuse
    g = torch.Generator().manual_seed(0)
    s_f, t_f = feats(s_shp, 2, g), feats(t_shp, 2, g)
    out, res = mods[1](s_f["stage2"])
    assert out.shape == t_f["stage2"].shape and res.shape[1] == 5
    out1, _ = mods[0](s_f["stage1"], res)
    assert out1.shape == t_f["stage1"].shape
    y = torch.zeros(2, dtype=torch.long)
    r0 = reviewkd.loss(make_step("reviewkd", Outputs(torch.zeros(2, 5), s_f), Outputs(torch.zeros(2, 5), t_f), y, mods, epoch=0, warmup=4))["review"]
    r3 = reviewkd.loss(make_step("reviewkd", Outputs(torch.zeros(2, 5), s_f), Outputs(torch.zeros(2, 5), t_f), y, mods, epoch=5, warmup=4))["review"]
    assert r0.item() == pytest.approx(r3.item() / 4, rel=1e-5)


# --------------------------------------------------------------------------- darkrank


def _pl(scores_in_order):
    lp = 0.0
    for j in range(len(scores_in_order)):
        lp += scores_in_order[j] - math.log(sum(math.exp(v) for v in scores_in_order[j:]))
    return lp


def _scores_np(f, scale, power):
    e = f / np.linalg.norm(f, axis=1, keepdims=True)
    return np.array([[-scale * np.linalg.norm(e[i] - e[j]) ** power for j in range(len(e))] for i in range(len(e))])


def test_darkrank_soft_and_hard_match_explicit_enumeration():
    g = torch.Generator().manual_seed(0)
    fs, ft_ = torch.randn(5, 6, generator=g).double(), torch.randn(5, 7, generator=g).double()
    S_s, S_t = _scores_np(fs.numpy(), 3.0, 3.0), _scores_np(ft_.numpy(), 3.0, 3.0)
    soft = hard = 0.0
    for q in range(5):
        others = sorted((j for j in range(5) if j != q), key=lambda j: -S_t[q, j])
        hard += -_pl([S_s[q, j] for j in others])
        top = others[:3]
        for perm in itertools.permutations(top):
            lt, ls = _pl([S_t[q, j] for j in perm]), _pl([S_s[q, j] for j in perm])
            soft += math.exp(lt) * (lt - ls)
    y = torch.zeros(5, dtype=torch.long)
    mk = lambda **o: make_step("darkrank", Outputs(torch.zeros(5, 5), {"pool": fs}), Outputs(torch.zeros(5, 5), {"pool": ft_}), y, None, **o)
    assert darkrank.rank_term(mk(variant="soft", top_k=3)).item() == pytest.approx(soft / 5, rel=1e-6)
    assert darkrank.rank_term(mk(variant="hard")).item() == pytest.approx(hard / 5, rel=1e-6)


def test_darkrank_zero_for_same_and_batch_of_one():
    f = torch.randn(4, 3, dtype=torch.double)
    y = torch.zeros(4, dtype=torch.long)
    same = make_step("darkrank", Outputs(None, {"pool": f}), Outputs(None, {"pool": f}), y, None)
    assert darkrank.rank_term(same).item() == pytest.approx(0.0, abs=1e-9)
    one = make_step("darkrank", Outputs(None, {"pool": f[:1]}), Outputs(None, {"pool": f[:1]}), y[:1], None)
    for variant in ("soft", "hard"):
        one.hp.variant = variant
        assert darkrank.rank_term(one).item() == 0.0


def test_darkrank_taps_skip_missing_pool_so_check_explains():
    assert darkrank.METHODS[0].taps(hp("darkrank"), ["stage1"], ["stage1", "pool"]) == []
    with pytest.raises(KdbenchError, match="pool"):
        darkrank.check(make_probe("darkrank", {"pool": (4,)}, {}))


# --------------------------------------------------------------------------- rocket


@pytest.mark.parametrize("dims", [1, 2])
def test_rocket_terms_and_gradient_block(dims):
    s_shp, _ = shapes(dims)
    probe = make_probe("rocket", s_shp, {})
    assert not rocket.METHODS[0].needs_teacher
    mods = rocket.build(probe)
    g = torch.Generator().manual_seed(0)
    s_f = feats(s_shp, 3, g, grad=True)
    z = torch.randn(3, 5, generator=g, requires_grad=True)
    y = torch.tensor([0, 3, 4])
    terms = rocket.loss(make_step("rocket", Outputs(z, s_f), None, y, mods, hint=0.5))
    zb = mods["booster"](s_f["stage1"]).detach().numpy()
    zn = z.detach().numpy()
    ce = lambda l: -np.mean([l[i, y[i]] - np.log(np.exp(l[i]).sum()) for i in range(3)])
    assert terms["ce"].item() == pytest.approx(ce(zn), rel=1e-5)
    assert terms["ce_booster"].item() == pytest.approx(ce(zb), rel=1e-5)
    assert terms["hint"].item() == pytest.approx(0.5 * np.mean((zn - zb) ** 2), rel=1e-5)
    terms["hint"].backward(retain_graph=True)
    assert all(p.grad is None for p in mods.parameters()), "the hint must not move the booster"
    assert z.grad.abs().sum() > 0 and s_f["stage1"].grad is None
    terms["ce_booster"].backward()
    assert s_f["stage1"].grad.abs().sum() > 0  # the booster trains the shared lower layers


# --------------------------------------------------------------------------- adversarial


def _disc_np(disc, x):
    h = x
    for layer in disc:
        if isinstance(layer, torch.nn.Linear):
            h = h @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()
        else:
            h = np.where(h > 0, h, 0.2 * h)
    return h[:, 0]


def test_adversarial_values_and_gradient_signs():
    torch.manual_seed(0)
    mods = adversarial.build(make_probe("adversarial", {}, {}, hidden=8))
    disc = mods["disc"]
    g = torch.Generator().manual_seed(0)
    z_s = torch.randn(4, 5, generator=g, requires_grad=True)
    z_t = torch.randn(4, 5, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    terms = adversarial.loss(make_step("adversarial", Outputs(z_s, {}), Outputs(z_t, {}), y, mods, weight=2.0))
    sm = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)
    oh = np.eye(5)[y.numpy()]
    d_s = _disc_np(disc, np.concatenate([sm(z_s.detach().numpy()), oh], 1))
    d_t = _disc_np(disc, np.concatenate([sm(z_t.detach().numpy()), oh], 1))
    softplus = lambda v: np.log1p(np.exp(v))
    assert terms["disc"].item() == pytest.approx(np.mean(softplus(-d_t)) + np.mean(softplus(d_s)), rel=1e-5)
    assert terms["adv"].item() == pytest.approx(2.0 * np.mean(softplus(-d_s)), rel=1e-5)
    # routing: D's loss moves only D, the fooling term moves only the student
    terms["disc"].backward(retain_graph=True)
    assert z_s.grad is None and z_t.grad is None and all(p.grad is not None for p in disc.parameters())
    d_grads = [p.grad.clone() for p in disc.parameters()]
    disc.zero_grad(set_to_none=True)
    terms["adv"].backward(retain_graph=True)
    assert all(p.grad is None for p in disc.parameters()) and z_s.grad.abs().sum() > 0
    # signs: a small step along −grad raises D's "teacher" score for the student (fooling) ...
    x_s = adversarial.disc_input(z_s, y)
    before = disc(x_s).mean().item()
    with torch.no_grad():
        after = disc(adversarial.disc_input(z_s - 1e-3 * z_s.grad, y)).mean().item()
    assert after > before
    # ... while a step of D along −grad of its own loss lowers that loss (discriminating better)
    with torch.no_grad():
        for p, gr in zip(disc.parameters(), d_grads):
            p -= 1e-3 * gr
    new = adversarial.adversarial_terms(make_step("adversarial", Outputs(z_s, {}), Outputs(z_t, {}), y, mods))[1].item()
    assert new < terms["disc"].item()
