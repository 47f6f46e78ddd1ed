"""rocket: the three terms against numpy and the hint's gradient block."""
import numpy as np
import pytest
import torch

from kdbench.contracts import Outputs
from kdbench_builtin.methods import rocket

from methods.kit import feats, make_step, probe_of, shapes


@pytest.mark.parametrize("dims", [1, 2])
def test_rocket_terms_and_gradient_block(dims):
    s_shp, _ = shapes(dims)
    probe = probe_of("rocket", s_shp, {})
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
