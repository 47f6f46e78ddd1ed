"""crd: Tian et al. 2020, "Contrastive Representation Distillation". Settings against the reference
code: docs/FIDELITY.md.

Student and teacher pooled features are embedded (linear → L2-normalise, ``feat_dim``). As in the
reference (RepDistiller), a memory bank holds one student and one teacher embedding per training
sample (``probe.num_train`` rows, initialised uniformly in ±1/√(feat_dim/3)). For a batch with
sample indices ``step.index``:

* the student anchor e_s[i] is contrasted with the teacher memory: positive memory_t[i], and
  ``nce_k`` negatives memory_t[j] at indices drawn uniformly from the bank;
  symmetrically the teacher anchor e_t[i] with the student memory;
* each direction is an InfoNCE loss at temperature τ: −log softmax over [positive, negatives];
* after the loss, the bank rows of the batch are updated with momentum:
  memory[i] ← normalise(momentum·memory[i] + (1 − momentum)·e[i]) (momentum 0.5).

loss = CE + alpha·KD + beta·(ℓ_s + ℓ_t). Two methods, as RepDistiller's two rows: ``crd`` is the CRD
row (``-a 0 -b 0.8``: no KD), ``crd_kd`` the CRD+KD row (``-a 1 -b 0.8``); same hyperparameters.

Deviations from the reference, documented:
* InfoNCE (softmax over 1 + K candidates) instead of the NCE estimator with a constant partition Z
  estimated on the first batch: same positives and negatives, no Z to estimate, no P_n constant;
* negatives are drawn uniformly from the bank (the CRD paper's description) rather than the
  reference loader's default "exact" mode (from other classes only), and one draw of K indices is
  shared by the batch's anchors (the reference draws per anchor: a [B, K, d] gather that makes an
  epoch ~30× slower on CPU; shared, it is one [B, d]×[d, K] product); where the draw hits an
  anchor's own row, that logit is masked out;
* ``nce_k`` is clamped to num_train − 1 (a bank of N samples has N − 1 others);
* where a Step has no ``index`` (a training loop that gives none), the bank cannot be addressed and
  the term falls back to in-batch InfoNCE (the other samples of the batch are the negatives).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.contracts import HParam, Method
from kdbench.losses import as_vectors, ce_plus_optional_kd, check_pool, frozen


class CRDModules(nn.Module):
    def __init__(self, d_s, d_t, feat_dim, nce_k, num_train, momentum):
        super().__init__()
        self.embed_s, self.embed_t = nn.Linear(d_s, feat_dim), nn.Linear(d_t, feat_dim)
        self.nce_k, self.momentum = nce_k, momentum
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        n = max(int(num_train), 0)
        self.register_buffer("memory_s", torch.rand(n, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(n, feat_dim).mul_(2 * stdv).add_(-stdv))

    def negatives(self, device):
        """[K] bank indices drawn uniformly (with replacement), shared by the batch's anchors."""
        n = len(self.memory_t)
        return torch.randint(0, n, (min(self.nce_k, n - 1),), device=device)

    @torch.no_grad()
    def update(self, index, e_s, e_t):
        for bank, e in ((self.memory_s, e_s), (self.memory_t, e_t)):
            mixed = bank[index] * self.momentum + e.detach().to(bank.dtype) * (1 - self.momentum)
            bank[index] = F.normalize(mixed, dim=1)


def bank_nce(anchor, memory, index, neg, tau):
    """Mean over anchors of −log softmax over [memory[index], memory[neg]] at the positive (column
    0); a negative that is the anchor's own row is masked out."""
    pos = (anchor * memory[index]).sum(1, keepdim=True)  # [B, 1]; the bank is a constant
    negs = anchor @ memory[neg].t()  # [B, K]
    negs = negs.masked_fill(neg[None, :] == index[:, None], float("-inf"))
    logits = torch.cat([pos, negs], 1) / tau
    return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long, device=anchor.device))


def info_nce(anchor, keys, tau):
    """In-batch InfoNCE: each anchor's positive is its own key, the other keys are negatives."""
    logits = anchor @ keys.t() / tau
    return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device))


def crd_term(step):
    crd, hp = step.modules, step.hp
    e_s = F.normalize(crd.embed_s(as_vectors(step.student.feats["pool"])), dim=1)
    e_t = F.normalize(crd.embed_t(as_vectors(frozen(step.teacher.feats["pool"]))), dim=1)
    if step.index is None or len(crd.memory_t) < 2:
        return info_nce(e_s, e_t.detach(), hp.tau) + info_nce(e_t, e_s.detach(), hp.tau)
    index = step.index.to(e_s.device)
    neg = crd.negatives(index.device)
    value = bank_nce(e_s, crd.memory_t, index, neg, hp.tau) + bank_nce(e_t, crd.memory_s, index, neg, hp.tau)
    if crd.training:
        crd.update(index, e_s, e_t)
    return value


def build(probe):
    hp = probe.hp
    return CRDModules(math.prod(probe.student_shapes["pool"]), math.prod(probe.teacher_shapes["pool"]), hp.feat_dim,
                      hp.nce_k, probe.num_train, hp.momentum)


def loss(step):
    return ce_plus_optional_kd(step, crd=step.hp.beta * crd_term(step))


def _hparams(alpha):
    return (
        HParam("beta", 0.8, "weight of the contrastive term", low=0.0, space=(0.1, 5.0), log=True),
        HParam("alpha", alpha, "weight of the KD term (crd: 0, the CRD row; crd_kd: 1, the CRD+KD row)",
               low=0.0, space=(0.0, 2.0)),
        HParam("T", 4.0, "KD temperature", low=0.0, open_low=True, space=(1.0, 20.0), log=True),
        HParam("tau", 0.07, "temperature of the contrastive softmax", low=0.0, open_low=True, space=(0.02, 0.5), log=True),
        HParam("feat_dim", 128, "embedding dimension", low=1, high=4096, space=(32, 512), log=True),
        HParam("nce_k", 16384, "negatives per anchor from the memory bank (clamped to training samples − 1)", low=1, high=1 << 20, space=(256, 16384), log=True),
        HParam("momentum", 0.5, "memory-bank update momentum", low=0.0, high=1.0, tune=False),
    )


def _taps(hp, s_taps, t_taps):
    return [n for n in ("pool",) if n in s_taps and (t_taps is None or n in t_taps)]


def _method(name: str, alpha: float, description: str) -> Method:
    """crd and crd_kd: the same method, without and with the KD term (the table's two rows)."""
    return Method(name=name, loss=loss, description=description, citation="Tian et al., ICLR 2020", taps=_taps,
                  check=lambda probe: check_pool(probe, name), build=build, hparams=_hparams(alpha))


METHODS = [
    _method("crd", 0.0, "CRD: contrast student and teacher embeddings against a memory bank of negatives (no KD)"),
    _method("crd_kd", 1.0, "CRD+KD: CRD's contrastive term plus Hinton KD (RepDistiller's CRD+KD row)"),
]
