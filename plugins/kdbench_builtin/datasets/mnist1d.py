"""MNIST-1D (Greydanus 2020): 10 classes of 1-D sequences of length 40, generated procedurally
by the ``mnist1d`` package (no download). 4000 train / 1000 test; validation is the fixed 10 %
carved from train. A damaged cached copy is set aside and generated again."""
import logging
import os
import time

import numpy as np
import torch

from kdbench.contracts import Augment, Dataset
from kdbench.data import carve_validation
from kdbench.data import cache_dir
from kdbench.recipes import load_recipe

GENERATOR_VERSION = "mnist1d-default-args-seed42"


def _generate() -> dict:
    path = cache_dir() / "data" / f"{GENERATOR_VERSION}.npz"
    if path.exists():
        try:
            with np.load(path) as blob:
                return {k: blob[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception as exc:  # truncated, garbage, missing arrays: set aside and generate again
            aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            try:
                path.replace(aside)
            except FileNotFoundError:
                pass
            logging.getLogger("kdbench").warning(
                "damaged cache file %s (%s: %s): moved to %s; the dataset is generated again",
                path, type(exc).__name__, (str(exc).strip().splitlines() or ["?"])[0], aside.name)
    if not path.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        data = make_dataset(get_dataset_args())  # seed 42, 5000 samples, 80/20 split
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, x=data["x"], y=data["y"], x_test=data["x_test"], y_test=data["y_test"])
        tmp.replace(path)
    with np.load(path) as blob:
        return {k: blob[k] for k in blob.files}


def load(split: str):
    data = _generate()
    if split == "test":
        x, y = data["x_test"], data["y_test"]
        return torch.tensor(x, dtype=torch.float32)[:, None, :], torch.tensor(y)
    x = torch.tensor(data["x"], dtype=torch.float32)[:, None, :]
    train, val = carve_validation(x, torch.tensor(data["y"]), fraction=0.1, seed=0)
    return train if split == "train" else val


DATASETS = [
    Dataset(
        name="mnist1d",
        load=load,
        num_classes=10,
        input_shape=(1, 40),
        recipe=load_recipe("mnist1d-embedded"),
        augment=Augment(),
        default_teacher="cnn1d_4x32",
        default_student="cnn1d_2x16",
        description="MNIST-1D, generated offline by the mnist1d package (3600/400/1000)",
        embedded=True,
    )
]
