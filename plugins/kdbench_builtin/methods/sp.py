"""sp: Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation".

On the last stage map: G = row-L2-normalise(F Fᵀ) with F = flatten(f) [B, D] (a B×B similarity
of the batch's samples, so any widths pair up); loss = ce_weight·CE + weight·‖G_s − G_t‖²_F / B².

Defaults and settings against the reference code: docs/FIDELITY.md.
"""
import torch.nn.functional as F

from kdbench.contracts import HParam, Method
from kdbench.losses import STAGE_TAPS, as_vectors, ce, ce_weight, check_stages, frozen, stage_outputs


def similarity(f):
    vectors = as_vectors(f)
    return F.normalize(vectors @ vectors.t(), dim=1)


def sp_term(f_s, f_t):
    b = f_s.shape[0]
    return (similarity(f_s) - similarity(f_t)).pow(2).sum() / (b * b)


def loss(step):
    f_s, f_t = stage_outputs(step.student.feats)[-1], stage_outputs(step.teacher.feats)[-1]
    return {"ce": ce(step), "sp": step.hp.weight * sp_term(f_s, frozen(f_t))}


METHODS = [
    Method(
        name="sp",
        loss=loss,
        description="similarity preserving: match the batch's pairwise similarity of the last stage map",
        citation="Tung & Mori, ICCV 2019",
        taps=STAGE_TAPS,  # all stages are tapped (names must match on both nets); the last is used
        check=lambda probe: check_stages(probe, "sp", equal=False),
        hparams=(
            HParam("weight", 3000.0, "weight of the similarity term", low=0.0, space=(100.0, 3e4), log=True),
            ce_weight(),
        ),
    )
]
