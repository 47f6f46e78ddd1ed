"""kd: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

loss = (1 − α)·CE(z_s, y) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), KL averaged over the batch.

Defaults and settings against the reference code: docs/FIDELITY.md.
"""
from kdbench.contracts import HParam, Method
from kdbench.losses import hinton_kd

METHODS = [
    Method(
        name="kd",
        loss=hinton_kd,
        description="Hinton KD: match the teacher's temperature-softened outputs",
        citation="Hinton et al., NIPS-W 2015",
        hparams=(
            HParam("T", 4.0, "softmax temperature", low=0.0, open_low=True, space=(1.0, 20.0), log=True),
            HParam("alpha", 0.9, "weight of the KD term; CE gets 1 − alpha", low=0.0, high=1.0, space=(0.1, 0.99)),
        ),
    )
]
