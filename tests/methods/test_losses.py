"""kdbench.losses, the shared loss pieces: each against an independent computation (numpy, block
means, hand-made tensors)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.contracts import Outputs, Probe, Step
from kdbench.errors import KdbenchError
from kdbench.losses import (ATTENTION_MAPPINGS, STAGE_TAPS, adaptive_pool, as_vectors, attention, batch_norm, ce,
                            ce_plus_optional_kd, ce_weight, check_classes, check_pool, check_stages, conv, frozen,
                            hinton_kd, kd_term, match_size, set_identity, spatial_ratio, stage_names, stage_outputs)

from methods.kit import ce_np, npy, rnd, softmax_np


def _step(z_s, z_t, y, **hp):
    return Step(x=torch.zeros(len(y), 1), y=y, student=Outputs(z_s), teacher=Outputs(z_t),
                hp=SimpleNamespace(**hp), modules=None, epoch=0, epochs=1, stage="main")


def _probe(s_taps, t_taps, num_classes=5):
    shape = lambda taps: {n: (3, 4) for n in taps}  # noqa: E731
    return Probe(SimpleNamespace(), num_classes, (1, 40), shape(s_taps), shape(t_taps), list(s_taps), list(t_taps),
                 lambda: None)


def _kl_rows_np(z_t, z_s, T):
    """T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) of each row."""
    p_t, p_s = softmax_np(npy(z_t) / T), softmax_np(npy(z_s) / T)
    return (p_t * (np.log(p_t) - np.log(p_s))).sum(1) * T * T


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize("T", [1.0, 4.0, 7.5])
def test_kd_term_is_t_squared_kl_batch_mean_or_per_sample(T):
    z_s, z_t = rnd(6, 5), rnd(6, 5, grad=False, seed=3) * 2
    rows = _kl_rows_np(z_t, z_s, T)
    assert kd_term(z_s, z_t, T).item() == pytest.approx(rows.mean(), rel=1e-5)
    per = kd_term(z_s, z_t, T, per_sample=True)
    assert per.shape == (6,)
    np.testing.assert_allclose(npy(per), rows, rtol=1e-4, atol=1e-5)  # float32 sums of opposite signs
    assert kd_term(z_s, z_s.detach().clone(), T).abs().item() < 1e-6


def test_hinton_kd_splits_ce_and_kd_by_alpha():
    z_s, z_t, y = rnd(4, 3), rnd(4, 3, grad=False, seed=1), torch.tensor([0, 2, 1, 1])
    terms = hinton_kd(_step(z_s, z_t, y, alpha=0.75, T=2.0))
    assert list(terms) == ["ce", "kd"]
    assert terms["ce"].item() == pytest.approx(0.25 * ce_np(z_s, y.tolist()), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.75 * _kl_rows_np(z_t, z_s, 2.0).mean(), rel=1e-5)


def test_ce_plus_optional_kd_orders_terms_and_adds_kd_only_when_alpha_is_set():
    z_s, y = rnd(5, 4), torch.tensor([0, 1, 2, 3, 0])
    z_t = rnd(5, 4, seed=2)  # a teacher tensor that could take gradients
    extra = torch.tensor(0.5)
    plain = ce_plus_optional_kd(_step(z_s, z_t, y, alpha=0.0, T=4.0), own=extra)
    assert list(plain) == ["ce", "own"] and plain["own"] is extra
    assert plain["ce"].item() == pytest.approx(ce_np(z_s, y.tolist()), rel=1e-5)
    terms = ce_plus_optional_kd(_step(z_s, z_t, y, alpha=0.3, T=3.0), own=extra)
    assert list(terms) == ["ce", "own", "kd"]
    assert terms["kd"].item() == pytest.approx(0.3 * _kl_rows_np(z_t, z_s, 3.0).mean(), rel=1e-5)
    sum(terms.values()).backward()
    assert z_t.grad is None and z_s.grad.abs().sum() > 0


def test_ce_is_weighted_by_the_ce_weight_hyperparameter():
    h = ce_weight()
    assert (h.name, h.default, h.low, h.tune) == ("ce_weight", 1.0, 0.0, False)
    assert ce_weight(0.5).default == 0.5
    z_s, y = rnd(3, 4), torch.tensor([3, 0, 1])
    assert ce(_step(z_s, None, y, ce_weight=0.4)).item() == pytest.approx(0.4 * ce_np(z_s, y.tolist()), rel=1e-5)


# --------------------------------------------------------------------------- tensors


def test_frozen_is_a_float32_constant_and_as_vectors_one_row_per_sample():
    t = rnd(2, 3, 4).to(torch.bfloat16)
    f = frozen(t)
    assert f.dtype == torch.float32 and not f.requires_grad and torch.equal(f, t.detach().float())
    v = as_vectors(t)
    assert v.shape == (2, 12) and v.dtype == torch.float32
    np.testing.assert_array_equal(npy(v), npy(t.float()).reshape(2, 12))
    assert as_vectors(rnd(2, 5)).shape == (2, 5)  # a pooled vector stays


# --------------------------------------------------------------------------- feature maps


def test_attention_maps_of_a_hand_made_feature_map():
    f = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])  # [B=1, C=2, L=2]
    want = {
        "mean_p": np.array([(1 + 9) / 2, (4 + 0) / 2]),
        "sum_abs": np.array([1 + 3, 2 + 0]),
        "sum_p": np.array([1 + 9, 4 + 0]),
        "max_p": np.array([9, 4]),
    }
    assert set(want) == set(ATTENTION_MAPPINGS)
    for mapping, a in want.items():
        np.testing.assert_allclose(npy(attention(f, 2.0, mapping))[0], a / np.linalg.norm(a), rtol=1e-6)
    with pytest.raises(KdbenchError, match="mapping"):
        attention(f, 2.0, "median")


@pytest.mark.parametrize("big,small", [((2, 3, 8), (4,)), ((2, 3, 4, 6), (2, 3))])
def test_adaptive_pool_and_match_size_take_block_means(big, small):
    f = rnd(*big)
    x = npy(f)
    if len(small) == 1:
        want = x.reshape(2, 3, 4, 2).mean(3)
    else:
        want = x.reshape(2, 3, 2, 2, 3, 2).mean((3, 5))
    np.testing.assert_allclose(npy(adaptive_pool(f, small)), want, rtol=1e-6)
    other = rnd(2, 5, *small, seed=1)
    a, b = match_size(f, other)  # the larger map pooled, the smaller untouched
    np.testing.assert_allclose(npy(a), want, rtol=1e-6)
    assert b is other
    b, a = match_size(other, f)
    assert b is other
    np.testing.assert_allclose(npy(a), want, rtol=1e-6)
    same = rnd(2, 1, *big[2:], seed=2)
    assert all(u is v for u, v in zip(match_size(f, same), (f, same)))


# --------------------------------------------------------------------------- stages


def test_stage_names_orders_numerically():
    feats = {f"stage{i}": rnd(2, 2, 3, seed=i) for i in (10, 2, 1)}
    assert stage_names(feats) == ["stage1", "stage2", "stage10"]


def test_stage_outputs_skip_other_taps_and_follow_stage_order():
    feats = {"pool": rnd(2, 4), "stage2": rnd(2, 3, 2), "stage1_pre": rnd(2, 3, 4), "stem": rnd(2, 3, 8),
             "stage1": rnd(2, 3, 4, seed=9)}
    assert [f is feats[n] for n, f in zip(["stage1", "stage2"], stage_outputs(feats))] == [True, True]
    assert len(stage_outputs(feats)) == 2
    assert STAGE_TAPS == ("stage[0-9]", "stage[0-9][0-9]")


# --------------------------------------------------------------------------- pair checks


def test_check_stages_minimum_and_one_to_one():
    assert check_stages(_probe(["stage2", "stage1", "pool"], ["stage1", "stage2"]), "m") == (
        ["stage1", "stage2"], ["stage1", "stage2"])
    with pytest.raises(KdbenchError, match=r"^m pairs stages one to one: the student has 1"):
        check_stages(_probe(["stage1"], ["stage1", "stage2"]), "m")
    assert check_stages(_probe(["stage1"], ["stage1", "stage2"]), "m", equal=False) == (["stage1"], ["stage1", "stage2"])
    with pytest.raises(KdbenchError, match=r"^m needs at least 2 stage tap"):
        check_stages(_probe(["stage1"], ["stage1"]), "m", minimum=2)
    with pytest.raises(KdbenchError, match=r"^m needs at least 1 stage tap"):
        check_stages(_probe(["pool"], ["stage1"]), "m", equal=False)


def test_check_pool_names_the_network_without_it():
    check_pool(_probe(["pool", "stage1"], ["pool"]), "m")
    with pytest.raises(KdbenchError, match="m needs the 'pool' tap .*the teacher does not provide"):
        check_pool(_probe(["pool"], ["stage1"]), "m")
    with pytest.raises(KdbenchError, match="the student does not provide"):
        check_pool(_probe([], ["pool"]), "m")


def test_check_classes():
    check_classes(_probe([], [], num_classes=2), "m")
    check_classes(_probe([], [], num_classes=3), "m", minimum=3)
    with pytest.raises(KdbenchError, match="m needs at least 3 classes, the dataset has 2"):
        check_classes(_probe([], [], num_classes=2), "m", minimum=3)


# --------------------------------------------------------------------------- connectors


def test_conv_and_batch_norm_follow_the_spatial_dims():
    c1, c2 = conv(1, 3, 5), conv(2, 3, 5, 3, 2, 1, bias=True)
    assert isinstance(c1, nn.Conv1d) and c1.kernel_size == (1,) and c1.bias is None
    assert isinstance(c2, nn.Conv2d) and (c2.kernel_size, c2.stride, c2.padding) == ((3, 3), (2, 2), (1, 1))
    assert c2.bias is not None and c2(torch.zeros(1, 3, 8, 8)).shape == (1, 5, 4, 4)
    assert isinstance(batch_norm(1, 4), nn.BatchNorm1d) and isinstance(batch_norm(2, 4), nn.BatchNorm2d)
    assert batch_norm(2, 4).num_features == 4


@pytest.mark.parametrize("s,t,r", [((4, 4), (4, 4), 1), ((8, 8), (4, 4), 2), ((9,), (3,), 3), ((4, 4), (8, 8), 0.5),
                                   ((8, 4), (4, 4), None), ((8,), (3,), None), ((2, 8), (4, 4), None)])
def test_spatial_ratio(s, t, r):
    assert spatial_ratio(s, t) == r


@pytest.mark.parametrize("dims", [1, 2])
def test_set_identity_makes_a_1x1_conv_the_identity(dims):
    c = conv(dims, 4, 4, bias=True)
    set_identity(c)
    x = rnd(2, 4, *(5,) * dims)
    assert torch.equal(c(x), x) and not c.bias.any()
    wide = conv(dims, 3, 5)
    set_identity(wide)
    x = rnd(2, 3, *(5,) * dims, seed=1)
    out = wide(x)
    assert torch.equal(out[:, :3], x) and not out[:, 3:].any()
    assert F.mse_loss(out[:, :3], x).item() == 0.0
