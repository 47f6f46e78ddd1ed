"""Suite throughput: cells per hour of `kdbench bench` with the local and the Ray executor on the same
small suite, and (``--gpu-packing``) aggregate samples/s of K runs packed on one GPU. Numbers, never
pass/fail: a benchmark, not a test.

* default: the embedded suite of ``--cells`` cells (vanilla and kd, ``--epochs`` epochs, the
  ``cnn1d_2x8`` pair; its teacher trained once beforehand, so both executors time cells only) run
  by ``kdbench bench --executor local --jobs N`` and ``--executor ray`` (a local Ray instance), each
  on a fresh store; prints the seconds, cells per hour and the ratio. Needs mlflow (and ray).
* ``--gpu-packing``: K = ``--ks`` (default 1,2,4) processes each fit KD (``--teacher`` →
  ``--student``, CIFAR-shaped synthetic data, batch ``--batch-size``) through
  ``kdbench.core.engine`` on the same device at once; prints aggregate samples/s for each K and the
  ratio to K=1. Needs only torch and kdbench (no mlflow, no ray): for a GPU machine.

Results also go to ``$OUT/suite_throughput.json`` when ``$OUT`` is set.

    python tests/benchmarks/suite_throughput.py --jobs 2                                   # local vs Ray
    python tests/benchmarks/suite_throughput.py --gpu-packing --device cuda                # K = 1, 2, 4
    python tests/benchmarks/suite_throughput.py --gpu-packing --device cpu --ks 1,2 --samples 128 \
        --batch-size 32 --teacher resnet8 --student resnet8 --epochs 1                     # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
SUITE = """
name = "throughput"
dataset = "mnist1d"
seeds = {seeds}
methods = ["vanilla", "kd"]
[recipe]
epochs = {epochs}
[[pairs]]
teacher = "cnn1d_2x8"
student = "cnn1d_2x8"
"""


# --------------------------------------------------------------------------- executors


def run_bench(workdir: Path, env: dict, *args: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kdbench", "bench", "suite.toml", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"kdbench bench {' '.join(args)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return seconds


def executors_mode(args) -> dict:
    seeds = list(range(max(1, args.cells // 2)))
    root = Path(tempfile.mkdtemp(prefix="suite-throughput-"))
    env = {**os.environ, "KDBENCH_CACHE_DIR": str(root / "cache"), "KDBENCH_BASELINE": "never"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    suite = SUITE.format(seeds=seeds, epochs=args.epochs)
    # the teacher once, in its own store: both executors then time the cells only
    (root / "warm").mkdir(parents=True)
    warm = subprocess.run([sys.executable, "-m", "kdbench", "run", "--method", "kd", "--teacher", "cnn1d_2x8",
                           "--student", "cnn1d_2x8", "--epochs", "1"], cwd=root / "warm", env=env,
                          capture_output=True, text=True, timeout=3600)
    if warm.returncode != 0:
        raise SystemExit(f"training the teacher failed:\n{warm.stdout[-3000:]}{warm.stderr[-3000:]}")
    out = {"cells": 2 * len(seeds), "epochs": args.epochs, "jobs": args.jobs}
    runs = [("local", ["--executor", "local", "--jobs", str(args.jobs)])]
    try:
        import ray  # noqa: F401
        runs.append(("ray", ["--executor", "ray"]))
    except ImportError:
        print("ray is not installed: the Ray executor is skipped (pip install 'kdbench[ray]')")
    for name, flags in runs:
        (root / name).mkdir()
        (root / name / "suite.toml").write_text(suite)
        seconds = run_bench(root / name, env, *flags)
        out[name] = {"seconds": seconds, "cells_per_hour": out["cells"] * 3600 / seconds}
        print(f"{name:>6}: {out['cells']} cells in {seconds:7.1f} s = {out[name]['cells_per_hour']:8.0f} cells/h "
              f"({' '.join(flags)})", flush=True)
    if "ray" in out:
        out["ray_vs_local"] = out["ray"]["cells_per_hour"] / out["local"]["cells_per_hour"]
        print(f"ray / local: {out['ray_vs_local']:.2f}x")
    return out


# --------------------------------------------------------------------------- GPU packing


def _fit(cfg: dict, barrier, results) -> None:
    """One packed run: a warm-up epoch (captures, compiles), then ``epochs`` timed epochs once all
    K processes are ready."""
    import torch

    from kdbench.contracts import Augment, Dataset, Recipe
    from kdbench.core import engine, plugins
    from kdbench.core.engine import Stage
    from kdbench.core.plan import RunConfig, make_plan
    from kdbench.core.plugins import Entry

    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (cfg["samples"], 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 100, (cfg["samples"],), generator=g)
    reg = plugins.registry()
    ds = Dataset(name="cifar100_packing", load=lambda split: (x, y), num_classes=100, input_shape=(3, 32, 32),
                 recipe=Recipe(epochs=1, batch_size=cfg["batch_size"], lr=0.05, schedule="constant", milestones=()),
                 mean=MEAN, std=STD, augment=Augment(crop_pad=4, flip=True))
    reg.datasets[ds.name] = Entry(ds, "bench", "bench", "0")
    plan = make_plan(RunConfig(method="kd", dataset=ds.name, teacher=cfg["teacher"], student=cfg["student"],
                               device=str(device), precision=cfg["precision"], capture=cfg["capture"],
                               recipe={"batch_size": cfg["batch_size"], "epochs": cfg["epochs"] + 1}), reg)
    teacher = engine.build_teacher(plan, device).eval().requires_grad_(False)
    setup = engine.setup_student(plan, teacher, device)
    split = setup.splits["train"]
    steps = len(split) // cfg["batch_size"]
    stage = Stage("main", cfg["epochs"] + 1, plan.method_obj.loss)
    gen = torch.Generator(device=device).manual_seed(0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    engine.train_stage(setup.trainee, stage, 1, plan.recipe, split, gen, ds.augment, device, lambda e, m: None,
                       scheduled=False)
    sync()
    barrier.wait()
    start = time.time()
    engine.train_stage(setup.trainee, stage, cfg["epochs"], plan.recipe, split, gen, ds.augment, device,
                       lambda e, m: None, scheduled=False)
    sync()
    results.put({"samples": steps * cfg["batch_size"] * cfg["epochs"], "start": start, "end": time.time()})


def packing_mode(args) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    cfg = {key: getattr(args, key) for key in ("device", "teacher", "student", "batch_size", "samples", "epochs",
                                               "precision", "capture")}
    out = {"device": args.device, **cfg, "ks": {}}
    if args.device.startswith("cuda"):
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
    for k in args.ks:
        cfg["threads"] = args.threads or max(1, (os.cpu_count() or 1) // k)
        barrier, results = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=_fit, args=(cfg, barrier, results)) for _ in range(k)]
        for proc in procs:
            proc.start()
        rows = [results.get(timeout=3600) for _ in procs]
        for proc in procs:
            proc.join()
            if proc.exitcode:
                raise SystemExit(f"a packed run failed (exit status {proc.exitcode})")
        seconds = max(r["end"] for r in rows) - min(r["start"] for r in rows)
        rate = sum(r["samples"] for r in rows) / seconds
        out["ks"][k] = {"samples_per_s": rate, "seconds": seconds,
                        "ratio_to_k1": rate / out["ks"][args.ks[0]]["samples_per_s"] if out["ks"] else 1.0}
        print(f"K={k}: {rate:10.0f} samples/s aggregate over {seconds:6.1f} s = "
              f"{out['ks'][k]['ratio_to_k1']:.2f}x K={args.ks[0]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-packing", action="store_true", help="K runs packed on one device (torch only)")
    parser.add_argument("--jobs", type=int, default=2, help="local executor: worker processes")
    parser.add_argument("--cells", type=int, default=6, help="executor mode: cells of the suite (even)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per cell (default 2) / timed epochs per packed run (default 2)")
    parser.add_argument("--ks", default="1,2,4", help="runs per GPU to measure")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=10_000, help="samples per packed run's epoch")
    parser.add_argument("--precision", default=None)
    parser.add_argument("--capture", default=None)
    parser.add_argument("--threads", type=int, default=None, help="threads per packed run [cores // K]")
    args = parser.parse_args()
    args.epochs = args.epochs or 2
    args.ks = [int(k) for k in args.ks.split(",")]
    out = packing_mode(args) if args.gpu_packing else executors_mode(args)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "suite_throughput.json"
        path.write_text(json.dumps(out, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
