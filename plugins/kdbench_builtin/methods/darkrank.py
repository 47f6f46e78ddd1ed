"""darkrank: Chen et al. 2018, "DarkRank: Accelerating Deep Metric Learning via Cross Sample
Similarities Transfer".

On the L2-normalised pooled features, each sample of the batch is a query and the others its
candidates, scored S(q, i) = −scale·‖e_q − e_i‖₂^power. Permutation probabilities are
Plackett–Luce: P(π|S) = Π_j exp(S_π_j) / Σ_{k≥j} exp(S_π_k).
* soft: KL(P(·|S_t) ‖ P(·|S_s)) over all permutations of the teacher's ``top_k`` nearest
  candidates (the paper restricts the intractable sum over all permutations to a short list);
* hard: ListMLE, −log P(π_t|S_s) for the teacher's ranking π_t of all the batch's candidates.
loss = CE + weight·mean over queries. Embeddings are L2-normalised (deviation: the teacher's and
student's feature dimensions differ, and normalising puts both distances in [0, 2]).

Defaults and settings against the reference code: docs/FIDELITY.md.
"""
import functools
import itertools

import torch
import torch.nn.functional as F

from kdbench.contracts import HParam, Method
from kdbench.losses import as_vectors, check_pool, frozen


def scores(feat, scale, power):
    e = F.normalize(as_vectors(feat), dim=1)
    d = (e[:, None, :] - e[None, :, :]).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    return -scale * d.pow(power)


def pl_log_prob(s):
    """log Plackett–Luce probability of the order of the last axis of ``s`` (best first)."""
    tail = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
    return (s - tail).sum(-1)


def _masked(s_t):
    eye = torch.eye(len(s_t), dtype=torch.bool, device=s_t.device)
    return s_t.masked_fill(eye, float("-inf"))


def hard_loss(s_s, s_t):
    b = len(s_s)
    if b < 2:
        return s_s.sum() * 0
    order = _masked(s_t).argsort(dim=1, descending=True)[:, : b - 1]
    return -pl_log_prob(s_s.gather(1, order)).mean()


@functools.cache
def permutations(k: int, device: torch.device) -> torch.Tensor:
    """All orderings of k items as a [k!, k] index tensor, made once per (k, device): a host→device
    copy inside the step would stop it from being captured as a CUDA graph."""
    return torch.tensor(list(itertools.permutations(range(k))), device=device)


def soft_loss(s_s, s_t, top_k):
    k = min(top_k, len(s_s) - 1)
    if k < 1:
        return s_s.sum() * 0
    idx = _masked(s_t).topk(k, dim=1).indices
    perms = permutations(k, s_s.device)
    lp_s = pl_log_prob(s_s.gather(1, idx)[:, perms])
    lp_t = pl_log_prob(s_t.gather(1, idx)[:, perms])
    return (lp_t.exp() * (lp_t - lp_s)).sum(1).mean()


def rank_term(step):
    hp = step.hp
    s_s = scores(step.student.feats["pool"], hp.scale, hp.power)
    s_t = scores(frozen(step.teacher.feats["pool"]), hp.scale, hp.power).detach()
    return soft_loss(s_s, s_t, hp.top_k) if hp.variant == "soft" else hard_loss(s_s, s_t)


def loss(step):
    return {"ce": F.cross_entropy(step.student.logits, step.y), "rank": step.hp.weight * rank_term(step)}


METHODS = [
    Method(
        name="darkrank",
        loss=loss,
        description="DarkRank: transfer the teacher's ranking of cross-sample similarities (listwise)",
        citation="Chen et al., AAAI 2018",
        taps=lambda hp, s_taps, t_taps: [n for n in ("pool",) if n in s_taps and (t_taps is None or n in t_taps)],
        check=lambda probe: check_pool(probe, "darkrank"),
        hparams=(
            HParam("variant", "soft", "soft: KL over top-k permutations; hard: ListMLE on the teacher's ranking", choices=("soft", "hard")),
            HParam("weight", 1.0, "weight of the ranking term", low=0.0, space=(0.01, 10.0), log=True),
            HParam("scale", 3.0, "score scale α in −α·distance^β", low=0.0, open_low=True, space=(0.5, 10.0), log=True),
            HParam("power", 3.0, "distance exponent β", low=0.0, open_low=True, space=(1.0, 4.0)),
            HParam("top_k", 4, "list length of the soft variant (k! permutations)", low=1, high=6, space=(2, 5)),
        ),
    )
]
