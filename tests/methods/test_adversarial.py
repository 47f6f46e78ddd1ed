"""adversarial: discriminator and fooling terms against numpy, and where their gradients go."""
import copy

import numpy as np
import pytest
import torch

from kdbench.contracts import Outputs
from kdbench_builtin.methods import adversarial

from methods.kit import make_step, probe_of


def _disc_np(disc, x):
    h = x
    for layer in disc:
        if isinstance(layer, torch.nn.Linear):
            h = h @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()
        else:
            h = np.where(h > 0, h, 0.2 * h)
    return h[:, 0]


def test_adversarial_values_and_gradient_signs():
    torch.manual_seed(0)
    mods = adversarial.build(probe_of("adversarial", {}, {}, hidden=8))
    disc = mods["disc"]
    g = torch.Generator().manual_seed(0)
    z_s = torch.randn(4, 5, generator=g, requires_grad=True)
    z_t = torch.randn(4, 5, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    terms = adversarial.loss(make_step("adversarial", Outputs(z_s, {}), Outputs(z_t, {}), y, mods, weight=2.0))
    sm = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)
    oh = np.eye(5)[y.numpy()]
    d_s = _disc_np(disc, np.concatenate([sm(z_s.detach().numpy()), oh], 1))
    d_t = _disc_np(disc, np.concatenate([sm(z_t.detach().numpy()), oh], 1))
    softplus = lambda v: np.log1p(np.exp(v))
    assert terms["disc"].item() == pytest.approx(np.mean(softplus(-d_t)) + np.mean(softplus(d_s)), rel=1e-5)
    assert terms["adv"].item() == pytest.approx(2.0 * np.mean(softplus(-d_s)), rel=1e-5)
    # routing: D's loss moves only D, the fooling term moves only the student
    terms["disc"].backward(retain_graph=True)
    assert z_s.grad is None and z_t.grad is None and all(p.grad is not None for p in disc.parameters())
    d_grads = [p.grad.clone() for p in disc.parameters()]
    disc.zero_grad(set_to_none=True)
    terms["adv"].backward(retain_graph=True)
    assert all(p.grad is None for p in disc.parameters()) and z_s.grad.abs().sum() > 0
    # signs: a small step along −grad raises D's "teacher" score for the student (fooling) ... — in
    # float64: the step moves the score by about 3e-8, a float32 ulp of it (which way it rounds
    # depends on the CPU's kernels: equal on some machines)
    disc64 = copy.deepcopy(disc).double()
    with torch.no_grad():
        before = disc64(adversarial.disc_input(z_s, y).double()).mean().item()
        after = disc64(adversarial.disc_input(z_s.double() - 1e-3 * z_s.grad.double(), y).double()).mean().item()
    assert after > before
    # ... while a step of D along −grad of its own loss lowers that loss (discriminating better)
    with torch.no_grad():
        for p, gr in zip(disc.parameters(), d_grads):
            p -= 1e-3 * gr
    new = adversarial.adversarial_terms(make_step("adversarial", Outputs(z_s, {}), Outputs(z_t, {}), y, mods))[1].item()
    assert new < terms["disc"].item()
