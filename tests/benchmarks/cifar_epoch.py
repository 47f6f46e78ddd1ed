"""Training-step speed of kdbench's engine on CIFAR-100-shaped data (resnet32x4 → resnet8x4 KD by
default), and the checks the GPU run needs. Numbers, never pass/fail: a benchmark, not a test.

Modes (several may be given; figures go to ``--json``):

* ``--steps`` (default when no mode is named): ms per training step of ``kdbench.core.engine.train_stage``
  eager vs captured (``--captures``, default ``none,compile+graphs`` on CUDA and ``none,compile`` on the
  CPU) at each batch size (``--batch-sizes``, default 64,256,1024), samples/s, and the projected
  time of 240 epochs of ``--epoch-samples`` samples (training steps only). Each figure is the best
  epoch after the first (which compiles/captures) of ``--epochs`` epochs. ``--teacher-stream all``
  times each graph mode with the teacher run ahead (the default), beside the student's forward,
  and before it.
* ``--methods``: every built-in method's step time relative to KD's (same pair, batch, precision,
  capture); over 2× is flagged, a method that cannot serve the pair says why.
* ``--losses``: the loss terms and the student's gradient of every built-in method on one batch
  (same weights, same inputs) at bf16 vs fp32 — as the engine computes them now (float32 loss
  boundary) and as it did before (the loss inside autocast): relative gap per term, gradient cosine.
* ``--fits``: every built-in method through one short fit (``--fit-epochs``) on the embedded
  dataset, eager and with ``--fit-capture``: ok/failed, seconds, first-epoch loss terms and the
  eager-vs-captured gap, and the run tags (a capture fallback shows there).
* ``--plain``: the harness vs a plain PyTorch loop fed by a CPU DataLoader (the earlier benchmark).

    python tests/benchmarks/cifar_epoch.py --device cuda --json out.json                  # the timing table
    python tests/benchmarks/cifar_epoch.py --device cuda --methods --batch-sizes 64
    python tests/benchmarks/cifar_epoch.py --device cpu --samples 256 --batch-sizes 32 \
        --teacher resnet8 --student resnet8 --compile-backend aot_eager                       # CPU smoke
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
import traceback

import torch
import torch.nn.functional as F

from kdbench.contracts import Augment, Dataset, Recipe
from kdbench.core import capture, engine, plugins
from kdbench.core.engine import Stage
from kdbench.core.plan import RunConfig, make_plan
from kdbench.core.plugins import Entry
from kdbench.core.precision import resolve_precision

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

    def __init__(self, x, y):
        import numpy as np  # only the plain loop needs numpy

        self.x, self.y = x, y
        self.mean = np.asarray(MEAN, dtype=np.float32)[:, None, None]
        self.std = np.asarray(STD, dtype=np.float32)[:, None, None]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        import numpy as np

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


def bench_registry(x, y, batch_size: int, name: str = "cifar100_bench"):
    """The registry with a CIFAR-100-shaped dataset serving ``x, y`` for every split."""
    reg = plugins.registry()
    ds = Dataset(
        name=name, load=lambda split: (x, y), num_classes=100, input_shape=(3, 32, 32),
        recipe=Recipe(epochs=1, batch_size=batch_size, lr=0.05, schedule="constant", milestones=()),
        mean=MEAN, std=STD, augment=Augment(crop_pad=4, flip=True),
    )
    reg.datasets[ds.name] = Entry(ds, "bench", "bench", "0")
    return reg, ds


_TEACHERS: dict = {}


def _teacher(plan, device):
    key = (plan.teacher_obj.name, str(device))
    if key not in _TEACHERS:
        _TEACHERS[key] = engine.build_teacher(plan, device).eval().requires_grad_(False)
    return _TEACHERS[key]


def kd_step_gflop(plan, device) -> float:
    """GFLOP of one KD step per sample (``torch.utils.flop_counter``): the teacher's forward and
    the student's forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = (2, *plan.dataset_obj.input_shape)
    teacher = plan.teacher_obj.make(plan.dataset_obj.num_classes, plan.dataset_obj.input_shape)
    student = plan.student_obj.make(plan.dataset_obj.num_classes, plan.dataset_obj.input_shape)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            teacher(torch.zeros(shape))
        out = student(torch.zeros(shape))
        (out.logits if hasattr(out, "logits") else out).sum().backward()
    return counter.get_total_flops() / shape[0] / 1e9


def peak_tflops(device) -> float | None:
    """Dense bf16 tensor-core peak of the GPU (H100/H200 SXM: 989 TFLOP/s), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return 989.0 if ("H100" in name or "H200" in name) else None


def step_time(args, device, x, y, batch_size: int, method: str = "kd", capture_mode: str = "none") -> dict:
    """ms per training step (best epoch after the first) of ``method`` through train_stage."""
    reg, ds = bench_registry(x, y, batch_size)
    plan = make_plan(RunConfig(method=method, dataset=ds.name, teacher=args.teacher, student=args.student,
                               device=str(device), precision=args.precision, capture=capture_mode,
                               recipe={"batch_size": batch_size, "epochs": args.epochs}), reg)
    teacher = _teacher(plan, device) if plan.method_obj.needs_teacher else None
    setup = engine.setup_student(plan, teacher, device)
    split = setup.splits["train"]
    steps = len(split) // batch_size
    if steps < 1:
        raise SystemExit(f"--samples {len(split)} gives no full batch of {batch_size}")
    seconds = []
    stage = Stage("main", args.epochs, plan.method_obj.loss)
    gen = torch.Generator(device=device).manual_seed(0)
    sync(device)
    engine.train_stage(setup.trainee, stage, args.epochs, plan.recipe, split, gen, ds.augment, device,
                       lambda e, m: seconds.append(m["epoch_seconds"]), scheduled=False)
    state = setup.trainee.capture_state
    fusion = _fusion_report(setup)
    if fusion:
        print(f"    teacher fusion: {fusion}", flush=True)
    profile = _profile(args, setup, stage, plan, split, gen, ds, device, steps) if args.profile else None
    capture.uncompile([m for m in (setup.trainee.student.model, teacher) if m is not None])
    if capture_mode in capture.COMPILED:  # the next size compiles afresh (static shapes), not as a dynamic-shape recompile
        torch._dynamo.reset()
    best = min(seconds[1:]) if len(seconds) > 1 else seconds[0]
    ms = 1000 * best / steps
    rate = batch_size * steps / best
    gflop = kd_step_gflop(plan, device) if method == "kd" else None
    flops = {"gflop_per_sample": gflop, "tflops": rate * gflop / 1000} if gflop else {}
    if flops and peak_tflops(device):
        flops["share_of_bf16_peak"] = flops["tflops"] / peak_tflops(device)
    return {"ms_per_step": ms, "samples_per_s": rate, "steps_per_epoch": steps, **flops,
            "epoch_seconds": seconds, "minutes_240_epochs": 240 * args.epoch_samples / rate / 60,
            "tags": state.tags() if state else {}, **({"profile": profile} if profile else {}),
            **({"teacher_fusion": fusion} if fusion else {})}


def _fusion_report(setup) -> dict:
    """The teacher's fusion in this run (``engine.TEACHER_FUSION``, ``--teacher-fusion``): the tag,
    and the layers cuDNN had no fused kernel for (known after the first, eager, calls)."""
    from kdbench.fusion import failed_layers

    tag = setup.trainee.teacher_fusion
    if tag is None:
        return {}
    inference = setup.trainee.teacher.inference if setup.trainee.teacher is not None else None
    return {"tag": tag, **({"refused": failed_layers(inference.model)} if inference is not None else {})}


def _profile(args, setup, stage, plan, split, gen, ds, device, steps) -> list[dict]:
    """One more epoch under ``torch.profiler``: the kernels that took the most device time per step
    (where a step's time goes: convolutions, BatchNorm, elementwise, optimizer...)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        engine.train_stage(setup.trainee, stage, 1, plan.recipe, split, gen, ds.augment, device,
                           lambda e, m: None, scheduled=False)
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in rows) or 1.0
    top = [{"name": e.key[:90], "ms_per_step": getattr(e, attr) / 1000 / steps,
            "share": getattr(e, attr) / total, "calls_per_step": e.count / steps} for e in rows[:args.profile]]
    for row in top:
        print(f"    {100 * row['share']:5.1f} %  {row['ms_per_step']:7.3f} ms/step  {row['calls_per_step']:6.1f}x  {row['name']}")
    return top


def _variants(args) -> list[tuple[str, str, str]]:
    """(label, capture mode, where the teacher runs: ``engine.TEACHER_STREAM``) of each step-time
    row. ``--teacher-stream`` names where the teacher runs in the modes replayed as a graph (the
    others run it before the student whatever it says): one place, or ``all`` for the three, each
    graph mode then in three rows, ``MODE`` (ahead, the engine's default), ``MODE/beside`` and
    ``MODE/serial``."""
    wheres = engine.TEACHER_STREAMS if args.teacher_stream == "all" else (args.teacher_stream,)
    rows = []
    for mode in args.captures:
        if mode not in capture.GRAPHED:
            rows.append((mode, mode, "serial"))
            continue
        rows += [(mode if where == "ahead" else f"{mode}/{where}", mode, where) for where in wheres]
    return rows


def steps_mode(args, device, x, y) -> dict:
    out = {}
    for bs in args.batch_sizes:
        row = {}
        for mode, capture_mode, where in _variants(args):
            engine.TEACHER_STREAM = where
            try:
                row[mode] = r = step_time(args, device, x, y, bs, "kd", capture_mode)
            finally:
                engine.TEACHER_STREAM = "ahead"
            print(f"batch {bs:>5} {mode:>8}: {r['ms_per_step']:8.2f} ms/step {r['samples_per_s']:>10.0f} samples/s "
                  f"240 epochs {r['minutes_240_epochs']:7.1f} min"
                  + (f" {r['tflops']:6.1f} TFLOP/s" if "tflops" in r else "")
                  + (f" ({100 * r['share_of_bf16_peak']:.0f} % of bf16 peak)" if "share_of_bf16_peak" in r else "")
                  + f" {r['tags'] or ''}", flush=True)
        labels = [label for label, _, _ in _variants(args)]
        base = row[labels[0]]["ms_per_step"]
        for mode in labels[1:]:
            row[f"speedup_{mode}"] = base / row[mode]["ms_per_step"]
        out[f"batch_{bs}"] = row
    return out


def eval_mode(args, device, x, y) -> dict:
    """Evaluation of the teacher and the student over ``x``: eager vs replayed as CUDA graphs
    (what a run with captured steps does), ms per pass and whether the accuracies agree."""
    reg, ds = bench_registry(x, y, 64)
    plan = make_plan(RunConfig(method="kd", dataset=ds.name, teacher=args.teacher, student=args.student,
                               device=str(device), precision=args.precision), reg)
    split = engine.load_split(ds, "val", device, {})  # bench_registry serves x, y for every split
    out = {}
    for role, model in (("teacher", plan.teacher_obj), ("student", plan.student_obj)):
        net = engine.build_model(model, ds, device, 0)
        row = {}
        for mode in ("eager", "graphs"):
            graphs = capture.GraphedEval(device) if mode == "graphs" else None
            engine.evaluate(net, split, args.eval_batch_size, device, args.precision, graphs)  # warm-up / capture
            sync(device)
            start = time.perf_counter()
            acc = engine.evaluate(net, split, args.eval_batch_size, device, args.precision, graphs)
            sync(device)
            row[mode] = {"ms_per_pass": 1000 * (time.perf_counter() - start), **acc,
                         **({"fallback": graphs.reason} if graphs is not None and graphs.reason else {})}
        row["same_accuracy"] = row["eager"]["top1"] == row["graphs"]["top1"] and row["eager"]["top5"] == row["graphs"]["top5"]
        print(f"  {role:<8} {model.name:<11} eager {row['eager']['ms_per_pass']:8.2f} ms  graphs "
              f"{row['graphs']['ms_per_pass']:8.2f} ms  per pass of {len(split)} samples; same accuracy: "
              f"{row['same_accuracy']} {row['graphs'].get('fallback', '')}", flush=True)
        out[role] = row
    return out


def methods_mode(args, device, x, y) -> dict:
    bs, mode = args.batch_sizes[0], args.captures[-1]
    out = {"batch_size": bs, "capture": mode, "methods": {}}
    kd = step_time(args, device, x, y, bs, "kd", mode)["ms_per_step"]
    for name in _methods(args):
        try:
            r = step_time(args, device, x, y, bs, name, mode)
            r["relative_to_kd"] = r["ms_per_step"] / kd
            flag = "  > 2x KD" if r["relative_to_kd"] > 2 else ""
            print(f"{name:>14}: {r['ms_per_step']:8.2f} ms/step = {r['relative_to_kd']:5.2f}x KD{flag} {r['tags'] or ''}", flush=True)
        except Exception as exc:  # a method that cannot serve this pair, or a failure: named
            r = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
            print(f"{name:>14}: {r['error']}", flush=True)
        out["methods"][name] = r
    return out


def _cosine(a, b) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def losses_mode(args, device, x, y) -> dict:
    """bf16 vs fp32 loss terms and gradient on one batch, now and with the loss under autocast."""
    import contextlib

    bs = min(args.batch_sizes[0], 64)
    reg, ds = bench_registry(x, y, bs)
    out = {"batch_size": bs, "methods": {}}
    old_region = engine.loss_region
    old_cast = engine.float32_outputs

    def terms_and_grad(setup, stage, prec, before: bool):
        trainee = setup.trainee
        xb, yb = next(iter(setup.splits["train"].batches(bs)))  # normalised, not augmented
        params = [p for p in trainee.student.parameters() if p.requires_grad]
        if before:
            engine.loss_region = lambda d, p: precision_autocast_old(d, p)
            engine.float32_outputs = lambda o: o
        try:
            trainee.student.eval()  # no BN statistics update: both precisions see the same weights
            _, terms, loss = engine._batch_loss(trainee, stage, 0, 1, xb, yb, None, device, prec)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            engine.loss_region, engine.float32_outputs = old_region, old_cast
        grad = torch.cat([g.flatten() for g in grads if g is not None])
        return {k: float(v.detach()) for k, v in terms.items()}, grad

    def precision_autocast_old(d, p):
        return torch.autocast(d.type, dtype=torch.bfloat16) if p == "bf16" else contextlib.nullcontext()

    for name in _methods(args):
        try:
            plan = make_plan(RunConfig(method=name, dataset=ds.name, teacher=args.teacher, student=args.student,
                                       device=str(device), recipe={"batch_size": bs}), reg)
            setup = engine.setup_student(plan, _teacher(plan, device) if plan.method_obj.needs_teacher else None, device)
            stage = Stage("main", 1, plan.method_obj.loss)
            ref, g_ref = terms_and_grad(setup, stage, "fp32", False)
            row = {"fp32": ref}
            for label, before in (("now", False), ("loss_under_autocast", True)):
                got, g = terms_and_grad(setup, stage, "bf16", before)
                gaps = {k: abs(got[k] - ref[k]) / max(abs(ref[k]), 1e-4) for k in ref}  # terms ~0: absolute
                row[label] = {"terms": got, "worst_rel_gap": max(gaps.values()),
                              "worst_term": max(gaps, key=gaps.get), "grad_cosine": _cosine(g, g_ref)}
            print(f"{name:>14}: bf16 now worst gap {row['now']['worst_rel_gap']:.4f} ({row['now']['worst_term']}), "
                  f"grad cos {row['now']['grad_cosine']:.4f} | loss under autocast: "
                  f"{row['loss_under_autocast']['worst_rel_gap']:.4f}, cos {row['loss_under_autocast']['grad_cosine']:.4f}",
                  flush=True)
        except Exception as exc:
            row = {"error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"}
            print(f"{name:>14}: {row['error']}", flush=True)
        out["methods"][name] = row
    return out


def _methods(args) -> list[str]:
    """The built-in methods of ``--methods``/``--fits`` (``--only`` picks some)."""
    names = sorted(plugins.registry().methods)
    return [n for n in names if n in args.only] if args.only else names


def fits_mode(args, device) -> dict:
    """Every built-in method, one short fit on the embedded dataset, eager and captured."""
    out = {"capture": args.fit_capture, "epochs": args.fit_epochs, "methods": {}}
    reg = plugins.registry()
    for name in _methods(args):
        row = {}
        for mode in dict.fromkeys(["none", args.fit_capture]):
            start = time.perf_counter()
            try:
                plan = make_plan(RunConfig(method=name, device=str(device), precision=args.precision, capture=mode,
                                           recipe={"epochs": args.fit_epochs}), reg)
                teacher = None
                if plan.method_obj.needs_teacher:
                    teacher = _teacher(plan, device)
                setup = engine.setup_student(plan, teacher, device)
                logs = []
                result = engine.run_student(plan, setup, device, logs.append)
                capture.uncompile([m for m in (setup.trainee.student.model, teacher) if m is not None])
                first = {k: v for log in logs if log.epoch == 1 for k, v in log.metrics.items() if "loss" in k}
                row[mode] = {"ok": True, "seconds": time.perf_counter() - start, "tags": result.tags,
                             "test_top1": result.metrics["test_top1"], "first_epoch_losses": first,
                             "finite": all(math.isfinite(v) for v in first.values())}
            except Exception as exc:
                row[mode] = {"ok": False, "seconds": time.perf_counter() - start,
                             "error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}",
                             "traceback": traceback.format_exc()[-2000:]}
        if len(row) == 2 and all(r["ok"] for r in row.values()):
            a, b = row["none"]["first_epoch_losses"], row[args.fit_capture]["first_epoch_losses"]
            row["capture_worst_rel_gap"] = max((abs(b[k] - a[k]) / max(abs(a[k]), 1e-8) for k in a), default=0.0)
        summary = " | ".join(f"{m}: {'ok' if r['ok'] else r['error']} {r['seconds']:.1f}s {r.get('tags') or ''}"
                             for m, r in row.items() if isinstance(r, dict))
        gap = f" gap {row['capture_worst_rel_gap']:.4f}" if "capture_worst_rel_gap" in row else ""
        print(f"{name:>14}: {summary}{gap}", flush=True)
        out["methods"][name] = row
    out["failed"] = sorted(n for n, row in out["methods"].items()
                           if any(isinstance(r, dict) and not r["ok"] for r in row.values()))
    return out


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
    ap.add_argument("--steps", action="store_true", help="ms per step eager vs captured (the default mode)")
    ap.add_argument("--methods", action="store_true", help="every built-in method's step time relative to KD")
    ap.add_argument("--losses", action="store_true", help="bf16 vs fp32 loss terms and gradients, every method")
    ap.add_argument("--fits", action="store_true", help="every built-in method through one short fit")
    ap.add_argument("--plain", action="store_true", help="harness vs a plain loop with a CPU DataLoader")
    ap.add_argument("--eval", action="store_true", help="evaluation eager vs replayed as CUDA graphs (CUDA only)")
    ap.add_argument("--eval-batch-size", type=int, default=1024, help="--eval: the evaluation batch")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="--steps: also profile one epoch and print the N kernels with the most device time")
    ap.add_argument("--only", default=None, help="--methods/--fits: only these methods (comma-separated)")
    ap.add_argument("--batch-sizes", default="64,256,1024")
    ap.add_argument("--captures", default=None,
                    help="capture modes compared, the first is the baseline [none,compile+graphs on CUDA; none,compile on CPU]")
    ap.add_argument("--teacher-stream", default="ahead", choices=[*engine.TEACHER_STREAMS, "all"],
                    help="--steps with graphs: the teacher's forward for the next batch beside the whole step "
                         "(ahead, the engine's default), for this batch beside the student's forward (beside), "
                         "before it (serial), or all three")
    ap.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="[bf16 on CUDA, fp32 on CPU]")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend for --capture compile (e.g. aot_eager)")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode for --capture compile (e.g. max-autotune-no-cudagraphs) [default]")
    ap.add_argument("--teacher-compile-mode", default=None,
                    help="torch.compile mode of the teacher alone, e.g. max-autotune-no-cudagraphs (inference "
                         "only: fewer kernels to tune than the whole step) [--compile-mode]")
    ap.add_argument("--teacher-weights", default=engine.TEACHER_WEIGHTS, choices=engine.TEACHER_WEIGHT_CHOICES,
                    help="a bf16 run's graph modes: the teacher's convolution and linear weights held in bf16 "
                         "(the engine's default: no cast kernels per step) or cast by autocast at every forward (fp32)")
    ap.add_argument("--student-weights", default=engine.STUDENT_WEIGHTS, choices=engine.STUDENT_WEIGHT_CHOICES,
                    help="a bf16 run's uncompiled graphs: the student's convolution and linear weights run from bf16 "
                         "copies (the engine's default: two multi-tensor copies per step) or cast by autocast at "
                         "every forward and backward (fp32: two cast kernels per weight and step)")
    ap.add_argument("--batch-counters", default=engine.BATCH_COUNTERS, choices=engine.BATCH_COUNTER_CHOICES,
                    help="uncompiled graphs: the student's BatchNorm counters advanced by one multi-tensor add per "
                         "step (the engine's default) or by each layer (per_layer: a kernel per BatchNorm and step)")
    ap.add_argument("--zeroed-grads", action="store_true",
                    help="for comparison: gradients zeroed and added into at every step, as captured steps did "
                         "until 2026-11-28 (a zeroing kernel and one addition per parameter; the engine sets them to None)")
    ap.add_argument("--teacher-fusion", default=engine.TEACHER_FUSION, choices=engine.TEACHER_FUSION_CHOICES,
                    help="the teacher's convolutions fused with their BatchNorm, ReLU and residual add, one cuDNN call "
                         "each (Model.fuse): at bf16 on CUDA (cuda, the engine's default), off, or always")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per step-time measurement (the first is not counted)")
    ap.add_argument("--samples", type=int, default=8192, help="samples per epoch of the step-time measurements")
    ap.add_argument("--epoch-samples", type=int, default=45000,
                    help="samples per epoch for the 240-epoch estimate [kdbench's CIFAR-100 train split: "
                         "50000 less the 10 %% validation]")
    ap.add_argument("--fit-epochs", type=int, default=1)
    ap.add_argument("--fit-capture", default=None, help="capture mode of --fits besides eager [compile+graphs on CUDA, none on CPU]")
    ap.add_argument("--teacher", default="resnet32x4")
    ap.add_argument("--student", default="resnet8x4")
    ap.add_argument("--data-dir", default=None, help="a folder holding cifar-100-python/ (else synthetic)")
    ap.add_argument("--workers", type=int, default=None, help="--plain: the DataLoader's workers [min(8, cores)]")
    ap.add_argument("--repeats", type=int, default=1, help="--plain: timed epochs per path (median reported)")
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--warmup-full", action="store_true", help="--plain: also run one untimed harness epoch first")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.only = set(args.only.split(",")) if args.only else None
    args.captures = (args.captures or ("none," + capture.default_capture(device) if cuda else "none,compile")).split(",")
    args.fit_capture = args.fit_capture or capture.default_capture(device)
    if args.compile_backend:
        capture.COMPILE_OPTIONS["backend"] = args.compile_backend
    if args.compile_mode:
        capture.COMPILE_OPTIONS["mode"] = args.compile_mode
    precision = args.precision or ("bf16" if cuda else "fp32")
    engine.TEACHER_FUSION = args.teacher_fusion
    engine.TEACHER_WEIGHTS = args.teacher_weights
    engine.STUDENT_WEIGHTS = args.student_weights
    engine.BATCH_COUNTERS = args.batch_counters
    if args.zeroed_grads:  # every optimizer of this process, the engine's step included
        zero_grad = torch.optim.Optimizer.zero_grad
        torch.optim.Optimizer.zero_grad = lambda self, set_to_none=True: zero_grad(self, set_to_none=False)
    if args.teacher_compile_mode:
        capture.FROZEN_COMPILE_OPTIONS = {**capture.COMPILE_OPTIONS, "mode": args.teacher_compile_mode}
        print(f"    teacher compiled with mode {args.teacher_compile_mode} (the student: "
              f"{capture.COMPILE_OPTIONS.get('mode', 'default')})", flush=True)
    if cuda:
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)"
    report = {"device": name, "torch": torch.__version__, "teacher": args.teacher, "student": args.student,
              "precision": precision,
              "compile_options": dict(capture.COMPILE_OPTIONS), "teacher_fusion": args.teacher_fusion,
              "teacher_weights": args.teacher_weights, "student_weights": args.student_weights,
              "batch_counters": args.batch_counters,
              "zeroed_grads": args.zeroed_grads,
              "teacher_compile_options": capture.FROZEN_COMPILE_OPTIONS, "teacher_stream": args.teacher_stream}
    if not (args.methods or args.losses or args.fits or args.plain or args.eval):
        args.steps = True
    if args.fits:
        print(f"== every built-in method, {args.fit_epochs}-epoch fit on the embedded dataset, {name}", flush=True)
        report["fits"] = fits_mode(args, device)
    if args.steps or args.methods or args.losses or args.plain or args.eval:
        x, y, what = cifar_like(args.samples, args.data_dir)
        report.update(samples=len(y), data=what)
    if args.steps:
        print(f"== {args.teacher} -> {args.student} KD, ms per step ({what}, {len(y)} samples/epoch) on {name}", flush=True)
        report["steps"] = steps_mode(args, device, x, y)
    if args.eval:
        print(f"== evaluation, eager vs CUDA graphs, batch {args.eval_batch_size}", flush=True)
        report["eval"] = eval_mode(args, device, x, y)
    if args.methods:
        print(f"== every built-in method relative to KD, batch {args.batch_sizes[0]}, capture {args.captures[-1]}", flush=True)
        report["methods"] = methods_mode(args, device, x, y)
    if args.losses:
        print("== bf16 vs fp32 loss terms on one batch (same weights and inputs)", flush=True)
        report["losses"] = losses_mode(args, device, x, y)
    if args.plain:
        for bs in args.batch_sizes:
            r = measure(args, device, x, y, bs)
            report[f"plain_batch_{bs}"] = r
            h, p = r["harness"], r["plain"]
            print(f"batch {bs:>5}: harness {h['samples_per_s']:>9.0f} samples/s | plain loop + DataLoader("
                  f"{r['workers']} workers) {p['samples_per_s']:>9.0f} samples/s | ratio {r['ratio_harness_over_plain']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
    main()
