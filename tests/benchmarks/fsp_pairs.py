"""FSP's init stage on every pair of the cifar100-repdistiller suite, at the reference lr: does it
stay finite? (Issue 14: FSP used to go NaN on resnet32x4 → resnet8x4.)

Random weights, synthetic CIFAR-shaped data, each pair's planned hyperparameters (its
``defaults_for`` included), SGD 0.05 momentum 0.9 wd 5e-4, batch 32, 12 steps. The teacher's BN
statistics are first calibrated on the data, as a trained teacher's are: with fully random eval-mode
teachers the deep ResNets' features explode whatever the method. Prints one line per pair.

    python tests/benchmarks/fsp_pairs.py [--steps 12]
"""
from __future__ import annotations

import argparse
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from kdbench.contracts import Probe, Step
from kdbench.core import plugins
from kdbench.core.plan import RunConfig, make_plan
from kdbench.core.taps import Tapped

SUITE = Path(__file__).resolve().parents[2] / "leaderboards" / "cifar100-repdistiller.toml"
WANTED = ["stem", "stage1", "stage2", "stage3"]


def tapped(reg, name):
    model = reg.model(name)
    net = model.make(100, (3, 32, 32))
    taps = model.taps_of(net)
    return Tapped(net, taps, [w for w in WANTED if w in taps], name)


def calibrate(teacher: Tapped) -> None:
    for module in teacher.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    teacher.train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(4):
            teacher(torch.randn(64, 3, 32, 32, generator=gen))
    teacher.eval()


def init_losses(reg, method, teacher_name, student_name, steps):
    plan = make_plan(RunConfig(method="fsp", dataset="cifar100", teacher=teacher_name, student=student_name), reg)
    hp = SimpleNamespace(**plan.hp)
    torch.manual_seed(0)
    student, teacher = tapped(reg, student_name), tapped(reg, teacher_name).requires_grad_(False)
    calibrate(teacher)
    with torch.no_grad():
        s_shp = {k: tuple(v.shape[1:]) for k, v in student(torch.zeros(2, 3, 32, 32)).feats.items()}
        t_shp = {k: tuple(v.shape[1:]) for k, v in teacher(torch.zeros(2, 3, 32, 32)).feats.items()}
    probe = Probe(hp, 100, (3, 32, 32), s_shp, t_shp, list(s_shp), list(t_shp), lambda: None)
    method.check(probe)
    modules = method.build(probe)
    params = list(student.parameters()) + (list(modules.parameters()) if modules is not None else [])
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    (stage,) = method.stages(hp)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 32, 32, generator=gen), torch.randint(0, 100, (96,), generator=gen)
    student.train()
    values = []
    for i in range(steps):
        xb, yb = x[i % 3 * 32:(i % 3 + 1) * 32], y[i % 3 * 32:(i % 3 + 1) * 32]
        with torch.no_grad():
            t_out = teacher(xb)
        step = Step(x=xb, y=yb, student=student(xb), teacher=t_out, hp=hp, modules=modules, epoch=0, epochs=1,
                    stage=stage.name)
        loss = sum(stage.loss(step).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(loss.item())
    return values, hp.init_weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    reg = plugins.load()
    method = reg.method("fsp")
    finite = 0
    pairs = tomllib.loads(SUITE.read_text())["pairs"]
    for pair in pairs:
        start = time.time()
        values, weight = init_losses(reg, method, pair["teacher"], pair["student"], args.steps)
        ok = bool(np.all(np.isfinite(values)))
        finite += ok
        print(f"{pair['teacher']:>12} -> {pair['student']:<13} init_weight {weight:<4} loss {values[0]:.4g} -> "
              f"{values[-1]:.4g}  {'finite' if ok else 'NOT FINITE'}  ({time.time() - start:.0f} s)", flush=True)
    print(f"finite on {finite} of {len(pairs)} pairs")


if __name__ == "__main__":
    main()
