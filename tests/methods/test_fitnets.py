"""fitnets: the hint pair, RepDistiller's regressors, the CE + hint default and the paper's two stages."""
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
def test_fitnets_regressors_are_repdistillers_convreg(dims):
    # RepDistiller models/util.py ConvReg: s_H == 2·t_H → Conv2d(k=3, stride=2, padding=1);
    # s_H·2 == t_H → ConvTranspose2d(k=4, stride=2, padding=1); both with bias, then BN, ReLU
    g = torch.Generator().manual_seed(0)
    s_shp, t_shp = shapes(dims, c_s=3, c_t=3, s1=8, s2=4)
    t_shp = {**t_shp, "stage1": (3,) + (4,) * dims}
    mods = fitnets.build(probe_of("fitnets", s_shp, t_shp))
    conv = mods["reg"][0]
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3,) * dims, (2,) * dims, (1,) * dims)
    assert conv.bias is not None and isinstance(mods["reg"][2], torch.nn.ReLU)
    # centre tap only: output i reads input 2i (stride 2, padding 1, kernel 3)
    conv.weight.data.zero_()
    conv.bias.data.zero_()
    for c in range(3):
        conv.weight.data[(c, c) + (1,) * dims] = 1.0
    eval_identity_bn(mods["reg"][1])
    s = torch.rand(2, *s_shp["stage1"], generator=g)
    t = torch.rand(2, *t_shp["stage1"], generator=g)
    s_np = s.numpy()
    picked = s_np[:, :, ::2] if dims == 1 else s_np[:, :, ::2, ::2]
    step = make_step("fitnets", Outputs(torch.zeros(2, 5), {"stage1": s, "stage2": s}),
                     Outputs(torch.zeros(2, 5), {"stage1": t, "stage2": t}), torch.zeros(2, dtype=torch.long), mods)
    assert fitnets.hint_loss(step)["hint"].item() == pytest.approx(100 * np.mean((picked - t.numpy()) ** 2), rel=1e-5)
    # student map 2x smaller: a 4-tap stride-2 transposed conv; taps [0, 1, 1, 0] per axis give
    # nearest upsampling (output 2i and 2i+1 read input i)
    t_up = {**t_shp, "stage1": (3,) + (16,) * dims}
    mods = fitnets.build(probe_of("fitnets", s_shp, t_up))
    tconv = mods["reg"][0]
    assert isinstance(tconv, (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d))
    assert (tconv.kernel_size, tconv.stride, tconv.padding) == ((4,) * dims, (2,) * dims, (1,) * dims)
    tconv.weight.data.zero_()
    tconv.bias.data.zero_()
    taps = torch.tensor([0.0, 1.0, 1.0, 0.0])
    kernel = taps if dims == 1 else torch.outer(taps, taps)
    for c in range(3):
        tconv.weight.data[c, c] = kernel
    eval_identity_bn(mods["reg"][1])
    t2 = torch.rand(2, *t_up["stage1"], generator=g)
    up = np.repeat(s_np, 2, axis=2) if dims == 1 else np.repeat(np.repeat(s_np, 2, axis=2), 2, axis=3)
    step = make_step("fitnets", Outputs(torch.zeros(2, 5), {"stage1": s, "stage2": s}),
                     Outputs(torch.zeros(2, 5), {"stage1": t2, "stage2": t2}), torch.zeros(2, dtype=torch.long), mods)
    assert fitnets.hint_loss(step)["hint"].item() == pytest.approx(100 * np.mean((up - t2.numpy()) ** 2), rel=1e-5)
    # larger by a non-multiple: a valid conv of kernel 1 + s − t (ConvReg's third case)
    odd = fitnets.build(probe_of("fitnets", {"stage1": (3,) + (7,) * dims}, {"stage1": (3,) + (4,) * dims}))
    assert odd["reg"][0].kernel_size == (4,) * dims and odd["reg"][0].stride == (1,) * dims


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


Z_S = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
Z_T = np.array([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
Y = np.array([1, 2])


def test_fitnets_default_is_repdistillers_ce_plus_hint_every_epoch():
    # RepDistiller scripts/run_cifar_distill.sh: --distill hint -a 0 -b 100 (-r 1): CE + 100·MSE, no KD,
    # no separate stage
    assert fitnets.METHODS[0].stages(hp_of("fitnets")) == []
    s_shp, t_shp = shapes(2, c_s=4, c_t=4)
    mods = fitnets.build(probe_of("fitnets", s_shp, t_shp))
    set_identity(mods["reg"][0])
    eval_identity_bn(mods["reg"][1])
    g = torch.Generator().manual_seed(3)
    s_f, t_f = feats(s_shp, 2, g), feats(t_shp, 2, g)
    z_s = np.array([[1.0, 2.0, 0.5, 0, 0], [0.0, -1.0, 3.0, 0, 0]])
    step = make_step("fitnets", Outputs(torch.tensor(z_s), s_f), Outputs(torch.zeros(2, 5), t_f), torch.tensor(Y), mods)
    terms = fitnets.loss(step)
    assert set(terms) == {"ce", "hint"}
    ce = -np.mean(np.log(_softmax(z_s)[np.arange(2), Y]))
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["hint"].item() == pytest.approx(_fitnets_value(s_f["stage1"].numpy(), t_f["stage1"].numpy(), 100.0), rel=1e-5)


def test_fitnets_paper_variant_is_hint_stage_then_hinton_kd():
    (stage,) = fitnets.METHODS[0].stages(hp_of("fitnets", variant="paper"))
    assert (stage.name, stage.epochs, stage.ref_epochs) == ("hint", "hint_epochs", 240)
    T, a = 4.0, 0.9
    ce = -np.mean(np.log(_softmax(Z_S)[np.arange(2), Y]))
    p_t, p_s = _softmax(Z_T / T), _softmax(Z_S / T)
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s))) / 2 * T * T
    step = make_step("fitnets", Outputs(torch.tensor(Z_S), {}), Outputs(torch.tensor(Z_T), {}), torch.tensor(Y), None,
                     variant="paper")
    terms = fitnets.loss(step)
    assert set(terms) == {"ce", "kd"}
    assert terms["ce"].item() == pytest.approx((1 - a) * ce, rel=1e-6)
    assert terms["kd"].item() == pytest.approx(a * kl, rel=1e-6)
