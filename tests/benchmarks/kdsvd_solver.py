"""kdsvd's top singular vectors on CUDA: the exact float64 eigendecomposition per sample ("eigh",
the default) against one batched float32 SVD per stage ("gesvda", ``kdsvd.CUDA_SOLVER``) — time
per training step's worth of solves and how far the vectors and values differ. A benchmark that
prints figures (it decides whether "gesvda" can be kdsvd's CUDA default), not a test.

The maps are resnet8x4's and resnet32x4's stage outputs (random weights, the synthetic CIFAR
batch of cifar_epoch.py), so the spectra are those of real ReLU maps, not of noise.

    python tests/benchmarks/kdsvd_solver.py --device cuda [--batch-size 64] [--json F]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from kdbench.core import plugins
from kdbench.core.taps import Tapped
from kdbench.losses import stage_outputs
from kdbench_builtin.methods import kdsvd


def stage_maps(reg, name: str, batch_size: int, device) -> list[torch.Tensor]:
    """A network's stage outputs on one batch, as kdsvd reads them: [B, N, C] float32."""
    model = reg.models[name].obj
    net = model.make(100, (3, 32, 32)).to(device).eval()
    taps = model.taps_of(net)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = Tapped(net, taps, list(taps), name)(torch.rand(batch_size, 3, 32, 32, generator=g).to(device))
    return [kdsvd.as_matrix(f) for f in stage_outputs(out.feats)]


def timed(fn, device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--k", type=int, default=1, help="kdsvd's k (the student keeps k + 3)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    reg = plugins.load()
    maps = {net: stage_maps(reg, net, args.batch_size, device) for net in ("resnet32x4", "resnet8x4")}
    kept = {"resnet32x4": args.k, "resnet8x4": args.k + 3}  # teacher k, student k + 3

    def solves(solver: str):
        kdsvd.CUDA_SOLVER = solver
        return {net: [kdsvd.top_right_singular(m, kept[net]) for m in ms] for net, ms in maps.items()}

    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "batch_size": args.batch_size, "shapes": {n: [list(m.shape) for m in ms] for n, ms in maps.items()}}
    report["eigh_ms"] = 1000 * timed(lambda: solves("eigh"), device, args.repeats)
    print(f"eigh  : {report['eigh_ms']:9.2f} ms per step's solves (both networks, every stage)")
    if device.type != "cuda":
        print("gesvda needs CUDA: nothing to compare on this device")
    else:
        report["gesvda_ms"] = 1000 * timed(lambda: solves("gesvda"), device, args.repeats)
        exact, fast = solves("eigh"), solves("gesvda")
        worst_cos, worst_sv = 1.0, 0.0
        for net in maps:
            for (v_e, s_e), (v_f, s_f) in zip(exact[net], fast[net]):
                cos = (v_e * v_f).sum(1).abs()  # [B, n]: sign-free agreement of each vector
                worst_cos = min(worst_cos, cos[:, :1].min().item())  # the leading vector
                worst_sv = max(worst_sv, ((s_e - s_f).abs() / s_e.clamp_min(1e-12)).max().item())
                report.setdefault("cos_per_index", []).append(cos.min(0).values.tolist())
        report["worst_leading_cos"], report["worst_singular_value_rel_gap"] = worst_cos, worst_sv
        print(f"gesvda: {report['gesvda_ms']:9.2f} ms ({report['eigh_ms'] / report['gesvda_ms']:.1f}x); "
              f"leading vectors' worst |cos| to eigh {worst_cos:.6f}, singular values' worst relative gap "
              f"{worst_sv:.2e}; per stage, worst |cos| of each kept vector: {report['cos_per_index']}")
        kdsvd.CUDA_SOLVER = "eigh"
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
