"""crd: Tian et al. 2020, "Contrastive Representation Distillation".

Student and teacher pooled features are embedded (linear → L2-normalise, ``feat_dim``). Per
direction an InfoNCE loss at temperature τ: the student anchor's positive is the teacher
embedding of the same sample; negatives are the other teacher embeddings of the batch plus a FIFO
queue of past (detached) teacher embeddings; symmetrically the teacher anchor against student
embeddings. loss = CE + alpha·KD + beta·(ℓ_s + ℓ_t).

Deviations (the Step carries no sample index, and Probe no dataset size):
* index-free, MoCo-style queues instead of CRD's per-sample memory bank, so ``momentum`` (the
  bank's per-index update) has no role and is not a hyperparameter;
* the softmax (InfoNCE) form instead of the NCE estimator with a constant partition Z;
* ``nce_k`` (16384) is clamped to N − 1, N = training samples per epoch, counted during the first
  epoch of the stage: until then the queue just fills (it holds at most what has been seen), after
  that only the newest N − 1 entries are read, so no sample meets a stale copy of itself.
"""
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.contracts import HParam, Method
from kdbench.errors import KdbenchError

from ._common_b import flat, prod
from .kd import kd_term


class Queue(nn.Module):
    """A FIFO ring of embeddings in buffers (they move with ``.to(device)``)."""

    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("data", torch.zeros(size, dim))
        self.ptr = self.count = 0  # host-side ints: no device sync per step

    def newest(self, n):
        n = min(int(n), self.count, len(self.data))
        idx = (self.ptr - 1 - torch.arange(n, device=self.data.device)) % len(self.data)
        return self.data[idx]

    @torch.no_grad()
    def push(self, x):
        x = x.detach()[-len(self.data):]
        idx = (self.ptr + torch.arange(len(x), device=x.device)) % len(self.data)
        self.data[idx] = x.to(self.data.dtype)
        self.ptr = (self.ptr + len(x)) % len(self.data)
        self.count += len(x)


class CRDModules(nn.Module):
    def __init__(self, d_s, d_t, feat_dim, nce_k):
        super().__init__()
        self.embed_s, self.embed_t = nn.Linear(d_s, feat_dim), nn.Linear(d_t, feat_dim)
        self.queue_s, self.queue_t = Queue(nce_k, feat_dim), Queue(nce_k, feat_dim)
        self.epoch_seen = 0  # samples seen in the first epoch
        self.n_train = 0  # samples per epoch, known once the first epoch has ended

    def negatives_allowed(self, step_epoch, batch):
        if self.n_train == 0:
            if step_epoch == 0:
                self.epoch_seen += batch
            else:
                self.n_train = self.epoch_seen
        n = self.n_train
        return len(self.queue_t.data) if n == 0 else min(len(self.queue_t.data), n - 1)


def info_nce(anchor, keys, queue, tau):
    """Mean over anchors of −log softmax over [keys of the batch, queue] at the anchor's own key."""
    logits = anchor @ torch.cat([keys, queue]).t() / tau
    return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device))


def crd_term(step):
    m, hp = step.modules, step.hp
    k = m.negatives_allowed(step.epoch, len(step.y)) if m.training else len(m.queue_t.data)
    e_s = F.normalize(m.embed_s(flat(step.student.feats["pool"])), dim=1)
    e_t = F.normalize(m.embed_t(flat(step.teacher.feats["pool"].detach())), dim=1)
    q_t, q_s = m.queue_t.newest(k), m.queue_s.newest(k)
    value = info_nce(e_s, e_t.detach(), q_t, hp.tau) + info_nce(e_t, e_s.detach(), q_s, hp.tau)
    if m.training:
        m.queue_t.push(e_t)
        m.queue_s.push(e_s)
    return value


def check(probe):
    for who, shapes in (("student", probe.student_shapes), ("teacher", probe.teacher_shapes)):
        if "pool" not in shapes:
            raise KdbenchError(f"crd needs a 'pool' tap on the {who}")


def build(probe):
    hp = probe.hp
    return CRDModules(prod(probe.student_shapes["pool"]), prod(probe.teacher_shapes["pool"]), hp.feat_dim, hp.nce_k)


def loss(step):
    hp = step.hp
    terms = {"ce": F.cross_entropy(step.student.logits, step.y), "crd": hp.beta * crd_term(step)}
    if hp.alpha > 0:
        terms["kd"] = hp.alpha * kd_term(step.student.logits, step.teacher.logits.detach().float(), hp.T)
    return terms


METHODS = [
    Method(
        name="crd",
        loss=loss,
        description="CRD: contrast student and teacher embeddings against a queue of negatives, plus KD",
        citation="Tian et al., ICLR 2020",
        taps=lambda hp, s, t: [n for n in ("pool",) if n in s and (t is None or n in t)],
        check=check,
        build=build,
        hparams=(
            HParam("beta", 0.8, "weight of the contrastive term", low=0.0, space=(0.1, 5.0), log=True),
            HParam("alpha", 1.0, "weight of the KD term (0: CRD alone)", low=0.0, space=(0.0, 2.0)),
            HParam("T", 4.0, "KD temperature", low=0.0, open_low=True, space=(1.0, 20.0), log=True),
            HParam("tau", 0.07, "temperature of the contrastive softmax", low=0.0, open_low=True, space=(0.02, 0.5), log=True),
            HParam("feat_dim", 128, "embedding dimension", low=1, high=4096, space=(32, 512), log=True),
            HParam("nce_k", 16384, "queue length (clamped to training samples − 1)", low=1, high=1 << 20, space=(256, 16384), log=True),
        ),
    )
]
