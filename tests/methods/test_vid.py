"""vid: the Gaussian NLL through an identity regressor, pooling and channel mapping."""
import math

import numpy as np
import pytest
import torch

from kdbench.contracts import Outputs
from kdbench.losses import set_identity
from kdbench_builtin.methods import vid

from methods.kit import feats, make_step, probe_of, shapes


def _identity_vid(mod):
    for layer in mod.mu:
        if hasattr(layer, "weight"):
            assert layer.bias is None  # RepDistiller VID.py conv1x1: bias=False
            set_identity(layer)


@pytest.mark.parametrize("dims", [1, 2])
def test_vid_identity_regressor_matches_gaussian_nll(dims):
    s_shp, t_shp = shapes(dims, c_s=3, c_t=3)
    mods = vid.build(probe_of("vid", s_shp, t_shp))
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


def test_vid_pools_larger_student_map_then_regresses():
    # RepDistiller VID.py: adaptive_avg_pool2d to the smaller size first, then the regressor
    s_shp = {"stage1": (3, 8)}
    t_shp = {"stage1": (2, 4)}
    mods = vid.build(probe_of("vid", s_shp, t_shp))
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 3, 8, generator=g), torch.randn(1, 2, 4, generator=g)  # a batch of one
    step = make_step("vid", Outputs(torch.zeros(1, 5), {"stage1": s}), Outputs(torch.zeros(1, 5), {"stage1": t}), torch.zeros(1, dtype=torch.long), mods)
    w = [m.weight.detach().double().numpy()[:, :, 0] for m in mods[0].mu if hasattr(m, "weight")]
    x = s.double().numpy()[0].reshape(3, 4, 2).mean(-1)  # pooled first: [3, 4]
    mu = w[2] @ np.maximum(w[1] @ np.maximum(w[0] @ x, 0), 0)
    want = np.mean(0.5 * ((mu - t.double().numpy()[0]) ** 2 / 5.0 + math.log(5.0)))
    assert vid.vid_term(step).item() == pytest.approx(want, rel=1e-5)
    wide = vid.build(probe_of("vid", {"stage1": (3, 8)}, {"stage1": (7, 8)}))
    assert wide[0].mu(torch.rand(2, 3, 8)).shape == (2, 7, 8)
