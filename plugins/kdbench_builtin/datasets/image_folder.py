"""Users' own images: a folder of class sub-folders (ImageNet style), decoded with Pillow,
resized to ``size`` x ``size`` RGB and held in memory as uint8.

Layouts: ``DIR/{train,val,test}/CLASS/*.png|jpg…`` (``val`` optional: carved from train, 10 %,
seed 0), or ``DIR/CLASS/*`` (test = 10 % carved with seed 1, then val = 10 % of the rest).
Classes are the sorted folder names.

The :class:`Dataset` contract fixes ``num_classes`` and ``input_shape`` at registration, so an
image folder is registered once its folder is known: ``image_folder_dataset(data_dir, size)``
builds the Dataset (a user plugin can register it), and the built-in ``image_folder`` is
registered when ``$KDBENCH_IMAGE_FOLDER`` names a folder (``$KDBENCH_IMAGE_SIZE``, default 32).
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np
import torch

from kdbench.contracts import Augment, Dataset, Recipe
from kdbench.data import carve_validation
from kdbench.errors import KdbenchError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_DIRS = ("train", "val", "test")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RECIPE = Recipe(epochs=60, batch_size=64, lr=0.05, schedule="cosine", weight_decay=5e-4)


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def layout(data_dir) -> tuple[Path, list[str], bool]:
    """(root, class names, split folders?) of an image folder; one-line errors when unusable."""
    if not data_dir:
        raise KdbenchError("dataset 'image_folder' needs the data_dir option: a folder of class sub-folders")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise KdbenchError(f"image folder {root} does not exist")
    split = (root / "train").is_dir() and (root / "test").is_dir()
    class_root = root / "train" if split else root
    classes = [p.name for p in _class_dirs(class_root)]
    if not classes:
        raise KdbenchError(
            f"image folder {class_root} has no class sub-folders (expected {class_root}/CLASS/IMAGE.png, "
            "one folder per class)"
        )
    return root, classes, split


def _read_images(folder: Path, classes: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    xs, ys = [], []
    present = {p.name for p in _class_dirs(folder)}
    unknown = sorted(present - set(classes))
    if unknown:
        raise KdbenchError(f"image folder {folder} has class {unknown[0]!r}, which the train split lacks")
    for label, name in enumerate(classes):
        if name not in present:
            continue
        for path in sorted((folder / name).rglob("*")):
            if path.suffix.lower() not in EXTENSIONS or not path.is_file():
                continue
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB")
                    if img.size != (size, size):
                        img = img.resize((size, size), Image.BILINEAR)
                    xs.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
            except OSError as exc:
                raise KdbenchError(f"image {path} could not be read: {exc}") from None
            ys.append(label)
    if not xs:
        raise KdbenchError(f"image folder {folder} holds no images ({', '.join(sorted(EXTENSIONS))})")
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64)


def load(split: str, data_dir=None, size: int = 32, classes: tuple[str, ...] | None = None):
    """(uint8 [N, 3, size, size], int64 [N]) of ``split``."""
    if split not in SPLIT_DIRS:
        raise KdbenchError(f"dataset 'image_folder' has no split {split!r} (train, val, test)")
    size = int(size)
    if size < 8:
        raise KdbenchError(f"image_folder size must be >= 8, got {size}")
    root, found, has_splits = layout(data_dir)
    if classes is not None and list(classes) != found:
        raise KdbenchError(
            f"image folder {root} has classes {found[:5]}…, the registered dataset has {list(classes)[:5]}…"
        )
    if has_splits:
        if split == "test":
            return _read_images(root / "test", found, size)
        x, y = _read_images(root / "train", found, size)
        if (root / "val").is_dir():
            return (x, y) if split == "train" else _read_images(root / "val", found, size)
        train, val = carve_validation(x, y, fraction=0.1, seed=0)
        return train if split == "train" else val
    x, y = _read_images(root, found, size)
    rest, test = carve_validation(x, y, fraction=0.1, seed=1)
    if split == "test":
        return test
    train, val = carve_validation(*rest, fraction=0.1, seed=0)
    return train if split == "train" else val


def image_folder_dataset(data_dir, size: int = 32, name: str = "image_folder",
                         recipe: Recipe = RECIPE) -> Dataset:
    """A Dataset for the image folder ``data_dir`` (classes read from its sub-folders now)."""
    root, classes, _ = layout(data_dir)
    return Dataset(
        name=name,
        load=partial(_load_registered, str(root), int(size), tuple(classes)),
        num_classes=len(classes),
        input_shape=(3, int(size), int(size)),
        recipe=recipe,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augment=Augment(crop_pad=max(1, int(size) // 8), flip=True),
        description=f"images from {root} ({len(classes)} classes, {size}x{size})",
        version=f"{root}:{size}",
    )


def _load_registered(root: str, size: int, classes: tuple, split: str, data_dir=None, **options):
    if options:
        raise KdbenchError(f"dataset 'image_folder' has no option {sorted(options)[0]!r} (it takes: data_dir)")
    return load(split, data_dir or root, size, classes)


def _unusable(message: str):
    def load_fails(split: str, **options):
        raise KdbenchError(message)

    return load_fails


def _from_env() -> list[Dataset]:
    folder = os.environ.get("KDBENCH_IMAGE_FOLDER")
    if not folder:
        return []
    try:
        size = int(os.environ.get("KDBENCH_IMAGE_SIZE", "32"))
        return [image_folder_dataset(folder, size)]
    except (KdbenchError, ValueError) as exc:
        # keep the other built-in datasets loadable; the error surfaces when image_folder is used
        message = f"KDBENCH_IMAGE_FOLDER={folder!r} is unusable: {exc}"
        return [Dataset(name="image_folder", load=_unusable(message), num_classes=1, input_shape=(3, 32, 32),
                        recipe=RECIPE, description=message)]


DATASETS = _from_env()
