"""One epoch of CIFAR-100 KD (resnet32x4 → resnet8x4 by default): the harness's device-resident
path vs the same step written as a plain PyTorch loop fed by a CPU DataLoader.

Harness: the whole split lives on the device as uint8; normalisation, pad-4 random crop and flip
are batched on the device; shuffling is a device permutation; kdbench.core.engine.train_stage runs the
KD step (taps, named loss terms, bf16 autocast and channels_last on CUDA).
Plain loop: the same models and loss, fed by a torch DataLoader whose workers crop, flip and
normalise each sample on the CPU (the usual torchvision-style pipeline, written with numpy since
there is no CPU torchvision here), pinned memory, non_blocking copies, the same autocast and
memory format.

Data: the real CIFAR-100 train split when ``--data-dir`` holds it, else synthetic CIFAR-shaped
uint8 data (the speed of either path does not depend on the pixel values). Prints samples/s of
each path for each batch size, the implied time of 240 epochs (training steps only, no
evaluation) and the ratio harness / plain.

    python tests/benchmarks/cifar_epoch.py [--device cuda] [--batch-sizes 64,1024] [--samples 50000]
    python tests/benchmarks/cifar_epoch.py --device cpu --samples 512 --teacher resnet8 --student resnet8  # smoke
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from kdbench.core import engine, plugins
from kdbench.contracts import Augment, Dataset, Recipe
from kdbench.core.engine import Stage
from kdbench.core.plan import RunConfig, make_plan
from kdbench.core.plugins import Entry

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def cifar_like(samples: int, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    if data_dir:
        from kdbench_builtin.datasets.cifar import read_split

        x, y = read_split("cifar100", "train", data_dir)
        return x[:samples], y[:samples], "cifar100 train split"
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (samples, 3, 32, 32), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, 100, (samples,), generator=g), "synthetic CIFAR-shaped uint8"


class PerSample(torch.utils.data.Dataset):
    """What a plain pipeline does per sample in its DataLoader workers: pad 4, random 32x32 crop,
    horizontal flip, scale to [0, 1], normalise."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y
        self.mean = np.asarray(MEAN, dtype=np.float32)[:, None, None]
        self.std = np.asarray(STD, dtype=np.float32)[:, None, None]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        img = np.pad(self.x[i], ((0, 0), (4, 4), (4, 4)))
        r, c = np.random.randint(0, 9, size=2)
        img = img[:, r : r + 32, c : c + 32]
        if np.random.rand() < 0.5:
            img = img[:, :, ::-1]
        img = (img.astype(np.float32) / 255 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(img)), int(self.y[i])


def kd_loss(z_s, z_t, y, T=4.0, alpha=0.9):
    kl = F.kl_div(F.log_softmax(z_s / T, 1), F.log_softmax(z_t / T, 1), reduction="batchmean", log_target=True)
    return (1 - alpha) * F.cross_entropy(z_s, y) + alpha * T * T * kl


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_epoch(student, teacher, loader, device, lr, max_steps=None) -> tuple[float, int]:
    cuda = device.type == "cuda"
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    student.train()
    seen = 0
    sync(device)
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        x = x.to(device, non_blocking=cuda)
        y = y.to(device, non_blocking=cuda)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with engine.autocast(device):
            with torch.no_grad():
                z_t = teacher(x)
            z_s = student(x)
            loss = kd_loss(z_s.float(), z_t.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    loss.item()
    sync(device)
    return time.perf_counter() - start, seen


def measure(args, device, x, y, batch_size):
    reg = plugins.registry()
    ds = Dataset(
        name="cifar100_bench", load=lambda split: (x, y), num_classes=100, input_shape=(3, 32, 32),
        recipe=Recipe(epochs=1, batch_size=batch_size, lr=0.05, schedule="constant", milestones=()),
        mean=MEAN, std=STD, augment=Augment(crop_pad=4, flip=True),
    )
    reg.datasets[ds.name] = Entry(ds, "bench", "bench", "0")
    plan = make_plan(RunConfig(method="kd", dataset=ds.name, teacher=args.teacher, student=args.student,
                               device=str(device)), reg)
    teacher = engine.build_teacher(plan, device).eval().requires_grad_(False)
    setup = engine.setup_student(plan, teacher, device)
    split = setup.splits["train"]
    # the plain loop gets its own copy of the same untrained student
    plain_student = copy.deepcopy(setup.trainee.student.model)
    stage = Stage("main", 1, plan.method_obj.loss)
    gen = torch.Generator(device=device).manual_seed(0)

    def harness_epoch():
        sync(device)
        start = time.perf_counter()
        engine.train_stage(setup.trainee, stage, 1, plan.recipe, split, gen, ds.augment, device,
                           lambda e, m: None, scheduled=False)
        sync(device)
        n = len(split) - len(split) % batch_size if len(split) > batch_size else len(split)
        return time.perf_counter() - start, n

    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        PerSample(x.numpy(), y.numpy()), batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )
    # warm-up: cuDNN autotuning, allocator, worker start-up
    harness_epoch() if args.warmup_full else None
    plain_epoch(plain_student, teacher, loader, device, 0.05, max_steps=args.warmup_steps)
    results = {"harness": [], "plain": []}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        results["harness"].append(harness_epoch())
        results["plain"].append(plain_epoch(plain_student, teacher, loader, device, 0.05))
    out = {}
    for name, runs in results.items():
        rates = sorted(n / s for s, n in runs)
        rate = rates[len(rates) // 2]
        out[name] = {"samples_per_s": rate, "epoch_s": len(split) / rate,
                     "hours_240_epochs": 240 * args.epoch_samples / rate / 3600}
    out["ratio_harness_over_plain"] = out["harness"]["samples_per_s"] / out["plain"]["samples_per_s"]
    out["workers"] = workers
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", default="64,1024")
    ap.add_argument("--samples", type=int, default=50000)
    ap.add_argument("--epoch-samples", type=int, default=45000,
                    help="samples per epoch for the 240-epoch estimate [kdbench's CIFAR-100 train split: "
                         "50000 less the 10 %% validation]")
    ap.add_argument("--teacher", default="resnet32x4")
    ap.add_argument("--student", default="resnet8x4")
    ap.add_argument("--data-dir", default=None, help="a folder holding cifar-100-python/ (else synthetic)")
    ap.add_argument("--workers", type=int, default=None, help="plain loop's DataLoader workers [min(8, cores)]")
    ap.add_argument("--repeats", type=int, default=1, help="timed epochs per path (median reported)")
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--warmup-full", action="store_true", help="also run one untimed harness epoch first")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    x, y, what = cifar_like(args.samples, args.data_dir)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"{args.teacher} -> {args.student} KD, one epoch of {len(y)} samples ({what}) on {name}")
    report = {"device": name, "samples": len(y), "data": what, "teacher": args.teacher, "student": args.student}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        r = measure(args, device, x, y, bs)
        report[f"batch_{bs}"] = r
        h, p = r["harness"], r["plain"]
        print(f"batch {bs:>5}: harness {h['samples_per_s']:>9.0f} samples/s ({h['epoch_s']:.2f} s/epoch, "
              f"240 epochs {h['hours_240_epochs']:.2f} h) | plain loop + DataLoader({r['workers']} workers) "
              f"{p['samples_per_s']:>9.0f} samples/s ({p['hours_240_epochs']:.2f} h) | ratio {r['ratio_harness_over_plain']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
