"""cc: Peng et al. 2019, "Correlation Congruence for Knowledge Distillation". Settings against the
reference code: docs/FIDELITY.md.

The pooled features of student and teacher are each embedded by a learnable linear map to
``feat_dim`` (128) (the embeddings are this method's extra modules, trained with the student; the
teacher network itself stays frozen). Two variants:

* ``repdistiller`` (default, the code behind the published CIFAR-100 row, which its authors gave
  RepDistiller: ``distiller_zoo/CC.py`` Correlation on the un-normalised embeddings): with
  δ_i = |e_s[i] − e_t[i]|, term = mean_{i<B} Σ_d δ_i[d]·δ_{i+1}[d] (consecutive samples of the
  batch); loss = ce_weight·CE + weight·term, weight 0.02 (``-b 0.02``);
* ``paper``: the paper's correlation matrix of L2-normalised embeddings with the Taylor
  approximation of the Gaussian RBF kernel, exact for unit vectors up to order P:
  k(x, y) = exp(−γ‖x−y‖²) = exp(−2γ)·exp(2γ·x·y) ≈ Σ_{p=0..P} exp(−2γ)(2γ)^p/p!·(x·y)^p,
  term = ‖K_s − K_t‖²_F / B², γ=0.4, P=2, weighted by ``paper_weight`` (the reference weight 0.02
  makes this term ~1e-4 of the CE, i.e. no distillation; 1.0 is kdbench's choice, no public config
  gives one).
"""
import math

import torch.nn.functional as F
from torch import nn

from kdbench.contracts import HParam, Method
from kdbench.losses import as_vectors, ce, ce_weight, check_pool, frozen

VARIANTS = ("repdistiller", "paper")


def taylor_rbf(e, gamma, order):
    dot = e @ e.t()
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot.pow(p) for p in range(order + 1))


def cc_term(e_s, e_t, gamma, order):
    b = e_s.shape[0]
    return (taylor_rbf(e_s, gamma, order) - taylor_rbf(e_t, gamma, order)).pow(2).sum() / (b * b)


def consecutive_term(e_s, e_t):
    """RepDistiller's Correlation: mean over consecutive sample pairs of Σ_d δ_i·δ_{i+1}, δ = |e_s − e_t|."""
    delta = (e_s - e_t).abs()
    if len(delta) < 2:  # a batch of one has no consecutive pair
        return delta.sum() * 0
    return (delta[:-1] * delta[1:]).sum(1).mean()


def build(probe):
    d = probe.hp.feat_dim
    return nn.ModuleDict({
        "embed_s": nn.Linear(math.prod(probe.student_shapes["pool"]), d),
        "embed_t": nn.Linear(math.prod(probe.teacher_shapes["pool"]), d),
    })


def loss(step):
    embed, hp = step.modules, step.hp
    e_s = embed["embed_s"](as_vectors(step.student.feats["pool"]))
    e_t = embed["embed_t"](as_vectors(frozen(step.teacher.feats["pool"])))
    if hp.variant == "paper":
        term = hp.paper_weight * cc_term(F.normalize(e_s, dim=1), F.normalize(e_t, dim=1), hp.gamma, hp.order)
    else:
        term = hp.weight * consecutive_term(e_s, e_t)
    return {"ce": ce(step), "cc": term}


METHODS = [
    Method(
        name="cc",
        loss=loss,
        description="correlation congruence of embedded pooled features (RepDistiller's consecutive-sample form; paper: kernel matrix)",
        citation="Peng et al., ICCV 2019",
        taps=("pool",),
        build=build,
        check=lambda probe: check_pool(probe, "cc"),
        hparams=(
            HParam("variant", "repdistiller", "repdistiller: consecutive-sample correlation of raw embeddings; "
                   "paper: Taylor-RBF correlation matrix of normalised embeddings", choices=VARIANTS, tune=False),
            HParam("weight", 0.02, "weight of the correlation term (repdistiller variant)", low=0.0, space=(1e-3, 10.0), log=True),
            HParam("paper_weight", 1.0, "weight of the correlation term (paper variant)", low=0.0, space=(1e-2, 100.0), log=True),
            HParam("gamma", 0.4, "paper variant: RBF kernel γ in exp(−γ‖x−y‖²)", low=0.0, open_low=True, space=(0.1, 2.0), log=True),
            HParam("order", 2, "paper variant: order P of the Taylor expansion", low=0, high=8, space=(1, 4)),
            HParam("feat_dim", 128, "embedding size", low=1, tune=False),
            ce_weight(),
        ),
    )
]
