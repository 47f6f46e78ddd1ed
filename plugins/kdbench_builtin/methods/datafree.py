"""datafree: data-free KD from the teacher's metadata (survey note 004: Lopes et al. 2017; the
synthesis follows DeepInversion, Yin et al. 2020).

The teacher's metadata are the activation statistics it already carries: each BatchNorm layer's
running mean and variance. Synthetic inputs are optimised to reproduce them: a batch x starts as
N(0, 1) noise in the network's (normalised) input space, and Adam minimises

    Σ_BN-layers ( ‖μ_batch − μ_running‖₂ + ‖σ²_batch − σ²_running‖₂ ) · bn_weight
      + CE(teacher(x), ŷ) + l2 · mean(x²)

for ``synth_steps`` steps, ŷ being target classes drawn evenly over the classes. ``synth_count``
inputs are made in batches of ``synth_batch`` and cached (keyed by the teacher's weights and the
synthesis settings) under the kdbench cache. The student is then distilled on these inputs only
(KD: T²·KL(teacher ‖ student) on the teacher's soft outputs; the sampled ŷ are only the labels the
engine reports training accuracy against): the dataset's train split is never loaded for the
student (``train_split_loaded`` = 0). Validation and test data are still read to measure.
A teacher without BatchNorm layers cannot be served.

Defaults and settings against the reference code: docs/FIDELITY.md.
"""
import hashlib
import io
import os

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.contracts import HParam, Method
from kdbench.data import cache_dir
from kdbench.errors import KdbenchError
from kdbench.losses import frozen, kd_term

BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_layers(net):
    return [layer for layer in net.modules()
            if isinstance(layer, BN) and layer.track_running_stats and layer.running_mean is not None]


class BNStats:
    """Forward hooks that add each BN layer's batch-vs-running statistics distance to ``loss``."""

    def __init__(self, layers):
        self.loss = 0.0
        self.handles = [layer.register_forward_hook(self.hook) for layer in layers]

    def hook(self, module, args, _output):
        x = args[0].float()
        dims = [0] + list(range(2, x.dim()))
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.loss = self.loss + torch.linalg.vector_norm(mean - module.running_mean) \
            + torch.linalg.vector_norm(var - module.running_var)

    def remove(self):
        for h in self.handles:
            h.remove()


def synthesize_batch(teacher, targets, input_shape, steps, lr, bn_weight, l2, generator, history=None):
    """One synthetic batch for ``targets``: inputs whose BN statistics match the teacher's running
    ones. ``history`` (a list) receives the BN-statistics loss of every step."""
    device = targets.device
    x = torch.randn((len(targets), *input_shape), generator=generator, device="cpu").to(device).requires_grad_()
    opt = torch.optim.Adam([x], lr=lr)
    stats = BNStats(bn_layers(teacher))
    was = teacher.training
    teacher.eval()
    try:
        for _ in range(steps):
            stats.loss = 0.0
            logits = teacher(x)
            logits = logits.logits if hasattr(logits, "logits") else logits
            loss = bn_weight * stats.loss + F.cross_entropy(logits.float(), targets) + l2 * x.pow(2).mean()
            if history is not None:
                history.append(float(stats.loss.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        stats.remove()
        teacher.train(was)
    return x.detach()


def _key(teacher, hp, input_shape, num_classes):
    h = hashlib.sha256()
    for name, value in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    settings = (hp.synth_count, hp.synth_batch, hp.synth_steps, hp.synth_lr, hp.bn_weight, hp.l2, hp.synth_seed,
                tuple(input_shape), num_classes, 1)
    h.update(repr(settings).encode())
    return h.hexdigest()[:20]


def synthesize(probe, teacher, device):
    """The synthetic training set ``(x, ŷ)``, from the cache when it was made before."""
    hp = probe.hp
    if teacher is None or not bn_layers(teacher):
        raise KdbenchError("datafree needs a teacher with BatchNorm layers (their running statistics are the metadata)")
    path = cache_dir() / "datafree" / f"{_key(teacher, hp, probe.input_shape, probe.num_classes)}.pt"
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return blob["x"].to(device), blob["y"].to(device)
    teacher.requires_grad_(False)
    gen = torch.Generator().manual_seed(hp.synth_seed)
    y = torch.arange(hp.synth_count) % probe.num_classes
    y = y[torch.randperm(hp.synth_count, generator=gen)].to(device)
    xs = [synthesize_batch(teacher, y[i:i + hp.synth_batch], probe.input_shape, hp.synth_steps, hp.synth_lr,
                           hp.bn_weight, hp.l2, gen) for i in range(0, hp.synth_count, hp.synth_batch)]
    x = torch.cat(xs)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"x": x.cpu(), "y": y.cpu()}, buf)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return x, y


def loss(step):
    return {"kd": kd_term(step.student.logits, frozen(step.teacher.logits), step.hp.T)}


METHODS = [
    Method(
        name="datafree",
        loss=loss,
        description="data-free KD: distil on inputs synthesised to match the teacher's BatchNorm statistics",
        citation="Lopes et al. 2017; Yin et al. (DeepInversion), CVPR 2020",
        train_data=synthesize,
        hparams=(
            HParam("T", 4.0, "KD temperature", low=0.0, open_low=True, space=(1.0, 20.0), log=True),
            HParam("synth_count", 2000, "synthetic inputs made (and cached)", low=1, high=1 << 20, tune=False),
            HParam("synth_batch", 500, "inputs optimised together", low=1, high=1 << 16, tune=False),
            HParam("synth_steps", 60, "Adam steps per synthetic batch", low=1, high=100000, tune=False),
            HParam("synth_lr", 0.1, "Adam learning rate of the synthesis", low=0.0, open_low=True, space=(0.01, 0.5), log=True),
            HParam("bn_weight", 1.0, "weight of the BN-statistics term", low=0.0, space=(0.1, 10.0), log=True),
            HParam("l2", 0.0, "weight of the L2 prior on the inputs", low=0.0, tune=False),
            HParam("synth_seed", 0, "seed of the noise and the target classes", tune=False),
        ),
    )
]
