"""``check_dataset``: a dataset's declaration and recipes, every split's samples and labels,
deterministic loading, train/val disjointness, augmentation, streamed splits and default models."""
from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from typing import Any

import torch

from kdbench.contracts import Dataset, Recipe
from kdbench.core import plugins
from kdbench.core.splits import augment_batch, load_split
from kdbench.errors import KdbenchError
from kdbench.recipes import OPTIMIZERS, SCHEDULES
from kdbench.testing.common import Fail, find_registered, single_threaded

#: How many samples of a streamed split (a ``torch.utils.data.Dataset``) the kit decodes.
_MAX_SAMPLES = 256


@single_threaded
def check_dataset(name: str | Dataset, *, options: Mapping[str, Any] | None = None, splits=("train", "val", "test")) -> None:
    """Check a dataset's contract; raise AssertionError saying what to fix.

    Every split loads (with ``options``, e.g. ``{"data_dir": ...}``) as ``(x, y)`` with x of shape
    ``[N, *input_shape]`` (uint8 or float, finite) and y integer labels in ``[0, num_classes)``;
    train holds every class; no validation sample is also a training sample; loading is
    deterministic; normalisation, augmentation and recipes are valid; default models exist and
    build for the input shape. A split returned as a ``torch.utils.data.Dataset`` (streamed by
    a DataLoader) must be picklable; up to 256 of its samples, evenly spaced, are decoded and
    checked (its ``targets``, when it has them, give every label). A dataset with ``resolve``
    is first resolved with ``options``, as a run is planned, and the concrete Dataset checked.
    """
    reg = plugins.registry()
    dataset = name if isinstance(name, Dataset) else find_registered(reg, "datasets", name)
    fail = Fail(f"dataset {dataset.name!r}")
    fail.require(isinstance(dataset, Dataset), f"registered {type(dataset).__name__}, expected kdbench.contracts.Dataset")
    options = dict(options or {})
    if dataset.resolve is not None:
        dataset = _resolved(fail, dataset, options)
    shape = tuple(dataset.input_shape)
    _check_declaration(fail, dataset, shape)
    _check_recipe(fail, "recipe", dataset.recipe)
    if dataset.teacher_recipe is not None:
        _check_recipe(fail, "teacher_recipe", dataset.teacher_recipe)
    loaded = {split: _check_split(fail, dataset, split, shape, options) for split in splits}
    if "train" in loaded and loaded["train"][1] is not None:
        _check_classes(fail, dataset, loaded["train"][1])
        if "val" in loaded:
            _check_disjoint(fail, loaded["train"][0], loaded["val"][0])
        _check_augmentation(fail, dataset, options)
    _check_default_models(fail, dataset, reg, shape)
    if dataset.embedded:
        fail.require(not options, "embedded datasets must load with no options (no files)")


# --------------------------------------------------------------------------- declaration


def _call_args(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in options.items())


def _resolved(fail: Fail, dataset: Dataset, options: dict) -> Dataset:
    """A dataset shaped by its files: the concrete Dataset for these options, as a run resolves it."""
    try:
        concrete = dataset.resolve(**options)
    except KdbenchError as exc:
        hint = "" if options else " — pass check_dataset(..., options={'data_dir': ...})"
        raise fail(f"resolve({_call_args(options)}) raised: {exc}{hint}") from None
    except Exception as exc:
        raise fail(f"resolve({_call_args(options)}) raised {type(exc).__name__}: {exc}; raise KdbenchError for unusable options") from exc
    fail.require(isinstance(concrete, Dataset), f"resolve() returned {type(concrete).__name__}, not a kdbench.contracts.Dataset")
    return concrete


def _check_declaration(fail: Fail, dataset: Dataset, shape: tuple) -> None:
    """Input shape, number of classes and normalisation statistics."""
    fail.require(len(shape) >= 1 and all(isinstance(dim, int) and dim > 0 for dim in shape), f"input_shape {shape} must be positive ints (channels first)")
    fail.require(isinstance(dataset.num_classes, int) and dataset.num_classes >= 2, f"num_classes={dataset.num_classes!r} must be an int >= 2")
    for label, stats in (("mean", dataset.mean), ("std", dataset.std)):
        fail.require(len(stats) in (0, shape[0]), f"{label} has {len(stats)} values; give one per channel ({shape[0]}) or none")
    fail.require(bool(dataset.mean) == bool(dataset.std), "give both mean and std, or neither")
    fail.require(all(value > 0 for value in dataset.std), f"std {dataset.std} must be positive")


def _check_recipe(fail: Fail, label: str, recipe: Recipe) -> None:
    fail.require(isinstance(recipe, Recipe), f"{label} must be a kdbench.contracts.Recipe, got {type(recipe).__name__}")
    fail.require(isinstance(recipe.epochs, int) and recipe.epochs >= 1, f"{label}.epochs={recipe.epochs!r} must be an int >= 1")
    fail.require(isinstance(recipe.batch_size, int) and recipe.batch_size >= 1, f"{label}.batch_size={recipe.batch_size!r} must be an int >= 1")
    fail.require(recipe.lr > 0, f"{label}.lr={recipe.lr} must be > 0")
    fail.require(recipe.optimizer in OPTIMIZERS, f"{label}.optimizer={recipe.optimizer!r} must be one of {OPTIMIZERS}")
    fail.require(recipe.schedule in SCHEDULES, f"{label}.schedule={recipe.schedule!r} must be one of {SCHEDULES}")
    bad = [milestone for milestone in recipe.milestones if not 0 < milestone < recipe.epochs]
    fail.require(not bad, f"{label}.milestones {recipe.milestones} must lie strictly between 0 and epochs={recipe.epochs}")


def _check_default_models(fail: Fail, dataset: Dataset, reg: plugins.Registry, shape: tuple) -> None:
    for role in ("default_teacher", "default_student"):
        model_name = getattr(dataset, role)
        if model_name is None:
            continue
        fail.require(model_name in reg.models, f"{role}={model_name!r} is not a registered model (see `kdbench list models`)")
        try:
            reg.models[model_name].obj.make(dataset.num_classes, shape)
        except Exception as exc:
            raise fail(f"{role}={model_name!r} cannot be built for input {shape}: {exc}") from None


# --------------------------------------------------------------------------- one split


def _check_split(fail: Fail, dataset: Dataset, split: str, shape: tuple, options: dict):
    """(x, y) of one split, checked; y is None for a streamed split whose every label is unknown."""
    what = f"split {split!r}"
    source, picks, x, y = _load(fail, dataset, split, options, what)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    _check_samples(fail, what, x, shape)
    _check_labels(fail, what, x, y, dataset.num_classes)
    _check_reload(fail, dataset, split, options, what, source, picks, x, y)
    if picks is not None:
        y = _streamed_labels(fail, what, source, picks, y, dataset.num_classes)
    return x, y


def _load(fail: Fail, dataset: Dataset, split: str, options: dict, what: str):
    """(what load returned, the indices decoded from a streamed split or None, x, y)."""
    try:
        source = dataset.load(split, **options)
        if isinstance(source, torch.utils.data.Dataset):
            picks, x, y = _sampled(fail, what, source)
        else:
            picks, (x, y) = None, source
    except AssertionError:
        raise
    except FileNotFoundError as exc:
        raise fail(f"split {split!r} is missing its files ({exc}) — pass check_dataset(..., options={{'data_dir': ...}})") from None
    except Exception as exc:
        raise fail(f"load({split!r}) raised {type(exc).__name__}: {exc}") from exc
    return source, picks, x, y


def _check_samples(fail: Fail, what: str, x: torch.Tensor, shape: tuple) -> None:
    fail.require(len(x) > 0, f"{what} is empty")
    fail.require(tuple(x.shape[1:]) == shape, f"{what} has samples of shape {tuple(x.shape[1:])}, input_shape declares {shape}")
    fail.require(x.dtype == torch.uint8 or x.is_floating_point(), f"{what}: x has dtype {x.dtype}; use uint8 (scaled by 1/255) or float")
    if x.is_floating_point():
        fail.require(bool(torch.isfinite(x).all()), f"{what}: x holds NaN or inf")


def _check_labels(fail: Fail, what: str, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    fail.require(y.dim() == 1 and len(y) == len(x), f"{what}: y has shape {tuple(y.shape)}; it must be [N] with N = len(x) = {len(x)}")
    fail.require(not y.is_floating_point() and y.dtype != torch.bool, f"{what}: labels have dtype {y.dtype}; use integers (int64)")
    lo, hi = int(y.min()), int(y.max())
    fail.require(
        lo >= 0 and hi < num_classes,
        f"{what}: labels span {lo}..{hi} but num_classes={num_classes} — labels must be 0..num_classes-1",
    )


def _check_reload(fail: Fail, dataset: Dataset, split: str, options: dict, what: str, source, picks, x, y) -> None:
    """A second load gives the same samples (for a streamed split: the same decoded samples)."""
    again = dataset.load(split, **options)
    if picks is not None:
        fail.require(isinstance(again, torch.utils.data.Dataset) and len(again) == len(source),
                     f"{what} differs between two loads — list and carve the samples in a fixed order")
        again = _sampled(fail, what, again, picks)[1:]
    fail.require(
        torch.equal(torch.as_tensor(again[0]), x) and torch.equal(torch.as_tensor(again[1]), y),
        f"{what} differs between two loads — generate/carve with a fixed seed",
    )


# --------------------------------------------------------------------------- streamed splits


def _sampled(fail: Fail, what: str, source, picks: torch.Tensor | None = None):
    """(indices, x, y) of up to :data:`_MAX_SAMPLES` samples of a streamed split, evenly spaced
    over it, stacked as a tensor split would be."""
    size = len(source)
    fail.require(size > 0, f"{what} is empty")
    if picks is None:
        picks = torch.linspace(0, size - 1, min(size, _MAX_SAMPLES)).round().long().unique()
        _check_picklable(fail, what, source)
    xs, ys = [], []
    for i in picks.tolist():
        sample = source[i]
        fail.require(isinstance(sample, (tuple, list)) and len(sample) == 2, f"{what}: sample {i} is not an (x, y) pair")
        x, y = torch.as_tensor(sample[0]), torch.as_tensor(sample[1])
        fail.require(y.dim() == 0, f"{what}: sample {i} has a label of shape {tuple(y.shape)}; give one integer")
        fail.require(not xs or x.shape == xs[0].shape, f"{what}: sample {i} has shape {tuple(x.shape)}, sample {int(picks[0])} {tuple(xs[0].shape) if xs else ()}")
        xs.append(x)
        ys.append(y)
    return picks, torch.stack(xs), torch.stack(ys)


def _check_picklable(fail: Fail, what: str, source) -> None:
    try:
        pickle.loads(pickle.dumps(source))
    except Exception as exc:
        raise fail(f"{what}: the dataset cannot be pickled ({type(exc).__name__}: {exc}) — DataLoader "
                   "workers started with 'spawn' (macOS, Windows) need a picklable dataset") from None


def _streamed_labels(fail: Fail, what: str, source, picks: torch.Tensor, y: torch.Tensor, num_classes: int):
    """Every label when the source lists them (``targets``, as torchvision's datasets do); else
    the decoded ones if they are all, or None: the class coverage needs every label."""
    targets = getattr(source, "targets", None)
    if targets is not None and len(targets) == len(source):
        targets = torch.as_tensor(targets)
        fail.require(torch.equal(targets[picks].long(), y.long()), f"{what}: targets disagree with the labels of the samples")
        fail.require(int(targets.min()) >= 0 and int(targets.max()) < num_classes,
                     f"{what}: targets span {int(targets.min())}..{int(targets.max())} but num_classes={num_classes}")
        return targets
    if len(picks) < len(source):
        return None
    return y


# --------------------------------------------------------------------------- train: classes, val, augmentation


def _row_hashes(x: torch.Tensor) -> set[bytes]:
    flat = x.reshape(len(x), -1).contiguous()
    if flat.is_floating_point():
        flat = flat.float()
    data = flat.numpy()
    return {hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in data}


def _check_classes(fail: Fail, dataset: Dataset, train_y: torch.Tensor) -> None:
    present = torch.unique(train_y).numel()
    fail.require(
        present == dataset.num_classes,
        f"split 'train' holds {present} of num_classes={dataset.num_classes} classes — fix num_classes or the labels",
    )


def _check_disjoint(fail: Fail, train_x: torch.Tensor, val_x: torch.Tensor) -> None:
    overlap = _row_hashes(train_x) & _row_hashes(val_x)
    fail.require(
        not overlap,
        f"{len(overlap)} validation sample(s) also appear in 'train' — carve val from train with "
        "kdbench.data.carve_validation and return only the rest for 'train'",
    )


def _check_augmentation(fail: Fail, dataset: Dataset, options: dict) -> None:
    split = load_split(dataset, "train", torch.device("cpu"), options)
    x = next(iter(split.batches(8)))[0]
    out = augment_batch(x, dataset.augment, torch.Generator().manual_seed(0))
    fail.require(out.shape == x.shape, f"augmentation {dataset.augment} changes the batch shape {tuple(x.shape)} → {tuple(out.shape)}")
    fail.require(bool(torch.isfinite(out).all()), "normalised, augmented inputs hold NaN or inf — check mean/std")
