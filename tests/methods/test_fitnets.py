"""fitnets: the hint pair, the three regressor kinds, the Hinton-KD main stage."""
import numpy as np
import pytest
import torch

from kdbench.contracts import Outputs
from kdbench.errors import KdbenchError
from kdbench.losses import set_identity
from kdbench_builtin.methods import fitnets

from methods.kit import eval_identity_bn, feats, hp_of, make_step, probe_of, shapes


def test_fitnets_auto_picks_middle_stage():
    names = ["stage1", "stage2"]
    assert fitnets.pair(hp_of("fitnets"), names, names) == ("stage1", "stage1")
    three = ["stage1", "stage2", "stage3", "pool"]
    assert fitnets.pair(hp_of("fitnets"), three, three) == ("stage2", "stage2")
    assert fitnets.pair(hp_of("fitnets", hint=3, guided=1), three, three) == ("stage1", "stage3")
    with pytest.raises(KdbenchError):
        fitnets.check(probe_of("fitnets", *shapes(1), hint=4))


def _fitnets_value(s, t, weight):
    return weight * np.mean((np.maximum(s, 0) - t) ** 2)


@pytest.mark.parametrize("dims", [1, 2])
def test_fitnets_hint_identity_regressor(dims):
    s_shp, t_shp = shapes(dims, c_s=4, c_t=4)
    mods = fitnets.build(probe_of("fitnets", s_shp, t_shp))
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
    mods = fitnets.build(probe_of("fitnets", s_shp, t_shp))
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
    mods = fitnets.build(probe_of("fitnets", s_shp, t_up))
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
