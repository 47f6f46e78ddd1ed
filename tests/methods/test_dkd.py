"""dkd: TCKD and NCKD against per-sample softmaxes, and the warm-up."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from kdbench.core.capture import Ramps
from methods.kit import ce_np, method, npy, rnd, softmax_np, step_of


def dkd_np(zs, zt, y, T):
    zs, zt = npy(zs) / T, npy(zt) / T
    tck = nck = 0.0
    for i in range(len(y)):
        ps, pt = softmax_np(zs[i]), softmax_np(zt[i])
        a, b = pt[y[i]], ps[y[i]]
        tck += a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
        qs, qt = softmax_np(np.delete(zs[i], y[i])), softmax_np(np.delete(zt[i], y[i]))
        nck += (qt * np.log(qt / qs)).sum()
    B = len(y)
    return tck / B * T * T, nck / B * T * T


@pytest.mark.parametrize("epoch,epochs,factor", [(0, 240, 1 / 20), (19, 240, 1.0), (0, 24, 0.5), (1, 24, 1.0),
                                                 (0, 2, 1.0)])
@pytest.mark.parametrize("in_a_run", [False, True])
def test_dkd_value_and_warmup(epoch, epochs, factor, in_a_run):
    """By hand, and as in a run, where the warm-up factor is the engine's device scalar set at the
    epoch's start (``Step.ramp``: a captured step keeps its graph across epochs)."""
    zs, zt = rnd(4, 6), rnd(4, 6, grad=False, seed=3) * 2
    y = torch.tensor([0, 5, 2, 2])
    step = step_of("dkd", z_s=zs, z_t=zt, y=y, epoch=epoch, epochs=epochs)
    if in_a_run:
        ramps = Ramps(torch.device("cpu"))
        dataclasses.replace(step, ramps=ramps, epoch=0).ramp(20 * epochs / 240)  # made at epoch 0
        ramps.set_epoch(epoch)
        step = dataclasses.replace(step, ramps=ramps)
    out = method("dkd").loss(step)
    tck, nck = dkd_np(zs, zt, y.tolist(), 4.0)
    assert out["tckd"].item() == pytest.approx(factor * 1.0 * tck, rel=1e-4)
    assert out["nckd"].item() == pytest.approx(factor * 8.0 * nck, rel=1e-4)
    assert out["ce"].item() == pytest.approx(ce_np(zs, y), rel=1e-5)
    if in_a_run:  # one device scalar, the engine's, and epoch 0's value was set to this epoch's
        assert list(ramps.values) == [20 * epochs / 240]


def test_dkd_zero_and_batch_of_one():
    z = rnd(1, 5)
    out = method("dkd").loss(step_of("dkd", z_s=z, z_t=z.detach().clone(), y=torch.tensor([3])))
    assert abs(out["tckd"].item()) < 1e-6 and abs(out["nckd"].item()) < 1e-6
