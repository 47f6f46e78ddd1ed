"""check_dataset passes good datasets and names what to fix in bad ones."""
import pytest
import torch

from kdbench.contracts import Dataset, Recipe
from kdbench.testing import check_dataset


def synthetic(val_overlap=False, labels_offset=0, noisy=False, num_classes=4):
    def load(split):
        generator = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
        x = torch.randn(40, 1, 8, generator=generator)
        if noisy:
            x = x + torch.randn(x.shape) * 1e-3
        if split == "val" and val_overlap:
            x[:3] = load("train")[0][:3]
        return x, torch.arange(40) % 4 + labels_offset

    return Dataset("kdtest_ds", load, num_classes, (1, 8), Recipe(epochs=2, batch_size=8, lr=0.1))


def test_good_dataset_passes(env):
    check_dataset(synthetic())


@pytest.mark.parametrize("ds, pattern", [
    (synthetic(val_overlap=True), r"3 validation sample\(s\) also appear in 'train' — carve val from train"),
    (synthetic(labels_offset=1), r"labels span 1..4 but num_classes=4"),
    (synthetic(num_classes=6), r"'train' holds 4 of num_classes=6 classes"),
    (synthetic(noisy=True), r"split 'train' differs between two loads"),
    (Dataset("kdtest_ds", synthetic().load, 4, (1, 9), Recipe(epochs=2, batch_size=8, lr=0.1)),
     r"samples of shape \(1, 8\), input_shape declares \(1, 9\)"),
    (Dataset("kdtest_ds", synthetic().load, 4, (1, 8), Recipe(epochs=2, batch_size=8, lr=0.1), mean=(0.1, 0.2)),
     r"mean has 2 values; give one per channel \(1\)"),
    (Dataset("kdtest_ds", synthetic().load, 4, (1, 8), Recipe(epochs=2, batch_size=8, lr=0.1), default_student="nope"),
     r"default_student='nope' is not a registered model"),
])
def test_bad_datasets(env, fails, ds, pattern):
    fails(pattern, check_dataset, ds)
