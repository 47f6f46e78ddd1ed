"""reviewkd: the pyramid (HCL) loss by hand, the fusion shapes and the warm-up."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.contracts import Outputs
from kdbench_builtin.methods import reviewkd

from methods.kit import feats, make_step, probe_of, shapes


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
    mods = reviewkd.build(probe_of("reviewkd", s_shp, t_shp, mid=5))
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
