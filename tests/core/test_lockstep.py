"""Lockstep (issue 17 item 3) in the engine: a group of students sharing one teacher forward per
batch trains each of them bitwise as its separate run does (CPU, float32)."""
import pytest
import torch

from kdbench.core import engine, lockstep, plugins
from kdbench.core.plan import RunConfig, make_plan

CPU = torch.device("cpu")
#: kd (logits only), fitnets (a hint pre-stage and a connector), crd (modules, a memory bank and
#: negatives drawn from the global RNG), vid (modules), at (feature taps)
METHODS = ["kd", "fitnets", "crd", "vid", "at"]
TIMING = {"train_seconds", "throughput", "peak_mem_mb"}


@pytest.fixture(scope="module")
def teacher():
    plan = make_plan(RunConfig(method="kd"), plugins.load())
    return engine.build_teacher(plan, CPU).eval().requires_grad_(False)


def _plan(method):
    return make_plan(RunConfig(method=method, recipe={"epochs": 2}, seed=1), plugins.registry())


def _recorder(logs):
    return lambda e: logs.append((e.stage, e.epoch, {k: v for k, v in e.metrics.items() if "seconds" not in k}))


def _untimed(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMING and not k.startswith("seconds_to")}


def test_lockstep_members_train_bitwise_as_their_separate_runs(env, teacher):
    separate = {}
    for method in METHODS:
        logs = []
        plan = _plan(method)
        setup = engine.setup_student(plan, teacher, CPU)
        separate[method] = (engine.run_student(plan, setup, CPU, _recorder(logs)), logs)

    plans = [_plan(method) for method in METHODS]
    setups, members, logs = [], [], {m: [] for m in METHODS}
    for method, plan in zip(METHODS, plans):
        setup = engine.setup_student(plan, teacher, CPU)
        setups.append(setup)
        members.append(lockstep.member(plan, setup, CPU, _recorder(logs[method])))
    taps = plans[0].teacher_obj.taps_of(teacher)
    group = lockstep.share_teacher(setups, teacher, taps, "teacher")
    outcomes = lockstep.fit_group(members, group, CPU)

    for method, outcome in zip(METHODS, outcomes):
        assert outcome.error is None, (method, outcome.error)
        alone, alone_logs = separate[method]
        together = outcome.result
        assert together.curve == alone.curve, method
        assert _untimed(together.metrics) == _untimed(alone.metrics), method
        assert logs[method] == alone_logs, method
        for key, value in alone.state_dict.items():
            assert torch.equal(together.state_dict[key], value), (method, key)
        assert together.tags["lockstep"] == str(len(METHODS))
    # one teacher forward per main-stage batch for the whole group (+ fitnets' hint stage alone)
    batches = len(setups[0].splits["train"]) // plans[0].recipe.batch_size  # full batches only
    hint_epochs = sum(epochs for _, epochs in setups[1].pre_stages)
    assert group.forwards == batches * (plans[0].recipe.epochs + hint_epochs)


def test_a_failing_member_leaves_the_group_and_the_others_finish(env, teacher):
    plans = [_plan("kd"), make_plan(RunConfig(method="kd", recipe={"epochs": 2}, seed=1,
                                              hparams={"T": 4.0}), plugins.registry())]
    setups = [engine.setup_student(plan, teacher, CPU) for plan in plans]
    members = [lockstep.member(plan, setup, CPU, lambda e: None) for plan, setup in zip(plans, setups)]
    with torch.no_grad():  # a student with non-finite weights: its loss is NaN in the first epoch
        next(setups[1].trainee.student.model.parameters()).fill_(float("nan"))
    group = lockstep.share_teacher(setups, teacher, plans[0].teacher_obj.taps_of(teacher), "teacher")
    good, bad = lockstep.fit_group(members, group, CPU)
    assert good.error is None and len(good.result.curve) == 2
    assert bad.result is None and "non-finite" in str(bad.error)


def test_who_runs_alone_and_memory_chunks(env):
    reg = plugins.registry()
    assert lockstep.alone_reason(make_plan(RunConfig(method="vanilla"), reg)) == "trains without a teacher"
    assert lockstep.alone_reason(make_plan(RunConfig(method="datafree"), reg)) == \
        "trains on its own data, not the dataset's batches"
    assert lockstep.alone_reason(make_plan(RunConfig(method="dml"), reg)) == "trains peer networks"
    assert lockstep.alone_reason(make_plan(RunConfig(method="multi_teacher", teachers=("cnn1d_4x16",)), reg)) == \
        "reads extra teachers"
    assert lockstep.alone_reason(make_plan(RunConfig(method="fitnets"), reg)) is None
    assert lockstep.split_by_memory([3, 3, 3], None) == [[0, 1, 2]]
    assert lockstep.split_by_memory([3, 3, 3, 9, 1], 7) == [[0, 1], [2], [3], [4]]
    assert lockstep.free_device_bytes(CPU) is None


def test_member_memory_estimate_counts_weights_and_activations(env, teacher):
    plan = _plan("fitnets")
    setup = engine.setup_student(plan, teacher, CPU)
    params = sum(p.numel() for p in setup.trainee.student.parameters()) + \
        sum(p.numel() for p in setup.trainee.modules.parameters())
    small = lockstep.member_bytes(setup, 8, plan.dataset_obj.input_shape, CPU, "fp32")
    large = lockstep.member_bytes(setup, 64, plan.dataset_obj.input_shape, CPU, "fp32")
    assert small > 16 * params and large > small
    assert (large - 16 * params) == pytest.approx(8 * (small - 16 * params), rel=0.01)
    # a graphed run's evaluation graphs: two pools of about three of the largest activations
    largest = []
    hooks = [m.register_forward_hook(lambda _m, _a, out: largest.append(out[0].numel()))
             for m in setup.trainee.student.model.modules() if not list(m.children())]
    with torch.no_grad():
        setup.trainee.student(torch.zeros((1, *plan.dataset_obj.input_shape)))
    for hook in hooks:
        hook.remove()
    graphed = lockstep.member_bytes(setup, 8, plan.dataset_obj.input_shape, CPU, "fp32", eval_batch_size=100)
    assert graphed - small == pytest.approx(2 * 3 * max(largest) * 100 * 4, rel=0.01)


def test_a_compiled_group_compiles_every_member(env, teacher, monkeypatch):
    """The members' students share one network class, so Dynamo's entries for it grow with the
    group (train and eval mode per member): past its default limit of 8 the later members ran
    uncompiled. The group's members all compile, and none is tagged as having fallen back."""
    from kdbench.core import capture

    monkeypatch.setattr(capture, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    plans = [make_plan(RunConfig(method=m, recipe={"epochs": 1}, seed=1, capture="compile"), plugins.registry())
             for m in METHODS]
    setups = [engine.setup_student(plan, teacher, CPU) for plan in plans]
    members = [lockstep.member(plan, setup, CPU, lambda e: None) for plan, setup in zip(plans, setups)]
    group = lockstep.share_teacher(setups, teacher, plans[0].teacher_obj.taps_of(teacher), "teacher")
    outcomes = lockstep.fit_group(members, group, CPU)
    for method, outcome in zip(METHODS, outcomes):
        assert outcome.error is None, (method, outcome.error)
        assert outcome.result.tags["capture"] == "compile" and "capture_fallback" not in outcome.result.tags, method
    assert capture.recompile_limit_hits() == 0 and capture._live == []
    torch._dynamo.reset()
