"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from a local folder in the official python-pickle
format (``cifar-10-batches-py/``, ``cifar-100-python/``).

Where the data is: the ``data_dir`` option, else ``$KDBENCH_DATA_DIR``, else
``<cache_dir>/data``; the folder holds the extracted ``cifar-…`` folder (or is it). Each data
file read is checked against the md5 of the official release; the decoded arrays are cached as
``.npz`` under ``<cache_dir>/data`` (keyed by those md5s), so later loads skip the pickles.
``fetch(name, data_dir)`` downloads and extracts the official archive (``kdbench data download
cifar100``). Images are uint8 ``[N, 3, 32, 32]``; validation is 10 % of train carved with seed 0.
"""
from __future__ import annotations

import os
import pickle
from functools import partial
from pathlib import Path

import numpy as np
import torch

from kdbench.contracts import Augment, Dataset
from kdbench.data import carve_validation
from kdbench.errors import KdbenchError
from kdbench.data import cache_dir

from kdbench.recipes import load_recipe

BASE_URL = "https://www.cs.toronto.edu/~kriz"

# name: (url, md5 of the archive, folder it extracts to)
ARCHIVES = {
    "cifar10": (f"{BASE_URL}/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "cifar100": (f"{BASE_URL}/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
}

# md5 of each extracted data file of the official release (as torchvision checks them)
FILES = {
    "cifar10": {
        "train": [
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ],
        "test": [("test_batch", "40351d587109b95175f43aff81a1287e")],
    },
    "cifar100": {
        "train": [("train", "16019d7e3df5f24257cddd939b257f8d")],
        "test": [("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")],
    },
}

LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}
TITLE = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
VAL_FRACTION, VAL_SEED = 0.1, 0
CACHE_FORMAT = "1"


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the extracted dataset folders (option, env var, or the cache)."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("KDBENCH_DATA_DIR")
    return Path(env).expanduser() if env else cache_dir() / "data"


def _folder(name: str, root: Path) -> Path:
    sub = ARCHIVES[name][2]
    if root.name == sub and not (root / sub).is_dir():
        return root  # data_dir points at the extracted folder itself
    return root / sub


def _missing_message(name: str, folder: Path, what: str) -> str:
    url, _, sub = ARCHIVES[name]
    return (
        f"{TITLE[name]} not found: {what} in {folder}; download {url} and extract it into "
        f"{folder.parent} (it unpacks to {sub}/), or run `kdbench data download {name}` "
        "(set the folder with --data-dir or KDBENCH_DATA_DIR)"
    )


def _check(name: str, folder: Path, files) -> None:
    from kdbench.data import md5sum

    if not folder.is_dir():
        raise KdbenchError(_missing_message(name, folder, "no such folder"))
    for fname, md5 in files:
        path = folder / fname
        if not path.is_file():
            raise KdbenchError(_missing_message(name, folder, f"file {fname!r} missing"))
        got = md5sum(path)
        if got != md5:
            raise KdbenchError(
                f"{TITLE[name]} file {path} is corrupt (md5 {got}, expected {md5}); delete {folder} "
                f"and run `kdbench data download {name}` again"
            )


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        blob = pickle.load(f, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in blob.items()}


def _decode(name: str, folder: Path, files) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for fname, _ in files:
        blob = _unpickle(folder / fname)
        data = np.asarray(blob["data"], dtype=np.uint8)
        xs.append(data.reshape(len(data), 3, 32, 32))
        ys.append(np.asarray(blob[LABEL_KEY[name]], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def read_split(name: str, part: str, data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole official ``part`` ("train" or "test") as (uint8 [N,3,32,32], int64 [N])."""
    files = FILES[name][part]
    key = "-".join(md5[:8] for _, md5 in files)
    cached = cache_dir() / "data" / f"{name}-{part}-{key}-v{CACHE_FORMAT}.npz"
    if cached.is_file():
        try:
            with np.load(cached) as blob:
                return torch.from_numpy(blob["x"]), torch.from_numpy(blob["y"])
        except (OSError, ValueError, KeyError):
            cached.unlink(missing_ok=True)  # a broken cache is rebuilt from the source
    folder = _folder(name, data_root(data_dir))
    _check(name, folder, files)
    x, y = _decode(name, folder, files)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, x=x, y=y)
    tmp.replace(cached)
    return torch.from_numpy(x), torch.from_numpy(y)


def load(name: str, split: str, data_dir=None, **options):
    if options:
        raise KdbenchError(
            f"dataset {name!r} has no option {sorted(options)[0]!r} (it takes: data_dir)"
        )
    if split == "test":
        return read_split(name, "test", data_dir)
    if split not in ("train", "val"):
        raise KdbenchError(f"dataset {name!r} has no split {split!r} (train, val, test)")
    x, y = read_split(name, "train", data_dir)
    train, val = carve_validation(x, y, fraction=VAL_FRACTION, seed=VAL_SEED)
    return train if split == "train" else val


def fetch(name: str, data_dir=None, base_url: str | None = None, progress=None) -> Path:
    """Download and extract the official archive of ``name`` into the data folder; returns the
    extracted folder, whose files are then checked. ``base_url`` replaces the official host
    (a mirror, or a local server in tests)."""
    from kdbench.data import download

    if name not in ARCHIVES:
        raise KdbenchError(f"no download for {name!r} (known: {', '.join(ARCHIVES)})")
    url, md5, _ = ARCHIVES[name]
    if base_url:
        url = base_url.rstrip("/") + "/" + url.rsplit("/", 1)[1]
    root = data_root(data_dir)
    download(url, root, md5, progress=progress)
    folder = root / ARCHIVES[name][2]
    _check(name, folder, [f for files in FILES[name].values() for f in files])
    return folder


#: 2 (2026-11-28): a crop pads the raw image with black before normalisation, as the reference
#: loaders do (before: zeros after it, the mean colour), and CIFAR-100 is normalised with the
#: reference code's mean and std. Runs and cached teachers of version 1 stay apart from these.
VERSION = "2"

DATASETS = [
    Dataset(
        name="cifar100",
        load=partial(load, "cifar100"),
        download=partial(fetch, "cifar100"),
        num_classes=100,
        input_shape=(3, 32, 32),
        recipe=load_recipe("cifar100-standard"),
        # RepDistiller's and mdistiller's Normalize (dataset/cifar100.py), not the 4-digit statistics
        # other code uses (0.4865, 0.4409 / 0.2673, 0.2564, 0.2762)
        mean=(0.5071, 0.4867, 0.4408),
        std=(0.2675, 0.2565, 0.2761),
        augment=Augment(crop_pad=4, flip=True),
        version=VERSION,
        default_teacher="resnet32x4",
        default_student="resnet8x4",
        description="CIFAR-100 from the official python archive (45000/5000/10000; "
        "`kdbench data download cifar100`)",
    ),
    Dataset(
        name="cifar10",
        load=partial(load, "cifar10"),
        download=partial(fetch, "cifar10"),
        num_classes=10,
        input_shape=(3, 32, 32),
        recipe=load_recipe("cifar100-standard"),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        augment=Augment(crop_pad=4, flip=True),
        version=VERSION,
        default_teacher="resnet56",
        default_student="resnet20",
        description="CIFAR-10 from the official python archive (45000/5000/10000; "
        "`kdbench data download cifar10`), trained with the CIFAR-100 recipe",
    ),
]
