"""Training-step throughput of the harness vs a minimal hand-written PyTorch loop.

Both do the same KD step (teacher forward under no_grad, student forward, (1-α)·CE + α·T²·KL,
backward, SGD step) on the same models, the same batches and the same device; the harness goes
through kdbench.core.engine.train_stage (taps, named loss terms, on-device accumulation, one host read
per epoch). Prints samples/s of each and the ratio harness / hand (target >= 0.97).

    python tests/benchmarks/step_throughput.py [--method kd] [--device cpu] [--epochs 3] [--repeats 5]
"""
import argparse
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from kdbench.core import engine, plugins
from kdbench.contracts import Augment
from kdbench.core.plan import RunConfig, make_plan


def hand_loop(student, teacher, batches, lr, T, alpha):
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    student.train()
    for x, y in batches:
        with torch.no_grad():
            z_t = teacher(x)
        z_s = student(x)
        kl = F.kl_div(F.log_softmax(z_s / T, 1), F.log_softmax(z_t / T, 1), reduction="batchmean", log_target=True)
        loss = (1 - alpha) * F.cross_entropy(z_s, y) + alpha * T * T * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=3, help="passes over the training split per measurement")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    reg = plugins.registry()
    recipe = {"optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-4, "schedule": "constant"}
    if args.batch_size:
        recipe["batch_size"] = args.batch_size
    plan = make_plan(RunConfig(method="kd", recipe=recipe), reg)
    teacher = engine.build_teacher(plan, device).eval().requires_grad_(False)
    setup = engine.setup_student(plan, teacher, device)
    train = setup.splits["train"]
    bs = plan.recipe.batch_size
    # the same fixed batches for both: a shuffled epoch, materialised once, no augmentation
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [(x, y) for x, y, _ in train.shuffled(bs, gen, Augment())]
    samples = len(batches) * bs * args.epochs

    hand_student = setup.trainee.student.model  # the very same module: no difference in weights
    hp = SimpleNamespace(**plan.hp)

    class Fixed:  # the harness's split interface over the same batches
        def shuffled(self, batch_size, generator, augment):
            for x, y in batches:
                yield x, y, None

        def __len__(self):
            return len(batches) * bs

    main_stage = engine.Stage("main", args.epochs, plan.method_obj.loss)

    def harness():
        engine.train_stage(setup.trainee, main_stage, args.epochs, plan.recipe, Fixed(), gen,
                           Augment(), device, lambda e, m: None, scheduled=False)

    def hand():
        for _ in range(args.epochs):
            hand_loop(hand_student, teacher, batches, 0.01, hp.T, hp.alpha)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return samples / (time.perf_counter() - t)

    timed(harness), timed(hand)  # warm-up
    h, k = [], []
    for i in range(args.repeats):  # interleaved, order alternating, so load drift hits both alike
        first, second = (harness, hand) if i % 2 == 0 else (hand, harness)
        a, b = timed(first), timed(second)
        h.append(a if first is harness else b)
        k.append(b if first is harness else a)
    hm, km = statistics.median(h), statistics.median(k)
    paired = statistics.median(a / b for a, b in zip(h, k))
    print(f"device {device}, student {plan.student_obj.name}, teacher {plan.teacher_obj.name}, batch {bs}, "
          f"{len(batches)} steps x {args.epochs} epochs x {args.repeats} repeats")
    print(f"harness   {hm:10.0f} samples/s (median)")
    print(f"hand loop {km:10.0f} samples/s (median)")
    print(f"ratio harness/hand = {paired:.3f} (median of {args.repeats} interleaved pairs)")


if __name__ == "__main__":
    main()
