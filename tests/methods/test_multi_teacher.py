"""multi_teacher: the averaged soft target against numpy; no gradient reaches a teacher."""
import numpy as np
import pytest
import torch

from kdbench.contracts import Outputs
from kdbench_builtin.methods import multi_teacher

from methods.kit import hp_of, softmax_np, step_from


def test_multi_teacher_loss_matches_numpy_and_no_gradient_reaches_the_teachers():
    g = torch.Generator().manual_seed(1)
    z_s = torch.randn(4, 5, generator=g).requires_grad_()
    z_t = [torch.randn(4, 5, generator=g).requires_grad_() for _ in range(3)]
    y = torch.tensor([1, 0, 4, 2])
    hp = hp_of("multi_teacher")
    assert (hp.T, hp.a, hp.b) == (20.0, 0.1, 0.9)
    terms = multi_teacher.loss(step_from(z_s, z_t[0], y, hp, teachers=[Outputs(z) for z in z_t[1:]]))
    T = hp.T
    q = np.mean([softmax_np(z.detach().numpy() / T) for z in z_t], 0)
    target = 0.1 * np.eye(5)[y.numpy()] + 0.9 * q
    log_p = np.log(softmax_np(z_s.detach().numpy() / T))
    want = T * T * np.mean(-(target * log_p).sum(1))
    assert sum(terms.values()).item() == pytest.approx(want, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(T * T * 0.1 * np.mean(-log_p[np.arange(4), y.numpy()]), rel=1e-5)
    sum(terms.values()).backward()
    assert all(z.grad is None for z in z_t) and z_s.grad.abs().sum() > 0


def test_multi_teacher_with_one_teacher_uses_it_alone():
    g = torch.Generator().manual_seed(2)
    z_s, z_t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    y = torch.tensor([0, 1, 2])
    hp = hp_of("multi_teacher", T=2.0)
    one = multi_teacher.loss(step_from(z_s, z_t, y, hp))
    same = multi_teacher.loss(step_from(z_s, z_t, y, hp, teachers=[Outputs(z_t.clone())]))
    assert sum(one.values()).item() == pytest.approx(sum(same.values()).item(), rel=1e-6)
