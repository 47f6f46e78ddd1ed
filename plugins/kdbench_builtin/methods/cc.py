"""cc: Peng et al. 2019, "Correlation Congruence for Knowledge Distillation".

The pooled features of student and teacher are each embedded by a learnable linear map to
``feat_dim`` (128) and L2-normalised (the embeddings are this method's extra modules, trained with
the student; the teacher network itself stays frozen). The batch's correlation matrix uses the
paper's Taylor approximation of the Gaussian RBF kernel, exact for unit vectors up to order P:
k(x, y) = exp(−γ‖x−y‖²) = exp(−2γ)·exp(2γ·x·y) ≈ Σ_{p=0..P} exp(−2γ)(2γ)^p/p!·(x·y)^p.
loss = ce_weight·CE + weight·‖K_s − K_t‖²_F / B², with γ=0.4 and P=2 as in the paper.
(RepDistiller instead uses the product of consecutive samples' embedding differences; the
reference weight 0.02 comes from there.)
"""
import math

import torch.nn.functional as F
from torch import nn

from kdbench.contracts import HParam, Method
from kdbench.losses import as_vectors, ce, ce_weight, check_pool, frozen


def taylor_rbf(e, gamma, order):
    dot = e @ e.t()
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot.pow(p) for p in range(order + 1))


def cc_term(e_s, e_t, gamma, order):
    b = e_s.shape[0]
    return (taylor_rbf(e_s, gamma, order) - taylor_rbf(e_t, gamma, order)).pow(2).sum() / (b * b)


def build(probe):
    d = probe.hp.feat_dim
    return nn.ModuleDict({
        "embed_s": nn.Linear(math.prod(probe.student_shapes["pool"]), d),
        "embed_t": nn.Linear(math.prod(probe.teacher_shapes["pool"]), d),
    })


def loss(step):
    embed = step.modules
    e_s = F.normalize(embed["embed_s"](as_vectors(step.student.feats["pool"])), dim=1)
    e_t = F.normalize(embed["embed_t"](as_vectors(frozen(step.teacher.feats["pool"]))), dim=1)
    return {"ce": ce(step), "cc": step.hp.weight * cc_term(e_s, e_t, step.hp.gamma, step.hp.order)}


METHODS = [
    Method(
        name="cc",
        loss=loss,
        description="correlation congruence: match the batch's kernel correlation of embedded pooled features",
        citation="Peng et al., ICCV 2019",
        taps=("pool",),
        build=build,
        check=lambda probe: check_pool(probe, "cc"),
        hparams=(
            HParam("weight", 0.02, "weight of the correlation term", low=0.0, space=(1e-3, 10.0), log=True),
            HParam("gamma", 0.4, "RBF kernel γ in exp(−γ‖x−y‖²)", low=0.0, open_low=True, space=(0.1, 2.0), log=True),
            HParam("order", 2, "order P of the Taylor expansion", low=0, high=8, space=(1, 4)),
            HParam("feat_dim", 128, "embedding size", low=1, tune=False),
            ce_weight(),
        ),
    )
]
