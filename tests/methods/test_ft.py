"""ft: RepDistiller's factor (channel mean of F², normalised) and the paper's, the paraphraser and
translator layouts, the paraphraser's learning rate, and which modules each stage trains."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.contracts import Outputs
from kdbench.core import plugins
from kdbench.core.plan import RunConfig, make_plan
from kdbench_builtin.methods import ft

from methods.kit import feats, hp_of, make_step, probe_of, shapes


def _normed(v):
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_ft_factor_l1_matches_numpy_for_both_variants():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    an, bn_ = a.numpy(), b.numpy()
    # RepDistiller distiller_zoo/FT.py: factor = normalize((F ** 2).mean(1).view(B, -1)); L1 mean (p2=1)
    fa, fb = _normed((an ** 2).mean(1).reshape(2, -1)), _normed((bn_ ** 2).mean(1).reshape(2, -1))
    assert ft.factor_l1(a, b).item() == pytest.approx(np.mean(np.abs(fa - fb)), rel=1e-5)
    # the paper's form: all C·H·W values normalised
    pa, pb = _normed(an.reshape(2, -1)), _normed(bn_.reshape(2, -1))
    assert ft.factor_l1(a, b, "paper").item() == pytest.approx(np.mean(np.abs(pa - pb)), rel=1e-5)
    assert ft.factor_l1(3 * a, a).item() == pytest.approx(0.0, abs=1e-7)
    big = torch.randn(2, 3, 8, 8, generator=g)  # the larger factor map pooled to the smaller
    assert ft.factor_l1(big, F.avg_pool2d(big, 2)).item() == pytest.approx(0.0, abs=1e-6)


def test_ft_modules_follow_repdistillers_paraphraser_and_translator():
    # models/util.py: Paraphraser(k=0.5, use_bn=False): 3 convs C→C→k→k, 3 transposed convs k→k→C→C;
    # Translator(use_bn=True): 3 convs C_s→C_s→k→k with BN; LeakyReLU(0.1) after each
    mods = ft.build(probe_of("ft", *shapes(2, c_s=4, c_t=7)))
    kinds = lambda seq: [type(m).__name__ for m in seq]  # noqa: E731
    assert kinds(mods["enc"]) == ["Conv2d", "LeakyReLU"] * 3
    assert kinds(mods["dec"]) == ["ConvTranspose2d", "LeakyReLU"] * 3
    assert kinds(mods["trans"]) == ["Conv2d", "BatchNorm2d", "LeakyReLU"] * 3
    convs = [m for m in mods["enc"] if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(7, 7), (7, 3), (3, 3)]  # k = int(0.5·7)
    dec = [m for m in mods["dec"] if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels) for c in dec] == [(3, 3), (3, 7), (7, 7)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs + dec)


def test_ft_paraphraser_lr_and_length_per_student(env):
    reg = plugins.registry()
    res = make_plan(RunConfig(method="ft", dataset="cifar100", teacher="resnet32x4", student="resnet8x4"), reg)
    mob = make_plan(RunConfig(method="ft", dataset="cifar100", teacher="resnet32x4", student="mobilenetv2"), reg)
    assert (res.hp["para_lr"], res.hp["para_epochs"]) == (0.01, 30)
    assert mob.hp["para_lr"] == 0.0 and "helper/pretrain.py" in res.hp_source
    (stage,) = ft.METHODS[0].stages(hp_of("ft"))
    assert stage.lr_for(hp_of("ft", para_lr=0.01), 0.05) == 0.01 and stage.lr_for(hp_of("ft"), 0.05) == 0.05


@pytest.mark.parametrize("dims", [1, 2])
def test_ft_stages_train_the_right_modules(dims):
    s_shp, t_shp = shapes(dims)
    probe = probe_of("ft", s_shp, t_shp)
    mods = ft.build(probe)
    g = torch.Generator().manual_seed(0)
    (pre,) = ft.METHODS[0].stages(probe.hp)
    assert not pre.train_student
    s_f, t_f = feats(s_shp, 3, g, grad=True), feats(t_shp, 3, g)
    y = torch.zeros(3, dtype=torch.long)
    recon = pre.loss(make_step("ft", Outputs(torch.zeros(3, 5), s_f), Outputs(torch.zeros(3, 5), t_f), y, mods,
                               stage="paraphraser"))["recon"]
    f_t = t_f["stage2"]
    assert recon.item() == pytest.approx(F.mse_loss(mods["dec"](mods["enc"](f_t)), f_t).item(), rel=1e-6)
    recon.backward()
    assert all(p.grad is not None for p in mods["dec"].parameters()) and all(p.grad is None for p in mods["trans"].parameters())
    mods.zero_grad(set_to_none=True)
    mods.train()
    terms = ft.loss(make_step("ft", Outputs(torch.zeros(3, 5, requires_grad=True), s_f), Outputs(torch.zeros(3, 5), t_f), y, mods))
    terms["ft"].backward()
    assert not mods["enc"].training, "the paraphraser is frozen (eval) in the main stage"
    assert all(p.grad is None for p in mods["enc"].parameters())
    assert all(p.grad is not None for p in mods["trans"].parameters())
    with torch.no_grad():
        want = 200 * ft.factor_l1(mods["trans"](s_f["stage2"]), mods["enc"](t_f["stage2"])).item()
    assert terms["ft"].item() == pytest.approx(want, rel=1e-5)
