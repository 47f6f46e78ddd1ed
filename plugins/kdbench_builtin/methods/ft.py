"""ft: Kim et al. 2018, "Paraphrasing Complex Network: Network Compression via Factor Transfer".

Pre-stage "paraphraser" (``para_epochs``, student frozen): an autoencoder on the teacher's last
stage map (3×3 conv + BN + LeakyReLU ×2 down to k·C_t "factor" channels and ×2 back) learns to
reconstruct it: MSE(dec(enc(f_t)), f_t). Main stage: a translator (the same encoder shape on the
student's last stage) gives the student factor; loss = CE + beta·mean|F_s/‖F_s‖₂ − F_t/‖F_t‖₂|
(L1 between the per-sample L2-normalised flattened factors, p=1 as in the paper), with the
paraphraser frozen (no gradient, eval mode) in the main stage. The larger map is pooled to the
smaller. Simplification: 2 conv layers each way instead of RepDistiller's 3.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.contracts import HParam, Method, Stage

from ._common_b import STAGE_TAPS, bn, conv, need_stages, stage_names
from .at import match_size


def _block(dims, c_in, c_out):
    return [conv(dims, c_in, c_out, 3, 1, 1), bn(dims, c_out), nn.LeakyReLU(0.1)]


def encoder(dims, c_in, c_out):
    return nn.Sequential(*_block(dims, c_in, c_in), *_block(dims, c_in, c_out))


def factor_channels(hp, c_t):
    return max(1, int(round(c_t * hp.rate)))


def build(probe):
    s, t = need_stages(probe, "ft")
    s_shape, t_shape = probe.student_shapes[s[-1]], probe.teacher_shapes[t[-1]]
    dims, c_t = len(t_shape) - 1, t_shape[0]
    k = factor_channels(probe.hp, c_t)
    return nn.ModuleDict({
        "enc": encoder(dims, c_t, k),
        "dec": nn.Sequential(*_block(dims, k, c_t), *_block(dims, c_t, c_t)[:-1]),
        "trans": encoder(dims, s_shape[0], k),
    })


def _last(outputs):
    return outputs.feats[stage_names(outputs.feats)[-1]]


def para_loss(step):
    m = step.modules
    f_t = _last(step.teacher).detach().float()
    return {"recon": F.mse_loss(m["dec"](m["enc"](f_t)), f_t)}


def factor_l1(fac_s, fac_t):
    fac_s, fac_t = match_size(fac_s, fac_t)
    return (F.normalize(fac_s.flatten(1), dim=1) - F.normalize(fac_t.flatten(1), dim=1)).abs().mean()


def loss(step):
    m = step.modules
    m["enc"].eval()
    m["dec"].eval()
    with torch.no_grad():
        fac_t = m["enc"](_last(step.teacher).detach().float())
    fac_s = m["trans"](_last(step.student))
    return {"ce": F.cross_entropy(step.student.logits, step.y), "ft": step.hp.beta * factor_l1(fac_s, fac_t)}


METHODS = [
    Method(
        name="ft",
        loss=loss,
        description="factor transfer: a teacher paraphraser and a student translator, L1 between their factors",
        citation="Kim et al., NeurIPS 2018",
        taps=STAGE_TAPS,
        check=lambda probe: need_stages(probe, "ft"),
        build=build,
        stages=lambda hp: [Stage("paraphraser", "para_epochs", para_loss, train_student=False)],
        hparams=(
            HParam("para_epochs", 3, "epochs training the paraphraser (reference 30 of 240; 0 skips it)", low=0, high=1000, space=(1, 10)),
            HParam("rate", 0.5, "paraphrase rate k: factor channels = k·C_teacher", low=0.0, open_low=True, high=4.0, space=(0.25, 1.0)),
            HParam("beta", 200.0, "weight of the factor L1 term", low=0.0, space=(10.0, 1000.0), log=True),
        ),
    )
]
