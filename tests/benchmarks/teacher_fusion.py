"""An experiment of the step benchmark (``cifar_epoch.py --fuse-teacher``): the frozen teacher's
convolutions with their BatchNorm folded in and the ReLU (and a residual block's shortcut add) in
the convolution's epilogue — one cuDNN call per convolution on CUDA
(``torch.cudnn_convolution_relu``, ``torch.cudnn_convolution_add_relu``: cuDNN's
conv-bias-add-activation, the ops TorchScript's frozen-module fusion uses).

Why: resnet32x4's forward is 153 operators under bf16 autocast (34 convolutions, 34 BatchNorms,
31 ReLUs, 15 adds, 37 casts); fused, 39 (31 fused convolutions, 3 shortcut convolutions, the
pooling, the classifier and 3 casts; 42 kernels on CUDA, where PyTorch adds a convolution's bias
with a kernel of its own), and each activation is written once. On the H100 at batch 64 a
captured step is bound by the number of kernels its graph replays; at batch 1024 by memory
traffic, and the BatchNorm/add/ReLU pass over every teacher activation is what ``compile`` left
(PERFORMANCE.md). Folding the BatchNorm alone (``--fold-teacher-bn``) removes no kernel on CUDA
for the same reason: the folded bias replaces the BatchNorm's kernel with an add.

What it changes, so that it stays an experiment until measured: the BatchNorm is folded into the
weights in float32 and then rounded to the run's precision (under bf16 the weights are rounded
after the scale, not the convolution's output before it: bf16 noise, measured by ``compare``);
taps inside a block (``stage*_pre``) no longer fire (the pre-activation is never written); KD reads
the logits only. Built for the built-in CIFAR ResNets' BasicBlock (conv1, bn1, relu, conv2, bn2,
downsample, out_relu) and their stem; anything else is left as it is. The fused teacher is kept out
of ``torch.compile`` (the cuDNN ops have no fake-tensor kernels; there is nothing left to fuse).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from kdbench.core.precision import autocast, bf16_weights


def cudnn_fusable(x: torch.Tensor) -> bool:
    """Whether the cuDNN conv-bias-add-ReLU ops can serve ``x`` (a test fakes them on the CPU)."""
    return x.is_cuda and torch.backends.cudnn.is_available()


class FusedConv(nn.Module):
    """``relu?(conv(x) + bias [+ z])`` with a BatchNorm folded into ``weight``/``bias``: one cuDNN
    call on CUDA; ``F.conv2d`` and separate add/ReLU elsewhere, or where cuDNN finds no fused kernel
    for the shape (``failed`` says why; that layer then stays unfused)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool, dtype: torch.dtype):
        super().__init__()
        assert conv.groups == 1 and conv.padding_mode == "zeros", conv
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                    bn.weight, bn.bias)
        self.register_buffer("weight", w.detach().to(dtype).contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", b.detach().to(dtype))
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.relu = relu
        self.failed: str | None = None

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if self.relu and self.failed is None and cudnn_fusable(x):
            try:
                if z is None:
                    return torch.cudnn_convolution_relu(x, self.weight, self.bias, self.stride, self.padding,
                                                        self.dilation, 1)
                return torch.cudnn_convolution_add_relu(x, self.weight, z.to(x.dtype), 1.0, self.bias,
                                                        self.stride, self.padding, self.dilation, 1)
            except RuntimeError as exc:  # decided at the first (eager, warm-up) call, never under capture
                self.failed = str(exc).strip().splitlines()[0][:200]
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if z is not None:
            y = y + z
        return torch.relu(y) if self.relu else y


class FusedBlock(nn.Module):
    """A BasicBlock as two fused convolutions: ``relu(bn1(conv1(x)))`` and
    ``relu(bn2(conv2(h)) + shortcut)``, the shortcut's convolution with its BatchNorm folded."""

    def __init__(self, block: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.c1 = FusedConv(block.conv1, block.bn1, relu=True, dtype=dtype)
        self.c2 = FusedConv(block.conv2, block.bn2, relu=True, dtype=dtype)
        ds = block.downsample
        self.down = FusedConv(ds[0], ds[1], relu=False, dtype=dtype) if ds is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x)
        shortcut = x if self.down is None else self.down(x)
        return self.c2(h, z=shortcut)


def _is_basic_block(m: nn.Module) -> bool:
    names = {n for n, _ in m.named_children()}
    return {"conv1", "bn1", "conv2", "bn2", "out_relu"} <= names and "conv3" not in names


def fuse_teacher(net: nn.Module, dtype: torch.dtype) -> dict:
    """Fuse ``net`` (eval mode, frozen) in place: the stem's ``conv1``/``bn1``/``relu`` and every
    BasicBlock of its ``layer*`` Sequentials. The model's own forward still runs (``layer1``'s
    output is still a hook's ``stage1``); the replaced stem modules become Identity. Returns what
    was fused, with the layers cuDNN refused after a first call (``failed``)."""
    assert not net.training, "fuse an eval-mode teacher"
    blocks = 0
    for name, child in list(net.named_children()):
        if isinstance(child, nn.Sequential) and name.startswith("layer"):
            for i, block in enumerate(child):
                if _is_basic_block(block):
                    child[i] = FusedBlock(block, dtype)
                    blocks += 1
    stem = all(isinstance(getattr(net, n, None), t) for n, t in
               (("conv1", nn.Conv2d), ("bn1", nn.BatchNorm2d), ("relu", nn.ReLU)))
    if stem:
        net.conv1 = FusedConv(net.conv1, net.bn1, relu=True, dtype=dtype)
        net.bn1, net.relu = nn.Identity(), nn.Identity()
    net.forward = torch.compiler.disable(net.forward)
    net.requires_grad_(False)
    return {"blocks": blocks, "stem": stem, "dtype": str(dtype).replace("torch.", "")}


def failed_layers(net: nn.Module) -> dict[str, str]:
    """The fused convolutions cuDNN had no fused kernel for, and its message."""
    return {n: m.failed for n, m in net.named_modules() if isinstance(m, FusedConv) and m.failed}


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


def _variants(net: nn.Module, bf16: bool) -> dict[str, nn.Module]:
    """The teacher with autocast's casts ("plain"), with its weights held in bf16 as a bf16 run's
    captured steps hold them, and the experiments of cifar_epoch.py on a copy each."""
    import copy

    from cifar_epoch import fold_batchnorm  # beside this script

    out = {"plain": net}
    if bf16:
        out["bf16_weights"] = HeldWeights(net)
    out["folded_bn"] = fold_batchnorm(copy.deepcopy(net))
    fused = copy.deepcopy(net)
    fuse_teacher(fused, torch.bfloat16 if bf16 else torch.float32)
    out["fused"] = fused
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
    held in bf16 (as a bf16 run's captured steps run it), with the BatchNorm folded, fused; eager
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
    net = plugins.load().models[args.teacher].obj.make(100, (3, 32, 32)).to(device).eval().requires_grad_(False)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    nets = _variants(net, bf16)
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
