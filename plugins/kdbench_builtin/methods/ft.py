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
from kdbench.losses import STAGE_TAPS, batch_norm, check_stages, conv, frozen, match_size, stage_outputs


def _block(dims, c_in, c_out):
    return [conv(dims, c_in, c_out, 3, 1, 1), batch_norm(dims, c_out), nn.LeakyReLU(0.1)]


def encoder(dims, c_in, c_out):
    return nn.Sequential(*_block(dims, c_in, c_in), *_block(dims, c_in, c_out))


def factor_channels(hp, c_t):
    return max(1, int(round(c_t * hp.rate)))


def build(probe):
    s_names, t_names = check_stages(probe, "ft", equal=False)
    s_shape, t_shape = probe.student_shapes[s_names[-1]], probe.teacher_shapes[t_names[-1]]
    dims, c_t = len(t_shape) - 1, t_shape[0]
    k = factor_channels(probe.hp, c_t)
    return nn.ModuleDict({
        "enc": encoder(dims, c_t, k),
        "dec": nn.Sequential(*_block(dims, k, c_t), *_block(dims, c_t, c_t)[:-1]),
        "trans": encoder(dims, s_shape[0], k),
    })


def _last(outputs):
    return stage_outputs(outputs.feats)[-1]


def para_loss(step):
    ae = step.modules
    f_t = frozen(_last(step.teacher))
    return {"recon": F.mse_loss(ae["dec"](ae["enc"](f_t)), f_t)}


def factor_l1(fac_s, fac_t):
    fac_s, fac_t = match_size(fac_s, fac_t)
    return (F.normalize(fac_s.flatten(1), dim=1) - F.normalize(fac_t.flatten(1), dim=1)).abs().mean()


def loss(step):
    mods = step.modules
    mods["enc"].eval()
    mods["dec"].eval()
    with torch.no_grad():
        fac_t = mods["enc"](frozen(_last(step.teacher)))
    fac_s = mods["trans"](_last(step.student))
    return {"ce": F.cross_entropy(step.student.logits, step.y), "ft": step.hp.beta * factor_l1(fac_s, fac_t)}


METHODS = [
    Method(
        name="ft",
        loss=loss,
        description="factor transfer: a teacher paraphraser and a student translator, L1 between their factors",
        citation="Kim et al., NeurIPS 2018",
        taps=STAGE_TAPS,
        check=lambda probe: check_stages(probe, "ft", equal=False),
        build=build,
        stages=lambda hp: [Stage("paraphraser", "para_epochs", para_loss, train_student=False)],
        hparams=(
            HParam("para_epochs", 3, "epochs training the paraphraser (reference 30 of 240; 0 skips it)", low=0, high=1000, space=(1, 10)),
            HParam("rate", 0.5, "paraphrase rate k: factor channels = k·C_teacher", low=0.0, open_low=True, high=4.0, space=(0.25, 1.0)),
            HParam("beta", 200.0, "weight of the factor L1 term", low=0.0, space=(10.0, 1000.0), log=True),
        ),
    )
]
