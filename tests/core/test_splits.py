"""Device-resident data: loading a split, the batched augmentation against a per-sample
reference, and the DataLoader path for data too large for the device."""
import pytest
import torch

from kdbench.contracts import Augment
from kdbench.core import plugins
from kdbench.core.splits import augment_batch, load_split, random_crop


def _offsets_1d(out, padded):
    """For each sample, the offsets o with padded[b, :, o:o+L] == out[b] (reference, per sample)."""
    length = out.shape[-1]
    return [[o for o in range(padded.shape[-1] - length + 1) if torch.equal(padded[b, :, o:o + length], out[b])]
            for b in range(len(out))]


def test_random_crop_1d_is_a_shifted_window():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(1, 2 * 3 * 10 + 1, dtype=torch.float32).view(2 * 3, 1, 10).repeat(50, 1, 1)
    out = random_crop(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2))
    offsets = _offsets_1d(out, padded)
    assert all(len(o) == 1 for o in offsets)  # distinct values: exactly one matching window
    counts = torch.bincount(torch.tensor([o[0] for o in offsets]), minlength=5)
    assert len(counts) == 5 and counts.min() > 30  # every offset in [0, 2·pad] occurs (300 samples)


def test_random_crop_2d_matches_a_per_sample_crop():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 8, 8)
    out = random_crop(x, 4, g)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    seen = set()
    for b in range(len(x)):
        hits = [(i, j) for i in range(9) for j in range(9) if torch.equal(padded[b, :, i:i + 8, j:j + 8], out[b])]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) > 30  # offsets vary per sample


def test_flip_mirrors_about_half_the_batch():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(400, 1, 5)
    out = augment_batch(x, Augment(flip=True), g)
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped | kept).all())
    assert 160 < int(flipped.sum()) < 240


def test_crops_pad_the_raw_image_with_black_before_normalisation():
    """As torchvision's RandomCrop(padding=4) and RandomHorizontalFlip on the PIL image, then
    ToTensor and Normalize (RepDistiller's, mdistiller's CIFAR loaders): each training sample is
    a crop, maybe mirrored, of the raw image padded with 0, normalised — the padding is
    (0 - mean) / std, not the mean colour that padding after normalisation would give."""
    from kdbench.core.splits import DeviceSplit

    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (32, 3, 6, 6), dtype=torch.uint8, generator=g)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    split = DeviceSplit(x, torch.zeros(32, dtype=torch.long), mean, std)
    (out, _, idx), = list(split.shuffled(32, torch.Generator().manual_seed(1), Augment(crop_pad=2, flip=True)))
    reference = (torch.nn.functional.pad(x[idx], (2, 2, 2, 2)).float() / 255 - mean) / std
    found, padded = set(), 0
    for b in range(32):
        hits = [(i, j, f) for i in range(5) for j in range(5) for f in (False, True)
                if torch.equal(out[b], (lambda c: c.flip(-1) if f else c)(reference[b, :, i:i + 6, j:j + 6]))]
        assert len(hits) == 1, (b, hits)
        found.add(hits[0])
        padded += int((out[b] == (-mean / std)[0]).all(0).sum())  # black pixels: only the padding's
    assert len(found) > 15 and padded > 0


def test_loader_path_draws_exactly_the_device_paths_batches():
    """The DataLoader path (workers, for large data) and the device path give the same batches
    from the same generator: same order, same crops, same flips."""
    from torch.utils.data import TensorDataset

    from kdbench.core.splits import DeviceSplit, LoaderSplit

    x = torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(70) % 7
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    aug = Augment(crop_pad=2, flip=True)
    dev = DeviceSplit(x, y, mean, std)
    loader = LoaderSplit(TensorDataset(x, y), torch.device("cpu"), mean, std, workers=2)
    a = list(dev.shuffled(16, torch.Generator().manual_seed(5), aug))
    b = list(loader.shuffled(16, torch.Generator().manual_seed(5), aug))
    assert len(a) == len(b) == 4  # 70 // 16, the partial batch dropped on both
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb)
    evals = [torch.cat([xb for xb, _ in s.batches(32)]) for s in (dev, loader)]
    torch.testing.assert_close(evals[0], evals[1])
    torch.testing.assert_close(evals[0], (x.float() / 255 - 0.5) / 0.25)


def test_model_layout_is_channels_last_for_cuda_image_batches_only():
    from kdbench.core.splits import model_layout

    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    cl = model_layout(x, cuda=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, x) and cl.stride() == (60, 1, 15, 3)  # same values, NHWC strides
    assert model_layout(x, cuda=False) is x and model_layout(x) is x  # CPU tensors stay as they are
    seq = torch.zeros(2, 1, 40)
    assert model_layout(seq, cuda=True) is seq  # 1-D signals have no channels_last


def test_cifar_epoch_benchmark_runs_and_reports_a_ratio(tmp_path):
    """The GPU epoch benchmark (tests/benchmarks/cifar_epoch.py) at smoke size on CPU: both paths
    train the same step and the report holds each path's rate and their ratio."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "cifar_epoch.py"
    out = tmp_path / "r.json"
    env = {**os.environ, "KDBENCH_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(script), "--plain", "--device", "cpu", "--samples", "256", "--teacher", "resnet8",
         "--student", "resnet8", "--batch-sizes", "128", "--workers", "0", "--warmup-steps", "1",
         "--json", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    r = report["plain_batch_128"]
    assert report["samples"] == 256 and report["data"].startswith("synthetic")
    for path in ("harness", "plain"):
        assert r[path]["samples_per_s"] > 0
        # 240 epochs of the 45000-sample train split at the measured rate
        assert r[path]["hours_240_epochs"] == pytest.approx(240 * 45000 / r[path]["samples_per_s"] / 3600)
    assert r["ratio_harness_over_plain"] == pytest.approx(r["harness"]["samples_per_s"] / r["plain"]["samples_per_s"])
    assert "ratio" in proc.stdout


def test_loader_path_keeps_its_workers_and_reshuffles_each_epoch():
    """Two epochs through one LoaderSplit: each epoch matches the device path's epoch from the
    same generator (a new order each time), and the same worker processes read both."""
    import os

    from kdbench.core.splits import DeviceSplit, LoaderSplit

    class Pids(torch.utils.data.Dataset):  # y is the pid of the process that read the sample
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return torch.full((1, 4), float(i)), os.getpid()

    loader = LoaderSplit(Pids(), torch.device("cpu"), None, None, workers=2)
    dev = DeviceSplit(torch.arange(40.0)[:, None, None].expand(40, 1, 4).clone(), torch.zeros(40), None, None)
    g_dev, g_load = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    epochs, pids = [], []
    for _ in range(2):
        a = list(dev.shuffled(8, g_dev, Augment()))
        b = list(loader.shuffled(8, g_load, Augment()))
        assert [i.tolist() for _, _, i in a] == [i.tolist() for _, _, i in b]
        assert all(torch.equal(xa, xb) for (xa, _, _), (xb, _, _) in zip(a, b))
        epochs.append(torch.cat([i for _, _, i in b]).tolist())
        pids.append({int(p) for _, y, _ in b for p in y})
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1]) == list(range(40))
    assert pids[0] == pids[1] and os.getpid() not in pids[0] and len(pids[0]) == 2


def test_a_sample_that_fails_in_a_worker_is_one_line_naming_the_cause():
    from kdbench.core.splits import LoaderSplit
    from kdbench.errors import KdbenchError

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            if i == 5:
                raise ValueError("sample 5 is truncated")
            return torch.zeros(1, 4), 0

    split = LoaderSplit(Broken(), torch.device("cpu"), None, None, workers=1)
    with pytest.raises(KdbenchError) as info:
        list(split.batches(4))
    assert str(info.value) == "reading a sample failed in a DataLoader worker: ValueError: sample 5 is truncated"


def test_mnist1d_splits(env):
    ds = plugins.registry().dataset("mnist1d")
    splits = {s: load_split(ds, s, torch.device("cpu"), {}) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 3600, "val": 400, "test": 1000}
    assert splits["train"].x.shape[1:] == (1, 40) and splits["train"].x.dtype == torch.float32
    assert sorted(splits["test"].y.unique().tolist()) == list(range(10))
    again = load_split(ds, "val", torch.device("cpu"), {})
    assert torch.equal(again.x, splits["val"].x)  # the validation carve is fixed
    # validation samples are not in train
    train_rows = {tuple(r.tolist()) for r in splits["train"].x[:, 0]}
    assert not any(tuple(r.tolist()) in train_rows for r in splits["val"].x[:, 0])
