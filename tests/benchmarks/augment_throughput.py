"""Augmentation throughput: kdbench's batched device path vs a per-sample DataLoader.

Both produce normalised, randomly cropped (pad 4) and flipped CIFAR-shaped batches from uint8
data (synthetic, 32x32x3). The device path does it batched on the device (here: wherever
--device points); the DataLoader does the usual per-sample Python transform with workers.
Prints samples/s of each and the ratio device path / DataLoader.

    python tests/benchmarks/augment_throughput.py [--n 20000] [--batch-size 64] [--workers 2] [--device cpu]
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from kdbench.contracts import Augment
from kdbench.core.splits import DeviceSplit

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class PerSample(Dataset):
    """The classic path: one sample at a time, random offsets and flip drawn per sample."""

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        img = self.x[i].float().div(255)
        img = F.pad(img, (4, 4, 4, 4))
        top, left = torch.randint(0, 9, (2,)).tolist()
        img = img[:, top:top + 32, left:left + 32]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return (img - self.mean) / self.std, self.y[i]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 100, (args.n,), generator=g)

    split = DeviceSplit(x.to(device), y.to(device), torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
                        torch.tensor(STD, device=device).view(1, 3, 1, 1))
    gen = torch.Generator(device=device).manual_seed(0)
    aug = Augment(crop_pad=4, flip=True)
    t = time.perf_counter()
    seen = 0
    for xb, yb, _ in split.shuffled(args.batch_size, gen, aug):
        seen += len(yb)
    if device.type == "cuda":
        torch.cuda.synchronize()
    device_rate = seen / (time.perf_counter() - t)

    loader = DataLoader(PerSample(x, y), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=False)
    t = time.perf_counter()
    seen = 0
    for xb, yb in loader:
        xb = xb.to(device, non_blocking=True)
        seen += len(yb)
    if device.type == "cuda":
        torch.cuda.synchronize()
    loader_rate = seen / (time.perf_counter() - t)
    print(f"{args.n} CIFAR-shaped samples, batch {args.batch_size}, device {device}, DataLoader workers {args.workers}")
    print(f"device path  {device_rate:10.0f} samples/s")
    print(f"DataLoader   {loader_rate:10.0f} samples/s")
    print(f"ratio device path / DataLoader = {device_rate / loader_rate:.1f}")


if __name__ == "__main__":
    main()
