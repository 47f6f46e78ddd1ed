"""pkt: Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer".

On the pooled feature: cosine similarities of the batch's samples, mapped to [0, 1] by (s+1)/2 and
row-normalised into conditional probabilities P (teacher) and Q (student);
loss = ce_weight·CE + weight·mean_{i,j} P_ij·log((P_ij + ε)/(Q_ij + ε)), ε = 1e-7.
The reference averages over all B² entries (not a per-row sum), hence the large weight 30000.

Defaults and settings against the reference code: docs/FIDELITY.md.
"""
import torch.nn.functional as F

from kdbench.contracts import HParam, Method
from kdbench.losses import as_vectors, ce, ce_weight, check_pool, frozen

EPS = 1e-7


def cond_prob(f):
    e = F.normalize(as_vectors(f), dim=1, eps=EPS)
    sim = (e @ e.t() + 1) / 2
    return sim / sim.sum(1, keepdim=True)


def pkt_term(f_s, f_t):
    p_t, q_s = cond_prob(frozen(f_t)), cond_prob(f_s)
    return (p_t * ((p_t + EPS) / (q_s + EPS)).log()).mean()


def loss(step):
    return {"ce": ce(step), "pkt": step.hp.weight * pkt_term(step.student.feats["pool"], step.teacher.feats["pool"])}


METHODS = [
    Method(
        name="pkt",
        loss=loss,
        description="probabilistic knowledge transfer: match the batch's cosine-similarity distributions",
        citation="Passalis & Tefas, ECCV 2018",
        taps=("pool",),
        check=lambda probe: check_pool(probe, "pkt"),
        hparams=(
            HParam("weight", 30000.0, "weight of the KL term (mean over B² entries)", low=0.0, space=(1e3, 1e5), log=True),
            ce_weight(),
        ),
    )
]
