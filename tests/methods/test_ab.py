"""ab: the activation-boundary margin loss against a loop, and its CE-only main stage."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.contracts import Outputs
from kdbench.losses import set_identity
from kdbench_builtin.methods import ab

from methods.kit import eval_identity_bn, feats, make_step, probe_of, shapes


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
    mods = ab.build(probe_of("ab", s_shp, t_shp))
    # RepDistiller's Connector: the identity where the student map already has the teacher's shape
    assert all(isinstance(m, torch.nn.Identity) for m in mods)
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


@pytest.mark.parametrize("dims", [1, 2])
def test_ab_connector_where_shapes_differ_is_conv_with_bias_and_bn(dims):
    # RepDistiller models/util.py Connector: ConvReg(s, t, use_relu=False) — conv (bias) + BN, no ReLU
    s_shp, t_shp = shapes(dims, c_s=3, c_t=5)
    mods = ab.build(probe_of("ab", s_shp, t_shp))
    for seq in mods:
        assert [type(m).__name__ for m in seq] == [f"Conv{dims}d", f"BatchNorm{dims}d"]
        assert seq[0].bias is not None and seq[0].kernel_size == (1,) * dims
        set_identity(seq[0])
        eval_identity_bn(seq[1])
    g = torch.Generator().manual_seed(0)
    s_f, t_f = feats(s_shp, 2, g), feats(t_shp, 2, g)
    step = make_step("ab", Outputs(torch.zeros(2, 5), s_f), Outputs(torch.zeros(2, 5), t_f),
                     torch.zeros(2, dtype=torch.long), mods, stage="init")
    pad = lambda a: np.concatenate([a, np.zeros((a.shape[0], 2) + a.shape[2:], a.dtype)], 1)  # noqa: E731
    want = (0.5 * _ab_loop(pad(s_f["stage1_pre"].numpy()), t_f["stage1_pre"].numpy(), 1.0)
            + _ab_loop(pad(s_f["stage2_pre"].numpy()), t_f["stage2_pre"].numpy(), 1.0)) / 2 * 3 / 1000
    assert ab.init_loss(step)["ab"].item() == pytest.approx(want, rel=1e-5)
