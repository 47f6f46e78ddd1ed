"""The engine on tiny configurations: determinism, frozen teacher, stages, schedules, NaN."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.core import engine, plugins
from kdbench.contracts import HParam, Method, Recipe, Stage
from kdbench.errors import KdbenchError, NonFiniteLoss
from kdbench.core.plan import RunConfig, make_plan
from kdbench.core.plugins import Entry

CPU = torch.device("cpu")


def with_method(method: Method):
    """The registry plus one in-test method (registered as a plugin would be)."""
    reg = plugins.registry()
    reg.methods[method.name] = Entry(method, "test", "tests", "0")
    return reg


def run_once(reg, method, teacher, **config):
    plan = make_plan(RunConfig(method=method, recipe={"epochs": 2}, **config), reg)
    setup = engine.setup_student(plan, teacher if plan.method_obj.needs_teacher else None, CPU)
    return setup, engine.run_student(plan, setup, CPU, lambda e: None)


@pytest.fixture(scope="module")
def teacher():
    """A small, briefly trained teacher (2 epochs) — the engine tests need any fixed teacher."""
    torch.manual_seed(0)
    reg = plugins.load()
    plan = make_plan(RunConfig(method="kd"), reg)
    net = engine.build_teacher(plan, CPU)
    net.eval().requires_grad_(False)
    return net


def test_same_seed_same_numbers_other_seed_other_numbers(env, teacher):
    reg = plugins.registry()
    _, a = run_once(reg, "kd", teacher, seed=3)
    _, b = run_once(reg, "kd", teacher, seed=3)
    _, c = run_once(reg, "kd", teacher, seed=4)
    assert a.curve == b.curve and a.metrics["test_top1"] == b.metrics["test_top1"]
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k])
    assert a.curve != c.curve
    assert len(a.curve) == 2 and 0 <= a.metrics["test_top1"] <= 1
    assert {"test_top1", "test_top5", "test_top1_bestval", "test_top5_bestval", "best_val_epoch",
            "epochs_to_95", "auc", "throughput", "peak_mem_mb", "flops_student", "flops_teacher"} <= set(a.metrics)


def test_teacher_is_frozen_and_untouched(env, teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}  # includes BN running stats
    setup, _ = run_once(plugins.registry(), "at", teacher)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


def test_pre_stage_trains_only_the_method_modules_when_asked(env, teacher):
    seen = {}

    def build(probe):
        seen["shapes"] = (probe.student_shapes, probe.teacher_shapes)
        return nn.Conv1d(probe.student_shapes["stage2"][0], probe.teacher_shapes["stage2"][0], 1)

    def hint(step):
        return {"hint": F.mse_loss(step.modules(step.student.feats["stage2"]), step.teacher.feats["stage2"])}

    def main_loss(step):
        return {"ce": F.cross_entropy(step.student.logits, step.y)}

    method = Method("hinted", main_loss, taps=("stage2",), build=build,
                    hparams=(HParam("pre", 2, low=0, space=(0, 3)),),
                    stages=lambda hp: [Stage("hint", "pre", hint, train_student=False)])
    reg = with_method(method)
    plan = make_plan(RunConfig(method="hinted", recipe={"epochs": 1}), reg)
    setup = engine.setup_student(plan, teacher, CPU)
    assert seen["shapes"] == ({"stage2": (16, 10)}, {"stage2": (32, 10)})
    assert [(s.name, e) for s, e in setup.pre_stages] == [("hint", 2)]
    student0 = {k: v.clone() for k, v in setup.trainee.student.model.state_dict().items()}
    module0 = [p.clone() for p in setup.trainee.modules.parameters()]
    logs = []
    ds = plan.dataset_obj
    splits = engine.load_splits(ds, CPU, {})
    engine.train_stage(setup.trainee, setup.pre_stages[0][0], 2, plan.recipe, splits["train"],
                       torch.Generator().manual_seed(0), ds.augment, CPU, lambda e, m: logs.append(m), False)
    assert len(logs) == 2 and logs[1]["loss_hint"] < logs[0]["loss_hint"]
    after = setup.trainee.student.model.state_dict()
    # BN running statistics move in train mode; the weights must not
    assert all(torch.equal(after[k], v) for k, v in student0.items() if "running" not in k and "num_batches" not in k)
    assert any(not torch.equal(p, q) for p, q in zip(setup.trainee.modules.parameters(), module0))
    assert setup.info["params_extra"] == 16 * 32 + 32


def test_lr_schedules():
    r = Recipe(epochs=10, batch_size=8, lr=1.0, milestones=(5, 8), gamma=0.1)
    assert [engine.lr_at(r, e) for e in (0, 4, 5, 7, 8, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    c = Recipe(epochs=10, batch_size=8, lr=1.0, schedule="cosine")
    assert engine.lr_at(c, 0) == 1.0 and engine.lr_at(c, 5) == pytest.approx(0.5)
    with pytest.raises(KdbenchError, match="unknown lr schedule"):
        engine.lr_at(Recipe(epochs=1, batch_size=1, lr=1, schedule="step"), 0)


def test_the_engine_builds_every_optimizer_and_schedule_a_recipe_may_name():
    """The recipe loader checks names against kdbench.recipes.OPTIMIZERS/SCHEDULES (it cannot import
    the engine); the engine must build each of them, and refuse any other."""
    from kdbench.recipes import OPTIMIZERS, SCHEDULES

    weight = nn.Parameter(torch.ones(2))
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    for name in OPTIMIZERS:
        recipe = Recipe(epochs=4, batch_size=1, lr=0.5, optimizer=name, weight_decay=0.0)
        assert type(engine.make_optimizer([weight], recipe)) is kinds[name]
    for name in SCHEDULES:
        assert engine.lr_at(Recipe(epochs=4, batch_size=1, lr=0.5, schedule=name), 0) == 0.5
    with pytest.raises(KdbenchError, match="unknown optimizer"):
        engine.make_optimizer([weight], Recipe(epochs=1, batch_size=1, lr=1, optimizer="lion"))


def test_non_finite_loss_is_caught_once_per_epoch(env, teacher):
    method = Method("nan", lambda step: {"ce": F.cross_entropy(step.student.logits, step.y) * math.nan})
    with pytest.raises(NonFiniteLoss, match=r"loss became non-finite in stage 'main' epoch 1 \(ce=nan\)"):
        run_once(with_method(method), "nan", teacher)


def test_method_check_refuses_a_pair_before_training(env, teacher):
    def check(probe):
        raise KdbenchError("needs a pooled tap")

    with pytest.raises(KdbenchError, match="needs a pooled tap"):
        run_once(with_method(Method("picky", lambda s: {}, check=check)), "picky", teacher)
    with pytest.raises(KdbenchError, match=r"method 'tapless' cannot use this pair: the model has no tap 'stage7'"):
        run_once(with_method(Method("tapless", lambda s: {}, taps=("stage7",))), "tapless", teacher)


def test_checkpoint_loading_names_the_first_mismatch(env, teacher, tmp_path):
    plan = make_plan(RunConfig(method="kd"), plugins.registry())
    net = engine.build_teacher(plan, CPU)
    good = tmp_path / "good.pt"
    torch.save({"model": teacher.state_dict()}, good)
    engine.load_checkpoint(net, str(good), "teacher")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), teacher.state_dict().values()))
    bare = tmp_path / "bare.pt"
    torch.save(teacher.state_dict(), bare)
    engine.load_checkpoint(net, str(bare), "teacher")
    state = dict(teacher.state_dict())
    state["fc.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pt"
    torch.save({"model": state}, bad)
    with pytest.raises(KdbenchError, match=r"'fc.weight' has shape \(3, 3\), the model needs \(10, 320\)"):
        engine.load_checkpoint(net, str(bad), "teacher")


def test_a_streamed_dataset_trains_through_the_loader_path(env, teacher):
    """A dataset whose train split is a torch Dataset (too large for the device) trains the same way."""
    from dataclasses import replace

    from torch.utils.data import TensorDataset

    from kdbench.core.splits import LoaderSplit

    reg = plugins.registry()
    base = reg.dataset("mnist1d")

    def load(split):
        x, y = base.load(split)
        return TensorDataset(x, y) if split == "train" else (x, y)

    reg.datasets["streamed"] = Entry(replace(base, name="streamed", load=load), "test", "tests", "0")
    plan = make_plan(RunConfig(method="kd", dataset="streamed", recipe={"epochs": 1}), reg)
    setup = engine.setup_student(plan, teacher, CPU)
    assert isinstance(setup.splits["train"], LoaderSplit) and len(setup.splits["train"]) == 3600
    result = engine.run_student(plan, setup, CPU, lambda e: None)
    assert result.metrics["test_top1"] > 0.3
    # identical batches and arithmetic: the same numbers as the device-resident path
    plan1 = make_plan(RunConfig(method="kd", recipe={"epochs": 1}), reg)
    same = engine.run_student(plan1, engine.setup_student(plan1, teacher, CPU), CPU, lambda e: None)
    assert result.curve == same.curve


class _OwnForward(nn.BatchNorm1d):
    def forward(self, x):
        return super().forward(x) * 1.0


def test_batch_counters_advance_at_once_as_each_layer_would_alone():
    """engine.BatchCounters over steps against PyTorch's own adds: the same counts and running statistics
    after every step, and only the layers the first step calls once in training mode are managed — not
    one called twice, one in eval mode, one without a momentum (it reads its count), one with a forward
    of its own."""
    torch.manual_seed(0)

    def net():
        layers = nn.ModuleDict({"once": nn.BatchNorm1d(3), "twice": nn.BatchNorm1d(3),
                                "frozen": nn.BatchNorm1d(3), "average": nn.BatchNorm1d(3, momentum=None),
                                "own": _OwnForward(3)})
        layers["frozen"].eval()
        return layers

    def forward(layers, x):
        h = layers["once"](x)
        h = layers["twice"](layers["twice"](h))
        return layers["own"](layers["average"](layers["frozen"](h)))

    nets = [net(), net()]
    nets[1].load_state_dict(nets[0].state_dict())
    counters = engine.BatchCounters(nets[1])
    assert len(counters.layers) == 3  # "average" and "own" are never candidates
    for step in range(4):
        x = torch.randn(8, 3, 5)
        plain = forward(nets[0], x)
        counters.begin()
        lean = forward(nets[1], x)
        counters.end()
        counters.advance()
        assert torch.equal(plain, lean), step
        for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
            assert torch.equal(a, b), (step, name)
        assert counters.layers == [nets[1]["once"]]
    assert nets[1]["once"].num_batches_tracked.item() == 4 and nets[1]["twice"].num_batches_tracked.item() == 8
