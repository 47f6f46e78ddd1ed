"""The frozen teacher's forward alone, as the engine runs it: with autocast's weight casts
("plain"), with its weights held in bf16 (as a bf16 run's captured steps hold them), and fused
(``Model.fuse``, ``kdbench.fusion``: each convolution with its BatchNorm, ReLU and residual add one
cuDNN call; the engine's default at bf16 on CUDA) — eager and replayed from a CUDA graph, with the
fused logits' distance to the plain ones. The teacher's share of a step, and what fusing saves.

    python tests/benchmarks/teacher_fusion.py --device cuda [--batch-sizes 64,1024] [--json F]
"""
from __future__ import annotations

import torch
from torch import nn

from kdbench.core.precision import autocast, bf16_weights
from kdbench.fusion import failed_layers


@torch.no_grad()
def compare(original: nn.Module, fused: nn.Module, x: torch.Tensor, precision: str) -> dict:
    """The fused teacher's logits against the original's on ``x`` (the run's autocast, ``precision``
    bf16 or fp32): the largest difference relative to the largest logit, and how often the top-1
    class agrees."""
    with autocast(x.device, precision):
        a, b = original(x).float(), fused(x).float()
    return {"max_rel_diff": ((a - b).abs().max() / a.abs().max()).item(),
            "top1_agree": (a.argmax(1) == b.argmax(1)).float().mean().item()}


# --------------------------------------------------------------------------- the benchmark

class HeldWeights(nn.Module):
    """The teacher as a bf16 run's captured steps run it: its convolution and linear weights held
    in bf16 (the engine's ``TEACHER_WEIGHTS``), the network itself left as it is."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.weights = net, bf16_weights(net)

    def forward(self, x):
        return torch.func.functional_call(self.net, self.weights, (x,))


def fused_copy(model, net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``net`` fused as the engine fuses a frozen teacher (its model's ``fuse`` on an eval copy)."""
    import copy

    return model.fuse(copy.deepcopy(net).eval(), dtype).requires_grad_(False)


def _variants(model, net: nn.Module, bf16: bool) -> dict[str, nn.Module]:
    """The teacher with autocast's casts ("plain"), with its weights held in bf16 as a bf16 run's
    captured steps hold them, and fused."""
    out = {"plain": net}
    if bf16:
        out["bf16_weights"] = HeldWeights(net)
    out["fused"] = fused_copy(model, net, torch.bfloat16 if bf16 else torch.float32)
    return out


def time_forward(net: nn.Module, x: torch.Tensor, precision: str, graphed: bool, repeats: int) -> float:
    """ms per forward pass of ``net`` on ``x`` (no grad, the run's autocast): eager, or replayed
    from a CUDA graph (how a captured step runs it)."""
    import time

    from cifar_epoch import sync  # beside this script

    from kdbench.core.capture import on_side_stream

    def forward():
        with torch.no_grad(), autocast(x.device, precision, cache=False):
            return net(x)

    for _ in range(3):  # cuDNN's autotuning, the fused ops' first call, the allocator
        forward()
    run = forward
    if graphed:
        on_side_stream(x.device, forward)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()
        run = graph.replay
    sync(x.device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    sync(x.device)
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    """ms per teacher forward at each batch size: with autocast's weight casts, with its weights
    held in bf16 (as a bf16 run's captured steps run it), fused; eager
    and (CUDA) replayed from a graph. The fused teacher's distance to the plain one is printed too."""
    import argparse
    import json

    from kdbench.core import plugins

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--teacher", default="resnet32x4")
    ap.add_argument("--batch-sizes", default="64,1024")
    ap.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="[bf16 on CUDA, fp32 on CPU]")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    precision = args.precision or ("bf16" if cuda else "fp32")
    bf16 = precision == "bf16"
    torch.manual_seed(0)
    model = plugins.load().models[args.teacher].obj
    net = model.make(100, (3, 32, 32)).to(device).eval().requires_grad_(False)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    nets = _variants(model, net, bf16)
    report = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
              "teacher": args.teacher, "precision": precision, "batch": {}}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        x = torch.randn(bs, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
        x = x.contiguous(memory_format=torch.channels_last) if cuda else x
        row = {"fused_against_plain": compare(nets["plain"], nets["fused"], x, precision)}
        for name, variant in nets.items():
            for graphed in ([False, True] if cuda else [False]):
                ms = time_forward(variant, x, precision, graphed, args.repeats)
                row[f"{name}{'_graph' if graphed else ''}_ms"] = ms
        row["fused_refused"] = failed_layers(nets["fused"])
        report["batch"][bs] = row
        print(f"batch {bs:>5}: " + "  ".join(f"{k[:-3]} {v:.3f} ms" for k, v in row.items() if k.endswith("_ms"))
              + f"  | fused vs plain {row['fused_against_plain']}  refused {len(row['fused_refused'])}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
