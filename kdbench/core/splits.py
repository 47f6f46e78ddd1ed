"""Device-resident data: a whole split lives on the device; batches are sliced by a device
permutation and augmented batched (pad + random crop/shift, flip, noise) with no per-sample Python."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kdbench.contracts import Augment, Dataset
from kdbench.errors import KdbenchError

SPLITS = ("train", "val", "test")


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
            yield model_layout(self.prepare(self.x[i : i + batch_size])), self.y[i : i + batch_size]

    def shuffled(self, batch_size: int, generator: torch.Generator, augment: Augment):
        """One epoch of shuffled, augmented ``(x, y, index)`` batches; the last partial batch is dropped when the
        split holds more than one batch (keeps batch statistics and step shapes stable)."""
        n = len(self)
        perm = torch.randperm(n, generator=generator, device=generator.device)
        stop = n - n % batch_size if n > batch_size else n
        for i in range(0, stop, batch_size):
            idx = perm[i : i + batch_size]
            yield model_layout(augment_batch(self.x[idx], augment, generator, self.prepare)), self.y[idx], idx


def model_layout(x: torch.Tensor, cuda: bool | None = None) -> torch.Tensor:
    """Image batches in the layout of the models: channels_last on CUDA (where
    :func:`kdbench.core.engine.build_model` converts image models to it), unchanged elsewhere."""
    if (x.is_cuda if cuda is None else cuda) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


class _Indexed(torch.utils.data.Dataset):
    """(x, y) samples of a source dataset, with their index."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        x, y = self.source[i]
        return torch.as_tensor(x), torch.as_tensor(y).long(), i


class _EpochOrder(torch.utils.data.Sampler):
    """The sample order of the current epoch, set by the main process before each epoch (the
    sampler lives there, so one DataLoader with persistent workers serves every epoch)."""

    def __init__(self, n: int):
        self.order = list(range(n))

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


class LoaderSplit(DeviceSplit):
    """A split too large for the device: a DataLoader (worker processes kept across epochs,
    pinned memory on CUDA) reads the samples; each batch is moved to the device and normalised
    and augmented there by the same batched code as :class:`DeviceSplit`, so both paths draw the
    same augmentations."""

    def __init__(self, source, device, mean, std, workers: int | None = None):
        super().__init__(None, None, mean, std)
        self.source = _Indexed(source)
        self.device = device
        self.workers = min(4, os.cpu_count() or 1) if workers is None else workers
        self._loaders: dict = {}

    def __len__(self) -> int:
        return len(self.source)

    def _loader(self, batch_size, shuffled: bool):
        key = (batch_size, shuffled)
        if key not in self._loaders:
            n = len(self)
            sampler = _EpochOrder(n)
            loader = torch.utils.data.DataLoader(
                self.source, batch_size=batch_size, sampler=sampler,
                drop_last=shuffled and n > batch_size, num_workers=self.workers,
                pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0,
            )
            self._loaders[key] = (loader, sampler)
        return self._loaders[key]

    def _to_device(self, x, y, i):
        nb = self.device.type == "cuda"
        return x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb), i.to(self.device)

    def batches(self, batch_size: int):
        loader, _ = self._loader(batch_size, shuffled=False)
        for x, y, i in _from_workers(loader):
            x, y, _ = self._to_device(x, y, i)
            yield model_layout(self.prepare(x)), y

    def shuffled(self, batch_size: int, generator: torch.Generator, augment: Augment):
        loader, sampler = self._loader(batch_size, shuffled=True)
        # the order comes from the run's generator, as on the device path
        sampler.order = torch.randperm(len(self), generator=generator, device=generator.device).cpu().tolist()
        for x, y, i in _from_workers(loader):
            x, y, i = self._to_device(x, y, i)
            yield model_layout(augment_batch(x, augment, generator, self.prepare)), y, i


def _from_workers(loader):
    """Iterate a DataLoader; an error raised while a worker read a sample (torch re-raises it in
    this process with the worker's traceback in its message) becomes a one-line KdbenchError
    carrying the original last line, e.g. the plugin's own 'image x could not be read'."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as exc:
            text = str(exc)
            if "\nOriginal Traceback" not in text:
                raise
            last = text.rstrip().splitlines()[-1]
            name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
            if isinstance(exc, KdbenchError) and last.startswith(name):
                raise KdbenchError(last[len(name):]) from None
            raise KdbenchError(f"reading a sample failed in a DataLoader worker: {last}") from None
        yield batch


def load_split(dataset: Dataset, split: str, device: torch.device, options: dict) -> DeviceSplit:
    """Load one split through the dataset plugin: tensors move to ``device`` whole; a
    ``torch.utils.data.Dataset`` (data too large for the device) is streamed by a DataLoader."""
    try:
        loaded = dataset.load(split, **options)
    except KdbenchError:
        raise
    except FileNotFoundError as exc:
        raise KdbenchError(f"dataset {dataset.name!r}: missing data: {exc}") from None
    shape = (1, -1) + (1,) * (len(dataset.input_shape) - 1)
    mean = torch.tensor(dataset.mean, device=device).view(shape) if dataset.mean else None
    std = torch.tensor(dataset.std, device=device).view(shape) if dataset.std else None
    if isinstance(loaded, torch.utils.data.Dataset):
        sample_shape = tuple(torch.as_tensor(loaded[0][0]).shape) if len(loaded) else tuple(dataset.input_shape)
        _check_shape(dataset, split, sample_shape)
        return LoaderSplit(loaded, device, mean, std)
    x, y = loaded
    x, y = torch.as_tensor(x), torch.as_tensor(y).long()
    _check_shape(dataset, split, tuple(x.shape[1:]))
    return DeviceSplit(x.to(device), y.to(device), mean, std)


def _check_shape(dataset: Dataset, split: str, shape: tuple) -> None:
    if shape != tuple(dataset.input_shape):
        raise KdbenchError(
            f"dataset {dataset.name!r} split {split!r} has samples of shape {shape}, "
            f"it declares {tuple(dataset.input_shape)}"
        )


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator,
                  prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Apply ``aug`` to a raw batch ``[B, C, *spatial]`` (1-D or 2-D spatial), batched on its
    device; ``prepare`` (scaling and normalisation) runs between the crop and flip and the noise.

    Random crop (zero-pad by ``crop_pad``, crop at a uniform offset in ``[0, 2·pad]`` per axis and
    sample) and horizontal flip (last axis, probability ½) are folded into one index, so the batch
    is read with a single gather. They act on the raw values, before ``prepare``, as torchvision's
    ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip`` act on the image before ``ToTensor``
    and ``Normalize`` in RepDistiller's and mdistiller's CIFAR loaders: the padding is black (0),
    not the mean colour a zero after normalisation would be. Noise is added after ``prepare``."""
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
    if prepare is not None:
        x = prepare(x)
    if aug.noise:
        x = x + aug.noise * torch.randn(x.shape, generator=generator, device=dev)
    return x


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each spatial side by ``pad`` and crop the original size at a per-sample random
    offset in ``[0, 2·pad]`` (uniform, independently per spatial axis)."""
    return augment_batch(x, Augment(crop_pad=pad), generator)
