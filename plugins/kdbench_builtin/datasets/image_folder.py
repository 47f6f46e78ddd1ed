"""Users' own images: a folder of class sub-folders (ImageNet style), streamed from disk.

``kdbench run --dataset image_folder --data-dir DIR [--data-option size=64]``: the classes are
the sorted sub-folder names of ``DIR``, read when the run is planned (``Dataset.resolve``), so
one registered ``image_folder`` serves any folder. Layouts:

* ``DIR/{train,val,test}/CLASS/IMAGE`` — ``val`` optional: then 10 % of train is carved (seed 0);
* ``DIR/CLASS/IMAGE`` — test = 10 % carved with seed 1, then val = 10 % of the rest (seed 0).

Splits are carved as index lists (the permutation of :func:`kdbench.data.carve_validation`), so
no image is decoded to split. ``load`` returns a ``torch.utils.data.Dataset`` whose samples are
decoded on access with Pillow (RGB, resized bilinear to ``size`` x ``size``, uint8
``[3, size, size]``): the harness streams it with a DataLoader (worker processes, pinned memory
on CUDA). Files and folders whose names start with ``.`` are skipped (e.g. macOS ``._x.jpg``).

A plugin can register a fixed folder under its own name with
``image_folder_dataset(data_dir, size, name=..., recipe=...)``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from kdbench.contracts import Augment, Dataset, Recipe
from kdbench.data import carve_validation
from kdbench.errors import KdbenchError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_DIRS = ("train", "val", "test")
OPTIONS = ("data_dir", "size")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RECIPE = Recipe(epochs=60, batch_size=64, lr=0.05, schedule="cosine", weight_decay=5e-4)
#: The default pair (the ImageNet KD pair); both build for any input of at least 32x32.
DEFAULT_TEACHER, DEFAULT_STUDENT = "resnet34", "resnet18"
MIN_SIZE, DEFAULT_SIZE = 8, 32
VAL_FRACTION, VAL_SEED, TEST_SEED = 0.1, 0, 1
VERSION_FORMAT = "1"


class UnreadableImage(KdbenchError):
    """An image file that Pillow cannot decode (raised in a DataLoader worker, it reaches the
    user as one line through :func:`kdbench.core.splits._from_workers`)."""


# --------------------------------------------------------------------------- the folder


def _visible_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def layout(data_dir) -> tuple[Path, list[str], bool]:
    """(root, class names, split folders?) of an image folder; one-line errors when unusable."""
    if data_dir is None or str(data_dir).strip() == "":
        raise KdbenchError(
            "dataset 'image_folder' needs a folder of class sub-folders: pass --data-dir DIR "
            "(DIR/CLASS/IMAGE.jpg, or DIR/{train,val,test}/CLASS/IMAGE.jpg)"
        )
    root = Path(data_dir).expanduser().absolute()
    if not root.is_dir():
        raise KdbenchError(f"image folder {root} does not exist")
    split = (root / "train").is_dir() and (root / "test").is_dir()
    if not split and (root / "train").is_dir() and _visible_dirs(root / "train"):
        raise KdbenchError(
            f"image folder {root} has train/ with class sub-folders but no test/: put the test images "
            f"in {root}/test/CLASS/ (val/ is optional), or use the flat layout {root}/CLASS/IMAGE"
        )
    class_root = root / "train" if split else root
    classes = [p.name for p in _visible_dirs(class_root)]
    if not classes:
        raise KdbenchError(
            f"image folder {class_root} has no class sub-folders (expected {class_root}/CLASS/IMAGE.png, "
            "one folder per class)"
        )
    return root, classes, split


def _images_under(folder: Path) -> list[tuple[tuple[str, ...], int, int]]:
    """(path parts relative to ``folder``, bytes, mtime_ns) of every image below it, sorted by
    path; hidden entries are skipped and nested symlinked folders are not followed."""
    found, stack = [], [((), str(folder))]
    while stack:
        parts, where = stack.pop()
        with os.scandir(where) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=False):
                    stack.append((parts + (e.name,), e.path))
                elif os.path.splitext(e.name)[1].lower() in EXTENSIONS and e.is_file():
                    st = e.stat()
                    found.append((parts + (e.name,), st.st_size, st.st_mtime_ns))
    found.sort()
    return found


def _scan(root: Path, folder: Path, classes: list[str], digest) -> tuple[list[str], list[int]]:
    """Paths (relative to ``root``) and labels of the images of one split folder, class by class."""
    present = {p.name for p in _visible_dirs(folder)}
    unknown = sorted(present - set(classes))
    if unknown:
        raise KdbenchError(f"image folder {folder} has class {unknown[0]!r}, which the train split lacks")
    base = folder.relative_to(root).parts
    paths, labels = [], []
    for label, name in enumerate(classes):
        if name not in present:
            continue
        for parts, nbytes, mtime in _images_under(folder / name):
            rel = "/".join(base + (name,) + parts)
            digest.update(f"{rel}\0{nbytes}\0{mtime}\n".encode("utf-8", "surrogateescape"))
            paths.append(rel)
            labels.append(label)
    return paths, labels


@dataclass(frozen=True)
class Index:
    """The files of each split: ``{split: (relative paths as bytes, int64 labels)}``, held as
    numpy arrays so DataLoader workers forked from the main process share them (a Python list
    of strings would be copied page by page as worker reference counts touch it)."""

    root: str
    classes: tuple[str, ...]
    splits: dict
    digest: str

    def size_of(self, split: str) -> int:
        return len(self.splits[split][1])


def _arrays(paths: list[str], labels: list[int], keep=None):
    encoded = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_) if paths else np.array([], dtype="S1")
    labels = np.asarray(labels, dtype=np.int64)
    if keep is not None:
        keep = keep.numpy()
        encoded, labels = encoded[keep], labels[keep]
    return encoded, labels


def _carve(n: int, seed: int):
    """(kept, carved) index tensors: the permutation of :func:`kdbench.data.carve_validation`."""
    idx = torch.arange(n)
    (kept, _), (carved, _) = carve_validation(idx, idx, fraction=VAL_FRACTION, seed=seed)
    return kept, carved


def scan(data_dir) -> Index:
    """Read an image folder's file list and carve its splits (no image is opened)."""
    root, classes, has_splits = layout(data_dir)
    digest = hashlib.sha256(f"{VERSION_FORMAT}\0{'split' if has_splits else 'flat'}\n".encode())
    where = {}  # split -> what it was taken from, for the error on an empty split
    if has_splits:
        source = root / "train"
        train = _scan(root, source, classes, digest)
        pool = train
        if (root / "val").is_dir():
            splits = {"train": _arrays(*train), "val": _arrays(*_scan(root, root / "val", classes, digest))}
            where["val"] = f"{root / 'val'} has no images"
        else:
            kept, carved = _carve(len(train[1]), VAL_SEED)
            splits = {"train": _arrays(*train, keep=kept), "val": _arrays(*train, keep=carved)}
            where["val"] = f"{VAL_FRACTION:.0%} of {len(train[1])} training images rounds to none"
        splits["test"] = _arrays(*_scan(root, root / "test", classes, digest))
        where["test"] = f"{root / 'test'} has no images"
    else:
        source = root
        pool = _scan(root, root, classes, digest)
        rest, test = _carve(len(pool[1]), TEST_SEED)
        kept, carved = _carve(len(rest), VAL_SEED)
        splits = {"train": _arrays(*pool, keep=rest[kept]), "val": _arrays(*pool, keep=rest[carved]),
                  "test": _arrays(*pool, keep=test)}
        where["test"] = f"{VAL_FRACTION:.0%} of {len(pool[1])} images rounds to none"
        where["val"] = f"{VAL_FRACTION:.0%} of the {len(rest)} images left after test rounds to none"
    counts = np.bincount(np.asarray(pool[1], dtype=np.int64), minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise KdbenchError(
            f"image folder {source / empty[0]} holds no images ({', '.join(sorted(EXTENSIONS))}); "
            "remove the folder or add images"
        )
    for split in ("test", "val", "train"):  # in the order they are carved
        if len(splits[split][1]) == 0:
            raise KdbenchError(f"image folder {root}: split {split!r} would hold no images "
                               f"({where.get(split, 'none found')}); add images")
    return Index(str(root), tuple(classes), splits, digest.hexdigest()[:12])


# --------------------------------------------------------------------------- samples


class ImageFiles(torch.utils.data.Dataset):
    """One split of an image folder: ``(uint8 [3, size, size], int64 label)`` samples, each
    decoded from its file on access. Picklable (DataLoader workers under any start method)."""

    def __init__(self, root: str, paths: np.ndarray, labels: np.ndarray, size: int):
        self.root, self.paths, self.size = root, paths, int(size)
        self.targets = labels  # torchvision's name: the labels, without decoding anything

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(bytes(self.paths[i])))

    def __getitem__(self, i):
        from PIL import Image

        path = self.path(i)
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if img.size != (self.size, self.size):
                    img = img.resize((self.size, self.size), Image.BILINEAR)
                pixels = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise UnreadableImage(f"image {path} could not be read: {reason}") from None
        return torch.from_numpy(pixels), torch.tensor(int(self.targets[i]), dtype=torch.int64)


# --------------------------------------------------------------------------- the Dataset


def parse_size(size) -> int:
    """The ``size`` option (an int, or the string of ``--data-option size=64``), checked."""
    try:
        as_float = float(size)
        if isinstance(size, bool) or not as_float.is_integer():
            raise ValueError(size)
        value = int(as_float)
    except (TypeError, ValueError):
        raise KdbenchError(f"image_folder size must be a whole number of pixels, got {size!r}") from None
    if value < MIN_SIZE:
        raise KdbenchError(f"image_folder size must be >= {MIN_SIZE}, got {value}")
    return value


def _no_other_options(name: str, options: dict) -> None:
    if options:
        raise KdbenchError(
            f"dataset {name!r} has no option {sorted(options)[0]!r} (it takes: {', '.join(OPTIONS)})"
        )


def _load(name: str, index: Index, px: int, split: str, **options) -> ImageFiles:
    # the data options that planned the run come again here: they must name this folder and size
    data_dir, size_option = options.pop("data_dir", None), options.pop("size", None)
    _no_other_options(name, options)
    if split not in SPLIT_DIRS:
        raise KdbenchError(f"dataset {name!r} has no split {split!r} (train, val, test)")
    if data_dir is not None and Path(data_dir).expanduser().resolve() != Path(index.root).resolve():
        raise KdbenchError(f"dataset {name!r} reads {index.root}, not {data_dir}; "
                           f"use --dataset image_folder --data-dir {data_dir}")
    if size_option is not None and parse_size(size_option) != px:
        raise KdbenchError(f"dataset {name!r} is {px}x{px}, not size={size_option}")
    paths, labels = index.splits[split]
    return ImageFiles(index.root, paths, labels, px)


def image_folder_dataset(data_dir, size: int = DEFAULT_SIZE, name: str = "image_folder",
                         recipe: Recipe | None = None) -> Dataset:
    """The Dataset of the image folder ``data_dir`` at ``size`` x ``size`` pixels: its classes
    and files are read now (a plugin can register it under ``name``; ``recipe`` defaults to
    :data:`RECIPE`). Its ``version`` hashes the relative paths, sizes and modification times of
    the files, and ``size``, so a cached teacher is not reused once the folder changes."""
    size = parse_size(size)
    index = scan(data_dir)
    big_enough = size >= 32
    counts = ", ".join(f"{index.size_of(s)} {s}" for s in SPLIT_DIRS)
    return Dataset(
        name=name,
        load=partial(_load, name, index, size),
        num_classes=len(index.classes),
        input_shape=(3, size, size),
        recipe=RECIPE if recipe is None else recipe,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augment=Augment(crop_pad=max(1, size // 8), flip=True),
        default_teacher=DEFAULT_TEACHER if big_enough else None,
        default_student=DEFAULT_STUDENT if big_enough else None,
        description=f"images from {index.root} ({len(index.classes)} classes, {size}x{size}; {counts})",
        # "2:": crops pad the raw image with black, before normalisation (since 2026-11-28)
        version=f"2:{index.digest}:{size}",
    )


def resolve(data_dir=None, size=DEFAULT_SIZE, **options) -> Dataset:
    """The concrete ``image_folder`` for ``--data-dir DIR`` and ``--data-option size=N``."""
    _no_other_options("image_folder", options)
    size = parse_size(size)  # a bad size is reported before the folder is read
    return image_folder_dataset(data_dir, size, name="image_folder")


def load(split: str, data_dir=None, size=DEFAULT_SIZE) -> ImageFiles:
    """``split`` of the image folder ``data_dir`` (reads the file list each call)."""
    return resolve(data_dir=data_dir, size=size).load(split)


def _unresolved(split: str, **options):
    # reached only when something loads the registered entry without planning a run
    return resolve(**options).load(split)


DATASETS = [
    Dataset(
        name="image_folder",
        load=_unresolved,
        resolve=resolve,
        num_classes=0,  # read from the folder when a run is planned
        input_shape=(3, DEFAULT_SIZE, DEFAULT_SIZE),
        recipe=RECIPE,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augment=Augment(crop_pad=DEFAULT_SIZE // 8, flip=True),
        default_teacher=DEFAULT_TEACHER,
        default_student=DEFAULT_STUDENT,
        description="your own images, one sub-folder per class (DIR/CLASS/IMAGE.jpg or "
        "DIR/{train,val,test}/CLASS/IMAGE.jpg), streamed from disk: --data-dir DIR "
        "[--data-option size=N, default 32]; classes are read from the folder",
        version="unresolved",
    )
]
