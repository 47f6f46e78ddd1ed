"""reviewkd: the pyramid (HCL) loss by hand, the fusion shapes and the warm-up."""
import dataclasses

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
def test_reviewkd_reviews_stages_and_pooled_vector_against_teacher_preactivations(dims):
    # mdistiller ReviewKD.py: student feats + pooled feat (as 1×1), abfs built deep → shallow,
    # mid = min(512, in_channels[-1]); teacher preact_feats[1:] + pooled feat; HCL summed
    s_shp, t_shp = shapes(dims)
    probe = probe_of("reviewkd", s_shp, t_shp)
    mods = reviewkd.build(probe)
    pool_c = s_shp["pool"][0]
    assert len(mods) == 3 and [m.att is None for m in mods] == [False, False, True]  # the deepest fuses nothing
    assert mods[0].reduce[0].out_channels == min(512, pool_c)
    assert [m.out[0].out_channels for m in mods] == [6, 6, t_shp["pool"][0]]
    g = torch.Generator().manual_seed(0)
    s_f, t_f = feats(s_shp, 2, g), feats(t_shp, 2, g)
    y = torch.zeros(2, dtype=torch.long)
    step = make_step("reviewkd", Outputs(torch.zeros(2, 5), s_f), Outputs(torch.zeros(2, 5), t_f), y, mods, epoch=300)
    # the same computation written out: pool vector first, then stage2, then stage1
    as_map = lambda v: v.reshape(2, -1, *([1] * dims))  # noqa: E731
    with torch.no_grad():
        out_p, res = mods[2](as_map(s_f["pool"]))
        out_2, res = mods[1](s_f["stage2"], res)
        out_1, _ = mods[0](s_f["stage1"], res)
        want = (reviewkd.hcl(out_1, t_f["stage1_pre"]) + reviewkd.hcl(out_2, t_f["stage2_pre"])
                + F.mse_loss(out_p, as_map(t_f["pool"])))
        got = reviewkd.loss(step)["review"]
    assert out_1.shape == t_f["stage1"].shape and out_p.shape[2:] == (1,) * dims
    assert got.item() == pytest.approx(5.0 * want.item(), rel=1e-5)  # beta 5 (configs/cifar100/reviewkd.yaml)
    with torch.no_grad():
        post = reviewkd.review_term(make_step("reviewkd", Outputs(torch.zeros(2, 5), s_f), Outputs(torch.zeros(2, 5), t_f),
                                              y, mods, teacher_preact=False))
        want_post = (reviewkd.hcl(out_1, t_f["stage1"]) + reviewkd.hcl(out_2, t_f["stage2"])
                     + F.mse_loss(out_p, as_map(t_f["pool"])))
    assert post.item() == pytest.approx(want_post.item(), rel=1e-5)


@pytest.mark.parametrize("epoch,epochs,factor", [(0, 240, 1 / 20), (19, 240, 1.0), (0, 24, 0.5), (1, 24, 1.0),
                                                 (0, 2, 1.0)])
def test_reviewkd_warmup_is_20_of_240_epochs_scaled(monkeypatch, epoch, epochs, factor):
    # mdistiller: min(epoch / WARMUP_EPOCHS, 1) with epochs counted from 1, WARMUP_EPOCHS = 20 of 240
    monkeypatch.setattr(reviewkd, "review_term", lambda step: torch.tensor(1.0))
    y = torch.tensor([0, 1])
    step = make_step("reviewkd", Outputs(torch.zeros(2, 5), {}), Outputs(torch.zeros(2, 5), {}), y, None)
    step = dataclasses.replace(step, epoch=epoch, epochs=epochs)
    assert float(reviewkd.loss(step)["review"]) == pytest.approx(5.0 * factor)  # beta 5
