"""Pieces for a model plugin's inference form of a frozen teacher (``Model.fuse``).

A teacher only runs forward passes with fixed weights, so each convolution followed by an
eval-mode BatchNorm, and the ReLU after it — with a residual block's shortcut added before that
ReLU — can be one cuDNN call: the BatchNorm folded into the convolution's weight and bias, the add
and the ReLU in the convolution's epilogue (``torch.cudnn_convolution_relu``,
``torch.cudnn_convolution_add_relu``: cuDNN's conv-bias-add-activation, the ops TorchScript's
frozen-module fusion uses). Each activation is then written once, with no BatchNorm/add/ReLU
pass over it: a resnet32x4 forward is 42 kernels on CUDA instead of about 153 (docs/PERFORMANCE.md).

What it changes: the BatchNorm's scale is applied to the weights before they are rounded to the
run's precision, not to the convolution's output (under bf16: bf16 rounding noise; float32: about
1e-6). kdbench checks a fused network against the original before it uses it
(``kdbench.core.engine``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


def cudnn_fusable(x: torch.Tensor) -> bool:
    """Whether the cuDNN conv-bias-add-ReLU ops can serve ``x`` (a test fakes them on the CPU)."""
    return x.is_cuda and torch.backends.cudnn.is_available()


class FusedConv(nn.Module):
    """``relu?(conv(x) + bias [+ z])`` with an eval-mode BatchNorm folded into ``weight``/``bias``
    (held in ``dtype``, the run's precision): one cuDNN call on CUDA; ``F.conv2d`` and separate
    add/ReLU elsewhere, or where cuDNN finds no fused kernel for the shape (``failed`` says why;
    that layer then stays unfused). Plain convolutions only (one group, zero padding)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool, dtype: torch.dtype):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"FusedConv takes a plain convolution (one group, zero padding): {conv}")
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                    bn.weight, bn.bias)
        memory = torch.channels_last if conv.weight.is_cuda else torch.contiguous_format
        self.register_buffer("weight", w.detach().to(dtype).contiguous(memory_format=memory))
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
            except RuntimeError as exc:  # decided at the first (eager) call, never under capture
                self.failed = str(exc).strip().splitlines()[0][:200]
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if z is not None:
            y = y + z
        return torch.relu(y) if self.relu else y


class FusedResidual(nn.Module):
    """A residual block for inference: ``path``'s (convolution, BatchNorm) pairs, each followed by
    a ReLU, the last one's after the shortcut is added — ``relu(bn_n(conv_n(…)) + shortcut(x))`` —
    with the shortcut's (convolution, BatchNorm) folded too, or None for the identity. One cuDNN
    call per convolution (a BasicBlock: two and the shortcut's; a Bottleneck: three)."""

    def __init__(self, path: Sequence[tuple[nn.Conv2d, nn.BatchNorm2d]],
                 shortcut: tuple[nn.Conv2d, nn.BatchNorm2d] | None, dtype: torch.dtype):
        super().__init__()
        self.path = nn.ModuleList(FusedConv(conv, bn, relu=True, dtype=dtype) for conv, bn in path)
        self.down = FusedConv(*shortcut, relu=False, dtype=dtype) if shortcut is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.down is None else self.down(x)
        for conv in self.path[:-1]:
            x = conv(x)
        return self.path[-1](x, z=shortcut)


def fuse_stem(net: nn.Module, conv: str = "conv1", bn: str = "bn1", relu: str = "relu", dtype=torch.float32) -> None:
    """``net``'s stem ``relu(bn(conv(x)))`` fused in place: the convolution becomes a
    :class:`FusedConv`, the BatchNorm and ReLU modules Identity (a tap on the ReLU still reads the
    stem's output)."""
    setattr(net, conv, FusedConv(getattr(net, conv), getattr(net, bn), relu=True, dtype=dtype))
    setattr(net, bn, nn.Identity())
    setattr(net, relu, nn.Identity())


def failed_layers(net: nn.Module) -> dict[str, str]:
    """The fused convolutions of ``net`` cuDNN had no fused kernel for, and its message."""
    return {name: m.failed for name, m in net.named_modules() if isinstance(m, FusedConv) and m.failed}
