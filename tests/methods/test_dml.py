"""dml: the mutual losses against numpy, each peer's own gradient, the peers built."""
import numpy as np
import pytest
import torch
from torch import nn

from kdbench.contracts import Probe
from kdbench_builtin.methods import dml

from methods.kit import hp_of, kl_np, softmax_np, step_from


class Fixed(nn.Module):
    """A 'peer' returning fixed logits plus a trainable bias."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.bias = nn.Parameter(torch.zeros(logits.shape[1]))

    def forward(self, x):
        return self.logits + self.bias


@pytest.mark.parametrize("k", [2, 3])
def test_dml_loss_matches_numpy_and_each_peer_gets_only_its_own_gradient(k):
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(6, 5, generator=g) for _ in range(k)]
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    peers = dml.Peers([Fixed(z) for z in zs[1:]])
    student = zs[0].clone().requires_grad_()
    terms = dml.loss(step_from(student, None, y, hp_of("dml", peers=k), peers))
    zn = [z.numpy() for z in zs]
    ce = [np.mean(-np.log(softmax_np(z)[np.arange(6), y.numpy()])) for z in zn]
    kl = [np.mean([kl_np(softmax_np(zn[j]), zn[i]) for j in range(k) if j != i]) for i in range(k)]
    assert terms["ce"].item() == pytest.approx(ce[0], rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl[0], rel=1e-5)
    assert terms["peers_ce"].item() == pytest.approx(sum(ce[1:]), rel=1e-5)
    assert terms["peers_kl"].item() == pytest.approx(sum(kl[1:]), rel=1e-5)
    # the other peers are detached: peer 0's KL sends no gradient into the peers
    terms["kl"].backward()
    assert all(p.bias.grad is None for p in peers.peers) and student.grad.abs().sum() > 0


def test_dml_builds_peers_from_new_student_each_different():
    made = iter(range(100))

    def new_student():
        torch.manual_seed(next(made))
        return nn.Linear(3, 2)

    probe = Probe(hp_of("dml", peers=3), 2, (3,), {}, {}, [], [], new_student)
    mods = dml.build(probe)
    assert len(mods.peers) == 2
    assert not torch.equal(mods.peers[0].weight, mods.peers[1].weight)
    assert dml.METHODS[0].peers(mods) == list(mods.peers) and not dml.METHODS[0].needs_teacher
