"""at: attention transfer, Zagoruyko & Komodakis 2017, "Paying More Attention to Attention".

a(f) = L2-normalise(flatten(F(f))); loss = CE + β·Σ_stages mean((a_s − a_t)²), where the channel
mapping F is ``mapping``: mean_p = mean_c |f|^p (default), sum_abs = Σ_c |f|, sum_p = Σ_c |f|^p,
max_p = max_c |f|^p (the paper's three maps; after the L2 normalisation sum_p equals mean_p and
sum_abs equals mean_p with p=1 — kept as named options for fidelity to the paper).
Stage outputs are paired one to one, shallow to deep; where spatial sizes differ the larger
attention map is average-pooled to the smaller.

Defaults and settings against the reference code: docs/FIDELITY.md.
"""
from kdbench.contracts import Defaults, HParam, Method
from kdbench.losses import ATTENTION_MAPPINGS, STAGE_TAPS, attention, ce, ce_weight, check_stages, frozen, match_size


def at_term(feats_s, feats_t, p, mapping="mean_p"):
    total = 0
    for f_s, f_t in zip(feats_s, feats_t):
        f_s, f_t = match_size(f_s, frozen(f_t))
        total = total + (attention(f_s, p, mapping) - attention(f_t, p, mapping)).pow(2).mean()
    return total


def loss(step):
    hp = step.hp
    # the tapped stage outputs in the model's declared order (the taps are the stage outputs only)
    feats_s, feats_t = list(step.student.feats.values()), list(step.teacher.feats.values())
    return {"ce": ce(step), "at": hp.beta * at_term(feats_s, feats_t, hp.p, hp.mapping)}


#: Defaults on the embedded MNIST-1D data, where the CIFAR values above hurt (1-D maps of length
#: 20, 10 classes): the best trial of `kdbench tune --method at --trials 20` on the mnist1d
#: validation split (cnn1d_4x32 → cnn1d_2x16), rounded; retrained, test top-1 over seeds 0-2:
#: 91.33 ± 0.95 % (76.07 ± 2.51 at the CIFAR defaults).
EMBEDDED = Defaults({"p": 1.0, "beta": 11.5}, dataset="mnist1d",
                    source="kdbench tune on the mnist1d validation split (20 trials)")


METHODS = [
    Method(
        name="at",
        loss=loss,
        description="attention transfer: match spatial attention maps of the stage outputs",
        citation="Zagoruyko & Komodakis, ICLR 2017",
        taps=STAGE_TAPS,
        check=lambda probe: check_stages(probe, "at"),
        defaults_for=(EMBEDDED,),
        hparams=(
            HParam("p", 2.0, "exponent of the attention map", low=0.0, open_low=True, space=(1.0, 4.0)),
            HParam("beta", 1000.0, "weight of the attention term", low=0.0, space=(10.0, 1e4), log=True),
            HParam("mapping", "mean_p", "channel mapping of the attention map (see the module doc)",
                   choices=ATTENTION_MAPPINGS, tune=False),
            ce_weight(),
        ),
    )
]
