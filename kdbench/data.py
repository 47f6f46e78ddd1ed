"""Device-resident data: a whole split lives on the device; batches are sliced by a device
permutation and augmented batched (pad + random crop/shift, flip, noise) with no per-sample Python."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .contracts import Augment, Dataset
from .errors import KdbenchError

SPLITS = ("train", "val", "test")


def carve_validation(x: torch.Tensor, y: torch.Tensor, fraction: float = 0.1, seed: int = 0):
    """Split (x, y) into (train, val) with a fixed seed: ``((x_tr, y_tr), (x_val, y_val))``."""
    n = len(y)
    n_val = int(round(n * fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
    return (x[train], y[train]), (x[val], y[val])


@dataclass
class DeviceSplit:
    """One split on the device: raw x (uint8 or float), y, and how to turn x into model input."""

    x: torch.Tensor
    y: torch.Tensor
    mean: torch.Tensor | None
    std: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.y)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 → [0, 1] floats, then per-channel normalisation."""
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    def batches(self, batch_size: int):
        """In order, no augmentation (evaluation)."""
        for i in range(0, len(self), batch_size):
            yield self.prepare(self.x[i : i + batch_size]), self.y[i : i + batch_size]

    def shuffled(self, batch_size: int, generator: torch.Generator, augment: Augment):
        """One epoch of shuffled, augmented ``(x, y, index)`` batches; the last partial batch is dropped when the
        split holds more than one batch (keeps batch statistics and step shapes stable)."""
        n = len(self)
        perm = torch.randperm(n, generator=generator, device=generator.device)
        stop = n - n % batch_size if n > batch_size else n
        for i in range(0, stop, batch_size):
            idx = perm[i : i + batch_size]
            yield augment_batch(self.prepare(self.x[idx]), augment, generator), self.y[idx], idx


def load_split(dataset: Dataset, split: str, device: torch.device, options: dict) -> DeviceSplit:
    """Load one split through the dataset plugin and move it to ``device``."""
    try:
        x, y = dataset.load(split, **options)
    except KdbenchError:
        raise
    except FileNotFoundError as exc:
        raise KdbenchError(f"dataset {dataset.name!r}: missing data: {exc}") from None
    x, y = torch.as_tensor(x), torch.as_tensor(y).long()
    if tuple(x.shape[1:]) != tuple(dataset.input_shape):
        raise KdbenchError(
            f"dataset {dataset.name!r} split {split!r} has samples of shape {tuple(x.shape[1:])}, "
            f"it declares {tuple(dataset.input_shape)}"
        )
    shape = (1, -1) + (1,) * (len(dataset.input_shape) - 1)
    mean = torch.tensor(dataset.mean, device=device).view(shape) if dataset.mean else None
    std = torch.tensor(dataset.std, device=device).view(shape) if dataset.std else None
    return DeviceSplit(x.to(device), y.to(device), mean, std)


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Apply ``aug`` to a batch ``[B, C, *spatial]`` (1-D or 2-D spatial), batched on its device.

    Random crop (zero-pad by ``crop_pad``, crop at a uniform offset in ``[0, 2·pad]`` per axis and
    sample) and horizontal flip (last axis, probability ½) are folded into one index, so the batch
    is read with a single gather."""
    spatial = x.shape[2:]
    if len(spatial) not in (1, 2):
        raise KdbenchError(f"augmentation supports 1-D and 2-D inputs, got {len(spatial)}-D")
    b, c, dev = len(x), x.shape[1], x.device
    pad = aug.crop_pad
    if pad or aug.flip:
        if pad:
            x = torch.nn.functional.pad(x, (pad, pad) * len(spatial))
            offsets = torch.randint(0, 2 * pad + 1, (len(spatial), b), generator=generator, device=dev)
        else:
            offsets = torch.zeros((len(spatial), b), dtype=torch.long, device=dev)
        width = spatial[-1]
        cols = offsets[-1][:, None] + torch.arange(width, device=dev)  # [B, W]
        if aug.flip:
            flip = torch.rand(b, generator=generator, device=dev) < 0.5
            cols = torch.where(flip[:, None], cols.flip(1), cols)
        if len(spatial) == 1:
            index = cols
        else:
            rows = offsets[0][:, None] + torch.arange(spatial[0], device=dev)  # [B, H]
            index = (rows[:, :, None] * x.shape[-1] + cols[:, None, :]).flatten(1)  # [B, H·W]
        x = x.flatten(2).gather(2, index[:, None, :].expand(-1, c, -1)).view(b, c, *spatial)
    if aug.noise:
        x = x + aug.noise * torch.randn(x.shape, generator=generator, device=dev)
    return x


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each spatial side by ``pad`` and crop the original size at a per-sample random
    offset in ``[0, 2·pad]`` (uniform, independently per spatial axis)."""
    return augment_batch(x, Augment(crop_pad=pad), generator)
