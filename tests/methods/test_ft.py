"""ft: the factor L1 and which modules each stage trains."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.contracts import Outputs
from kdbench_builtin.methods import ft

from methods.kit import feats, make_step, probe_of, shapes


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
    probe = probe_of("ft", s_shp, t_shp)
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
