"""Metrics: accuracy, convergence speed, teacher-gap closed, parameters and FLOPs."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

FRACTIONS = (0.90, 0.95, 0.99)


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits, for each k (a device tensor)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == y[:, None]
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks])


def convergence(curve: Sequence[float], seconds: Sequence[float], fractions=FRACTIONS) -> dict:
    """Epochs and seconds to first reach each fraction of the final value, and the normalised
    area under the curve.

    ``curve[i]`` is validation accuracy after epoch ``i+1``, ``seconds[i]`` the cumulative
    training time then. ``epochs_to_95`` = the first epoch (1-based) whose accuracy is at least
    0.95 × final. ``auc`` = mean accuracy over the epochs (area under the per-epoch curve divided
    by the number of epochs, i.e. in [0, 1]); faster convergence at equal final accuracy gives a
    larger value.
    """
    if not curve:
        return {}
    final = curve[-1]
    out = {}
    for f in fractions:
        i = next(i for i, v in enumerate(curve) if v >= f * final)
        pct = int(round(f * 100))
        out[f"epochs_to_{pct}"] = i + 1
        out[f"seconds_to_{pct}"] = float(seconds[i])
    out["auc"] = float(sum(curve) / len(curve))
    return out


def gap_closed(acc: float, acc_vanilla: float, acc_teacher: float) -> float | None:
    """(acc − acc_vanilla) / (acc_teacher − acc_vanilla); None when the teacher is no better."""
    denom = acc_teacher - acc_vanilla
    if denom <= 0:
        return None
    return (acc - acc_vanilla) / denom


def count_params(module: nn.Module | None, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def flops_per_sample(model: nn.Module, input_shape: Sequence[int], device="cpu") -> int:
    """Forward FLOPs for one sample (2 × multiply-accumulates), counted by FlopCounterMode in
    eval mode on a batch of one."""
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros((1, *input_shape), device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)
