"""at_grad: the input-gradient term against the closed form of a linear network."""
import numpy as np
import pytest
import torch

from kdbench.contracts import Outputs
from kdbench.errors import KdbenchError
from kdbench_builtin.methods import at_grad

from methods.kit import method, npy, probe_of, rnd, softmax_np, step_of


class Linear(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x):
        return Outputs(x.flatten(1) @ self.w.t())


def test_at_grad_closed_form_and_gradients():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 2, 4, generator=g), torch.tensor([0, 2, 1])  # input [B, C, L]
    s, t = Linear(torch.randn(3, 8, generator=g)), Linear(torch.randn(3, 8, generator=g))
    st = step_of("at_grad", z_s=s(x).logits, z_t=t(x).logits.detach(), y=y, ncls=3, beta=2.0)
    st.x = x
    st.student_net, st.teacher_net = s, t
    out = method("at_grad").loss(st)

    def J(w):  # ∂CE_i/∂x_i = (softmax(W x_i) − e_{y_i})ᵀ W for a linear net
        w = npy(w)
        xs = x.flatten(1).double().numpy()
        p = softmax_np(xs @ w.T)
        p[np.arange(3), y.numpy()] -= 1
        return p @ w

    ref = 2.0 / 2 * ((J(s.w) - J(t.w)) ** 2).sum(1).mean()
    assert out["at_grad"].item() == pytest.approx(ref, rel=1e-5)
    sum(out.values()).backward()
    assert s.w.grad is not None and s.w.grad.abs().sum() > 0
    assert t.w.grad is None  # the teacher's gradient map never updates the teacher
    # equal networks: zero
    st.teacher_net = Linear(s.w.detach().clone())
    assert method("at_grad").loss(st)["at_grad"].item() < 1e-12
    # 2-D inputs work too
    x2 = torch.randn(2, 1, 2, 2, generator=g)
    assert at_grad.grad_at_term(Linear(torch.randn(3, 4)), Linear(torch.randn(3, 4)), x2, torch.tensor([0, 1])) > 0


def test_at_grad_refuses_without_networks():
    pr = probe_of("at_grad", {}, {})
    method("at_grad").check(pr)  # the engine's Step carries the networks
    with pytest.raises(KdbenchError, match="student_net"):
        at_grad.check(pr, step_fields={"x", "y"})  # an engine whose Step lacks them is refused
    with pytest.raises(KdbenchError, match="at_grad needs"):
        method("at_grad").loss(step_of("at_grad", z_s=rnd(2, 5)))
