"""Seconds per student-epoch of a group of methods trained in lockstep (one teacher forward per
batch, :mod:`kdbench.core.lockstep`) vs the same methods trained separately (issue 17 item 4).
Numbers, never pass/fail: a benchmark, not a test. Needs only torch and kdbench (no MLflow).

* ``--scale embedded`` (default): the embedded MNIST-1D data and default pair (cnn1d_4x32 →
  cnn1d_2x16), the CPU scale of the test suite.
* ``--scale cifar``: resnet32x4 → resnet8x4 on synthetic CIFAR-100-shaped uint8 data (pad-crop
  and flip augmentation on the device), as tests/benchmarks/cifar_epoch.py; meant for a GPU.

Each figure is the best main-stage epoch after the first (``--epochs`` ≥ 2) over ``--rounds``
rounds (separate and lockstep alternated), training steps only
(validation excluded, as the engine's ``epoch_seconds``). Separately: the mean over the methods
of their own epoch time. Lockstep: the group's epoch time divided by its members. It also says
whether every member's validation curve equals its separate run's (bitwise on the CPU in fp32).
On CUDA with captured steps the members of a group run on parallel streams inside its graph;
``--streams serial`` runs them one after the other instead, ``--streams both`` times both and
reports how far their curves differ (the same kernels on the same inputs: they should not).
With graphs the teacher forward runs on a branch of its own (``--teacher-stream``, the engine's
``TEACHER_STREAM``): ``ahead`` (the default) computes the next batch's beside the whole step, a
separate run's and a group's alike; ``beside`` computes this batch's beside the student forwards;
``serial`` runs every teacher forward before the students'.
Writes JSON to ``--json`` and to ``$OUT/lockstep_epoch.json`` when ``$OUT`` is set.

    python tests/benchmarks/lockstep_epoch.py --threads 1                       # CPU, embedded
    python tests/benchmarks/lockstep_epoch.py --device cuda --scale cifar --batch-size 64
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from kdbench.contracts import Augment, Dataset, Recipe
from kdbench.core import capture, engine, lockstep, plugins
from kdbench.core.plan import RunConfig, make_plan
from kdbench.core.plugins import Entry

#: eight methods that share the teacher forward, none with a pre-stage (the main stage is timed)
METHODS = "kd,dkd,at,sp,pkt,rkd,vid,crd"
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def cifar_registry(samples: int, batch_size: int):
    """The registry with a CIFAR-100-shaped synthetic dataset (the same tensors for every split)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (samples, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 100, (samples,), generator=g)
    reg = plugins.registry()
    ds = Dataset(name="cifar100_synthetic", load=lambda split: (x, y), num_classes=100, input_shape=(3, 32, 32),
                 recipe=Recipe(epochs=1, batch_size=batch_size, lr=0.05, schedule="constant", milestones=()),
                 mean=MEAN, std=STD, augment=Augment(crop_pad=4, flip=True))
    reg.datasets[ds.name] = Entry(ds, "bench", "bench", "0")
    return reg, ds.name


def plans(args, reg, dataset, capture):
    recipe = {"epochs": args.epochs}
    if args.batch_size:
        recipe["batch_size"] = args.batch_size
    teacher, student = ("resnet32x4", "resnet8x4") if args.scale == "cifar" else (None, None)
    return [make_plan(RunConfig(method=m, dataset=dataset, teacher=teacher, student=student, recipe=recipe,
                                device=str(args.device), precision=args.precision, capture=capture), reg)
            for m in args.methods.split(",")]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_epoch(seconds: list[float]) -> float:
    return min(seconds[1:]) if len(seconds) > 1 else seconds[0]


def separate(plan_list, teacher, device) -> tuple[dict, dict]:
    """Each method alone: its best main-stage epoch seconds, and its validation curve."""
    seconds, curves = {}, {}
    for plan in plan_list:
        epochs = []
        setup = engine.setup_student(plan, teacher, device)
        sync(device)
        result = engine.run_student(plan, setup, device, lambda e: epochs.append(e.metrics["epoch_seconds"])
                                    if e.stage == "main" else None, with_test=False)
        seconds[plan.method_obj.name], curves[plan.method_obj.name] = best_epoch(epochs), result.curve
    return seconds, curves


def together(plan_list, teacher, device) -> tuple[float, dict, int]:
    """The methods in one lockstep group: seconds per student-epoch, curves, teacher forwards."""
    setups, members, epochs = [], [], []
    for i, plan in enumerate(plan_list):
        setup = engine.setup_student(plan, teacher, device)
        if setups:
            setup.splits = setups[0].splits
        setups.append(setup)
        log = (lambda e: epochs.append(e.metrics["epoch_seconds"]) if e.stage == "main" else None) if i == 0 \
            else (lambda e: None)
        members.append(lockstep.member(plan, setup, device, log, with_test=False))
    group = lockstep.share_teacher(setups, teacher, plan_list[0].teacher_obj.taps_of(teacher), "teacher")
    sync(device)
    outcomes = lockstep.fit_group(members, group, device)
    group.tapped.remove()
    curves = {}
    for plan, outcome in zip(plan_list, outcomes):
        if outcome.error is not None:
            raise SystemExit(f"{plan.method_obj.name} failed in the group: {outcome.error}")
        curves[plan.method_obj.name] = outcome.result.curve
    return best_epoch(epochs), curves, group.forwards


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda (default: cuda when available)")
    parser.add_argument("--scale", choices=("embedded", "cifar"), default="embedded")
    parser.add_argument("--methods", default=METHODS, help=f"comma-separated (default {METHODS})")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--samples", type=int, default=10000, help="--scale cifar: training samples")
    parser.add_argument("--precision", default=None, help="bf16 | fp32 (default: the device's)")
    parser.add_argument("--capture", default="none",
                        help="none (default: the teacher forward is shared only by eager steps), compile, graphs")
    parser.add_argument("--rounds", type=int, default=2, help="separate and lockstep, alternated, this many times")
    parser.add_argument("--separate-capture", default=None,
                        help="the separate runs' capture (default: --capture), e.g. graphs: the CUDA default")
    parser.add_argument("--streams", choices=("parallel", "serial", "both"), default="parallel",
                        help="a group graph's members on parallel streams (default), one after the other, or both")
    parser.add_argument("--teacher-stream", choices=engine.TEACHER_STREAMS, default="ahead",
                        help="with graphs, where the teacher forward runs (engine.TEACHER_STREAM), a separate run's "
                             "and a group's alike: for the next batch beside the whole step (ahead, the default), for "
                             "this batch beside the student forwards (beside), or before them (serial)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend of the compile modes (e.g. aot_eager)")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args()
    if args.compile_backend:
        capture.COMPILE_OPTIONS = {**capture.COMPILE_OPTIONS, "backend": args.compile_backend}
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = engine.select_device(args.device)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.scale == "cifar":
        reg, dataset = cifar_registry(args.samples, args.batch_size or 64)
    else:
        reg, dataset = plugins.registry(), None
    plan_list = plans(args, reg, dataset, args.capture)
    alone_plans = plans(args, reg, dataset, args.separate_capture or args.capture)
    teacher = engine.build_teacher(plan_list[0], args.device).eval().requires_grad_(False)

    engine.TEACHER_STREAM = args.teacher_stream
    start = time.perf_counter()
    modes = ("parallel", "serial") if args.streams == "both" else (args.streams,)
    alone, grouped, curves_of = {}, {mode: float("inf") for mode in modes}, {}
    for _ in range(args.rounds):  # alternated, each figure its best round: a busy machine drifts
        seconds, alone_curves = separate(alone_plans, teacher, args.device)
        alone = {m: min(s, alone.get(m, s)) for m, s in seconds.items()}
        for mode in modes:
            lockstep.PARALLEL_STREAMS = mode == "parallel"
            seconds, curves_of[mode], forwards = together(plan_list, teacher, args.device)
            grouped[mode] = min(grouped[mode], seconds)
    group_curves = curves_of[modes[0]]
    per_student_alone = statistics.mean(alone.values())
    figures = {
        "device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "scale": args.scale,
        "teacher": plan_list[0].teacher_obj.name,
        "student": plan_list[0].student_obj.name,
        "batch_size": plan_list[0].recipe.batch_size,
        "precision": args.precision or ("bf16" if args.device.type == "cuda" else "fp32"),
        "capture": args.capture,
        "separate_capture": args.separate_capture or args.capture,
        "methods": [p.method_obj.name for p in plan_list],
        "separate_seconds_per_epoch": alone,
        "separate_seconds_per_student_epoch": per_student_alone,
        "streams": modes[0],
        "teacher_stream": args.teacher_stream,
        "lockstep_seconds_per_student_epoch": grouped[modes[0]],
        "speedup": per_student_alone / grouped[modes[0]],
        "teacher_forwards_in_group": forwards,
        "curves_identical": {m: alone_curves[m] == group_curves[m] for m in alone_curves},
        "wall_seconds": time.perf_counter() - start,
    }
    if len(modes) == 2:
        figures["serial_lockstep_seconds_per_student_epoch"] = grouped["serial"]
        figures["serial_speedup"] = per_student_alone / grouped["serial"]
        figures["parallel_vs_serial_max_curve_difference"] = max(
            abs(a - b) for m in curves_of["parallel"] for a, b in zip(curves_of["parallel"][m], curves_of["serial"][m]))
    print(f"{figures['teacher']} -> {figures['student']} on {figures['device']} ({figures['threads']} threads), "
          f"batch {figures['batch_size']}, {figures['precision']}, capture {args.capture} "
          f"(separate: {figures['separate_capture']}), "
          f"{len(plan_list)} methods")
    for method, seconds in alone.items():
        print(f"  {method:<8} alone {seconds:8.3f} s/epoch   curve identical in lockstep: "
              f"{figures['curves_identical'][method]}")
    print(f"separately: {per_student_alone:.3f} s per student-epoch; lockstep ({modes[0]} streams): "
          f"{grouped[modes[0]]:.3f} s per student-epoch; {figures['speedup']:.2f}x")
    if len(modes) == 2:
        print(f"lockstep (serial streams): {grouped['serial']:.3f} s per student-epoch; "
              f"{figures['serial_speedup']:.2f}x; largest curve difference parallel vs serial: "
              f"{figures['parallel_vs_serial_max_curve_difference']:.2g}")
    text = json.dumps(figures, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "lockstep_epoch.json"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
