"""fsp: FSP matrices against loops, connectors, the pair checks."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.contracts import Outputs
from kdbench.errors import KdbenchError
from kdbench.losses import set_identity
from kdbench_builtin.methods import fsp

from methods.kit import feats, make_step, probe_of, shapes


def test_fsp_single_stage_rejected_and_matching_channels_accepted():
    with pytest.raises(KdbenchError):
        fsp.check(probe_of("fsp", {"stage1": (4, 8)}, {"stage1": (4, 8)}))
    fsp.check(probe_of("fsp", *shapes(1, c_s=4, c_t=4), connector=False))
    assert fsp.build(probe_of("fsp", *shapes(1, c_s=4, c_t=4), connector=False)) is None


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
    conn = fsp.build(probe_of("fsp", s_shp, t_shp))
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
    mism = fsp.build(probe_of("fsp", *shapes(dims)))  # 4 → 6 channels through connectors
    assert [c.out_channels for c in mism] == [6, 6]
