"""dml: Zhang et al. 2018, "Deep Mutual Learning".

``peers`` students (the run's student is peer 0, the others are built with ``probe.new_student()``,
each from its own seed) learn together, no frozen teacher. Peer k minimises
CE(z_k, y) + weight · 1/(K−1) · Σ_{l≠k} T²·KL(softmax(z_l/T) ‖ softmax(z_k/T)), the other peers'
outputs detached (each peer treats the others as fixed targets, as the paper's alternating update
does within one step). All peers are optimised by the one optimiser (their losses are summed; the
detaching keeps each peer's gradient its own). Every peer's accuracy is reported
(``peer{i}_val_top1``, ``peer{i}_test_top1``; ``test_top1`` is peer 0's).

Terms: ``ce``/``kl`` are peer 0's, ``peers_ce``/``peers_kl`` the sum over the other peers.

Defaults and settings against the reference code: docs/FIDELITY.md.
"""
import torch.nn.functional as F
from torch import nn

from kdbench.contracts import HParam, Method
from kdbench.losses import frozen, kd_term


class Peers(nn.Module):
    def __init__(self, nets):
        super().__init__()
        self.peers = nn.ModuleList(nets)


def mutual_terms(logits, y, T, weight):
    """Per peer (CE, weighted mean KL toward the other, detached, peers)."""
    out = []
    k = len(logits)
    for i, z in enumerate(logits):
        kl = sum(kd_term(z, frozen(logits[j]), T) for j in range(k) if j != i) / (k - 1)
        out.append((F.cross_entropy(z, y), weight * kl))
    return out


def build(probe):
    return Peers([probe.new_student() for _ in range(probe.hp.peers - 1)])


def loss(step):
    hp = step.hp
    logits = [step.student.logits] + [net(step.x) for net in step.modules.peers]
    terms = mutual_terms(logits, step.y, hp.T, hp.weight)
    out = {"ce": terms[0][0], "kl": terms[0][1]}
    if len(terms) > 1:
        out["peers_ce"] = sum(ce for ce, _ in terms[1:])
        out["peers_kl"] = sum(kl for _, kl in terms[1:])
    return out


METHODS = [
    Method(
        name="dml",
        loss=loss,
        description="deep mutual learning: peer students teach each other (no frozen teacher)",
        citation="Zhang et al., CVPR 2018",
        build=build,
        needs_teacher=False,
        peers=lambda modules: list(modules.peers),
        hparams=(
            HParam("peers", 2, "number of peer students, the run's student included", low=2, high=16, tune=False),
            HParam("T", 1.0, "softmax temperature of the mutual KL", low=0.0, open_low=True, space=(1.0, 8.0), log=True),
            HParam("weight", 1.0, "weight of the mutual KL term", low=0.0, space=(0.1, 4.0), log=True),
        ),
    )
]
