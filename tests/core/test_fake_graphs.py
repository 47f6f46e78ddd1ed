"""The ``graphs`` path of the engine on the CPU, with CUDA graphs faked: a capture runs the step
once (as ``torch.cuda.graph`` does, recording it), and a replay runs it again with what the capture
saw — its epoch, its static batch buffers, its output tensors updated in place — as a real graph
replays its kernels with the Python values of its capture frozen in. What this checks is kdbench's
logic around the graph (warm-up, static inputs, the in-graph epoch totals, the partial batch, the
fused optimizer with its lr in a tensor, which steps are captured again at a new epoch), against
eager runs: the numbers must be eager's."""
import contextlib
from typing import Callable

import pytest
import torch

from kdbench.contracts import Method, Stage
from kdbench.core import capture, engine, plugins, precision
from kdbench.core.plugins import Entry
from kdbench.core.plan import RunConfig, make_plan
from stream_races import RaceCheck, fake_streams

CPU = torch.device("cpu")
BRANCH, ON_SIDE_STREAM = capture.Branch, capture.on_side_stream  # the real ones, before any fixture
SETUP_STUDENT = engine.setup_student


def _copy_into(kept, new) -> None:
    """A replay's outputs land in the tensors the capture returned."""
    if isinstance(kept, torch.Tensor):
        kept.copy_(new)
    elif isinstance(kept, dict):
        for key in kept:
            _copy_into(kept[key], new[key])
    elif isinstance(kept, (tuple, list)):
        for a, b in zip(kept, new):
            _copy_into(a, b)


class FakeGraph:
    """A real capture records the step without running it, and the replay that follows runs it;
    a faked capture has run it already, so its first replay does nothing. Later replays run what
    was captured (``rerun``: the Python values of the capture) into the capture's outputs."""

    rerun: Callable = None
    out = None
    ran = True  # the capture ran the step for the batch it was captured on

    def replay(self):
        if self.ran:
            self.ran = False
            return
        _copy_into(self.out, self.rerun())


class RecordingSteps(capture.GraphedSteps):
    """GraphedSteps as it is, its graph told what it holds (what a real graph records)."""

    def _capture(self, epoch, x, y, index):
        super()._capture(epoch, x, y, index)
        self.graph.rerun = lambda: self.step(epoch, *self.static)
        self.graph.out = self.out


class RecordingEval(capture.GraphedEval):
    captured: list = []  # (network, batch shape) of every evaluation graph

    def _capture(self, net, x, y, forward):
        graph, sx, sy, out, net = super()._capture(net, x, y, forward)
        RecordingEval.captured.append((type(net).__name__, tuple(x.shape)))
        graph.rerun, graph.out = (lambda: forward(sx, sy)), out
        return graph, sx, sy, out, net


class FakeBranch:
    """A teacher branch without a stream: the block runs in place; what ran inside it, and the
    joins, go to ``events`` (the order a real stream would give the GPU)."""

    events: list = []

    def __init__(self, device):
        pass

    @contextlib.contextmanager
    def fork(self):
        FakeBranch.events.append("fork")
        try:
            yield
        finally:
            FakeBranch.events.append("forked")

    def join(self):
        FakeBranch.events.append("join")


@pytest.fixture
def fake_graphs(monkeypatch):
    monkeypatch.setattr(capture, "Branch", FakeBranch)
    monkeypatch.setattr(FakeBranch, "events", [])
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(capture, "on_side_stream", lambda device, fn: fn())
    monkeypatch.setattr(capture, "GraphedSteps", RecordingSteps)
    monkeypatch.setattr(capture, "GraphedEval", RecordingEval)
    monkeypatch.setattr(RecordingEval, "captured", [])
    monkeypatch.setattr(capture, "check_capture", lambda name, device=None: name or "none")
    captures = []
    original = RecordingSteps._capture
    monkeypatch.setattr(RecordingSteps, "_capture", lambda self, *a: (captures.append(a[0]), original(self, *a)))
    return captures


@pytest.fixture
def captured_optimizer(monkeypatch):
    """Eager runs get the captured step's optimizer too (fused, its lr in a tensor), so that the
    two paths compare bitwise; that it trains as the float-lr one does is test_capture's."""
    optimizer = engine.stage_optimizer
    monkeypatch.setattr(engine, "stage_optimizer", lambda trainee, stage, recipe, device_lr=None:
                        optimizer(trainee, stage, recipe, CPU))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    plan = make_plan(RunConfig(method="kd"), plugins.load())
    return engine.build_teacher(plan, CPU).eval().requires_grad_(False)


EPOCHS = 2
#: dkd's and reviewkd's warm-up over the whole run (the ramp 1/2, 1): their defaults, scaled to 2
#: epochs, are done in the first, and a graph that froze the ramp would give the same numbers
HPARAMS = {"dkd": {"warmup": 240}, "reviewkd": {"warmup": 240}}


#: an extra teacher (untrained: what matters is that graphs and eager get the same outputs of it)
TEACHERS = {"multi_teacher": ("cnn1d_2x8",)}


def fit(method, teacher, capture_mode, precision=None, seen=None, epochs=EPOCHS):
    """A run's result and logged losses; ``seen`` (a list): the dtype of the weight every teacher
    convolution ran with during training goes there."""
    plan = make_plan(RunConfig(method=method, recipe={"epochs": epochs}, capture=capture_mode, precision=precision,
                               hparams=HPARAMS.get(method, {}), teachers=TEACHERS.get(method, ())), plugins.load())
    extra = [engine.build_model(entry.obj, plan.dataset_obj, CPU, 0).eval().requires_grad_(False)
             for entry in plan.extra_teachers]
    nets = ([teacher] if plan.method_obj.needs_teacher else []) + extra if seen is not None else []
    record = torch._dynamo.disable(lambda m, args: seen.append(m.weight.dtype))  # no recompile per call when compiled
    hooks = [m.register_forward_pre_hook(record)
             for net in nets for m in net.modules() if isinstance(m, torch.nn.Conv1d)]
    try:
        setup = engine.setup_student(plan, teacher if plan.method_obj.needs_teacher else None, CPU, extra)
        assert len(setup.trainee.teachers) == len(TEACHERS.get(method, ()))
        if seen is not None:
            seen.clear()  # the probe's forward, before training, runs the network's own weights
        logs = []
        result = engine.run_student(plan, setup, CPU, logs.append, with_test=False)
    finally:
        for hook in hooks:
            hook.remove()
    losses = {(log.stage, log.epoch, k): v for log in logs for k, v in log.metrics.items() if "loss" in k}
    return result, losses


#: every built-in method that captures (kdsvd declares it cannot). Among them: dkd's and reviewkd's
#: warm-up ramps (device scalars set at each epoch: a graph that froze them would be wrong in the
#: second), crd's sample indices are a static input (its memory bank), fitnets has a pre-stage (a
#: stage of its own, captured once), multi_teacher an extra teacher (run ahead with the teacher)
CAPTURED = [name for name, entry in sorted(plugins.load().methods.items()) if entry.obj.capturable]


@pytest.mark.parametrize("method", CAPTURED)
def test_faked_graphs_give_eager_numbers_and_capture_each_stage_once(teacher, fake_graphs, captured_optimizer,
                                                                     method):
    """Bitwise, with the same optimizer on both paths (captured_optimizer), the teacher run one
    batch ahead on its branch (the default); every stage's graph captured in its first epoch and
    kept (no built-in method reads ``Step.epoch``)."""
    eager, eager_losses = fit(method, teacher, "none")
    graphed, graphed_losses = fit(method, teacher, "graphs")
    teaches = plugins.load().methods[method].obj.needs_teacher
    assert graphed.tags == {"capture": "graphs", **({"teacher_stream": "ahead"} if teaches else {})}
    assert graphed_losses == eager_losses
    assert graphed.curve == eager.curve
    assert fake_graphs, "nothing was captured"
    assert RecordingEval.captured, "the evaluation was not captured"
    assert set(fake_graphs) == {0}, fake_graphs


def _ramp_method():
    def loss(step):  # a pre-stage's ramp and the main stage's, each its stage's epochs
        length = 2.5 if step.stage == "main" else 1.5
        return {"ce": torch.nn.functional.cross_entropy(step.student.logits, step.y), "ramp": step.ramp(length)}
    return Method(name="ramp", loss=loss, needs_teacher=False,
                  stages=lambda hp: [Stage("warm", 2, loss)])


@pytest.mark.parametrize("capture_mode", ["none", "graphs"])
def test_a_ramp_has_its_epochs_value_in_every_epoch_and_its_graph_is_captured_once(fake_graphs, captured_optimizer,
                                                                                  capture_mode):
    """``Step.ramp`` in a run: each epoch's factor, min((epoch + 1) / length, 1), eagerly and from a
    graph captured in the stage's first epoch (which a frozen value would get wrong from the
    second on)."""
    reg = plugins.load()
    reg.methods["ramp"] = Entry(_ramp_method(), "test", "tests", "0")
    plan = make_plan(RunConfig(method="ramp", recipe={"epochs": 4}, capture=capture_mode), reg)
    logs = []
    engine.run_student(plan, engine.setup_student(plan, None, CPU), CPU, logs.append, with_test=False)
    ramps = {(log.stage, log.epoch): log.metrics[("warm/" if log.stage != "main" else "") + "loss_ramp"]
             for log in logs}
    assert ramps == pytest.approx({("warm", 1): 2 / 3, ("warm", 2): 1.0,  # logged epochs count from 1
                                   ("main", 1): 0.4, ("main", 2): 0.8, ("main", 3): 1.0, ("main", 4): 1.0})
    assert fake_graphs == ([0, 0] if capture_mode == "graphs" else [])  # each stage's, once


#: no method drawing device random numbers: inside a group graph the members share that stream
#: (CRD's negatives differ from its separate run's, as on a GPU); dkd's ramp changes between epochs
LOCKSTEP = ["kd", "dkd", "fitnets", "at"]


@pytest.mark.parametrize("parallel, where", [(False, "ahead"), (True, "ahead"), (True, "beside")])
def test_a_lockstep_group_graph_trains_each_member_as_its_separate_eager_run(teacher, fake_graphs, captured_optimizer,
                                                                            monkeypatch, request, parallel, where):
    """One graph for the group's step (one teacher forward, then the members one after the other;
    or each member on a stream of its own and the teacher on its branch — the next batch's beside
    the whole group step, or this batch's beside the members' forwards — every operator checked
    against the streams' order: no race),
    captured once (dkd's warm-up ramp is a device scalar set at each epoch); every member bitwise
    its separate run."""
    from kdbench.core import lockstep

    monkeypatch.setattr(lockstep, "PARALLEL_STREAMS", parallel)
    monkeypatch.setattr(engine, "TEACHER_STREAM", where)
    check = RaceCheck(request.getfixturevalue("streams")) if parallel else contextlib.nullcontext()
    graphs = []

    class Recorded(lockstep._GroupGraph):
        def __init__(self, *args):
            super().__init__(*args)
            graphs.append(self)

    monkeypatch.setattr(lockstep, "_GroupGraph", Recorded)

    def plan(method, capture_mode):
        return make_plan(RunConfig(method=method, recipe={"epochs": EPOCHS}, seed=1, capture=capture_mode,
                                   hparams=HPARAMS.get(method, {})), plugins.load())

    separate = {}
    for method in LOCKSTEP:
        alone = plan(method, "none")
        separate[method] = engine.run_student(alone, engine.setup_student(alone, teacher, CPU), CPU,
                                              lambda log: None, with_test=False)
    plans = [plan(method, "graphs") for method in LOCKSTEP]
    setups, members = [], []
    for p in plans:
        setups.append(engine.setup_student(p, teacher, CPU))
        members.append(lockstep.member(p, setups[-1], CPU, lambda log: None, with_test=False))
    group = lockstep.share_teacher(setups, teacher, plans[0].teacher_obj.taps_of(teacher), "teacher")
    with check:
        outcomes = lockstep.fit_group(members, group, CPU)
    if parallel:
        assert check.races == []
        assert sum(s.ops > 0 for s in check.streams.all) >= 1 + len(LOCKSTEP)  # the default one and each member's
        assert [graph.branch.stream.ops > 0 for graph in graphs] == [True]  # the teacher forward, beside the members
        assert [graph.ahead is not None for graph in graphs] == [where == "ahead"]
    for method, outcome in zip(LOCKSTEP, outcomes):
        assert outcome.error is None, (method, outcome.error)
        assert outcome.result.tags == {"capture": "graphs", "lockstep": str(len(LOCKSTEP)),
                                       "teacher_stream": where if parallel else "serial"}, method
        assert outcome.result.curve == separate[method].curve, method
        for key, value in separate[method].state_dict.items():
            assert torch.equal(outcome.result.state_dict[key], value), (method, key)
    assert set(fake_graphs) == {0}  # the group's graph and fitnets' hint stage (run alone before it), once


@pytest.mark.parametrize("where", ["ahead", "beside"])
def test_the_teacher_runs_on_its_branch_beside_the_student_only_when_the_step_is_a_graph(teacher, fake_graphs,
                                                                                        captured_optimizer,
                                                                                        monkeypatch, where):
    """With graphs, each step's teacher forward is queued on the teacher branch before the student's
    forward on the step's stream, which joins the branch — "beside": before the loss reads the
    teacher's outputs; "ahead": at the step's end, the outputs being the next batch's, and the
    epoch's first batch computed before its step — ``fork, teacher, forked, student, join``, every
    step. Eager steps have no branch."""
    monkeypatch.setattr(engine, "TEACHER_STREAM", where)
    plan = make_plan(RunConfig(method="kd", recipe={"epochs": 1}, capture="graphs"), plugins.load())
    setup = engine.setup_student(plan, teacher, CPU)
    events = FakeBranch.events
    hooks = [setup.trainee.teacher.model.register_forward_hook(lambda *a: events.append("teacher")),
             setup.trainee.student.model.register_forward_hook(lambda *a: events.append("student"))]
    try:
        engine.run_student(plan, setup, CPU, lambda log: None, with_test=False)
    finally:
        for hook in hooks:
            hook.remove()
    train_steps = len(setup.splits["train"]) // plan.recipe.batch_size  # warm-ups, the capture, the replays
    step = ["fork", "teacher", "forked", "student", "join"]
    first = ["teacher"] if where == "ahead" else []
    assert events[:len(first) + len(step) * train_steps] == first + step * train_steps
    assert set(events[len(first) + len(step) * train_steps:]) == {"student"}  # the validation: no teacher, no branch

    events.clear()
    eager = make_plan(RunConfig(method="kd", recipe={"epochs": 1}, capture="none"), plugins.load())
    engine.run_student(eager, engine.setup_student(eager, teacher, CPU), CPU, lambda log: None, with_test=False)
    assert events == []


@pytest.fixture
def streams(fake_graphs, monkeypatch):
    """Faked graphs, with the engine's real stream code on streams that keep CUDA's order
    (stream_races.py): the teacher branch and the warm-up's side stream as they are on a GPU."""
    monkeypatch.setattr(capture, "Branch", BRANCH)
    monkeypatch.setattr(capture, "on_side_stream", ON_SIDE_STREAM)
    return fake_streams(monkeypatch)


@pytest.mark.parametrize("where, joined", [("ahead", True), ("ahead", False), ("beside", True), ("beside", False)])
def test_the_teacher_branch_reads_and_writes_nothing_another_stream_has_not_finished(teacher, streams, monkeypatch,
                                                                                    where, joined):
    """KD with its teacher on the branch, every operator checked against the streams' order: no
    race, and the teacher's operators — all of them on the branch's batches, nothing else — ran on
    the branch. Without the join, the step reads the teacher's outputs before the branch has
    written them — "beside": the loss (KD's first operator on the logits divides by T); "ahead":
    the copy of the next batch's outputs at the step's end — and the check says so."""
    monkeypatch.setattr(engine, "TEACHER_STREAM", where)
    made, teacher_branch = [], engine.teacher_branch

    def recorded(*args):
        made.append(teacher_branch(*args))
        if not joined:
            made[-1].join = lambda: None
        return made[-1]

    monkeypatch.setattr(engine, "teacher_branch", recorded)
    plan = make_plan(RunConfig(method="kd", recipe={"epochs": 1}, capture="graphs"), plugins.load())
    setup = engine.setup_student(plan, teacher, CPU)
    with RaceCheck(streams) as check:
        engine.run_student(plan, setup, CPU, lambda log: None, with_test=False)
    (branch,) = made
    x = next(iter(setup.splits["train"].shuffled(64, torch.Generator(), plan.dataset_obj.augment)))[0]
    here = torch.cuda.current_stream(CPU)
    before = here.ops
    with RaceCheck(streams), torch.no_grad():
        setup.trainee.teacher(x)
    steps = len(setup.splits["train"]) // plan.recipe.batch_size
    assert branch.stream.ops == steps * (here.ops - before)  # every teacher operator, and nothing else
    if joined:
        assert check.races == []
    else:
        # the teacher's outputs read before the branch wrote them; the next input copied over the one it reads
        assert check.races and all(f"what stream {branch.stream.id} " in r for r in check.races), check.races[:3]
        first = "aten.div.Tensor" if where == "beside" else "aten.copy_.default"
        assert f"{first}: reads on stream {here.id} what stream {branch.stream.id} wrote" in check.races


@pytest.mark.parametrize("fails", ["on the branch", "always"])
def test_a_capture_that_fails_with_the_teacher_on_its_branch_is_tried_again_with_it_in_the_step(
        teacher, fake_graphs, captured_optimizer, monkeypatch, caplog, fails):
    """The teacher branch is the default, and untried on some GPU and driver: a capture that fails
    with it is tried once more with the teachers in the step's own stream before the run gives up
    its graphs — one line, a tag, eager's numbers either way. A failure that has nothing to do with
    the branch still ends in eager steps, each fallback said once."""
    capturing = []

    @contextlib.contextmanager
    def graph(graph, **kwargs):
        capturing.append(True)
        try:
            if fails == "always":
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
            yield
        finally:
            capturing.pop()

    def fork(self):
        if capturing:
            raise RuntimeError("CUDA error: operation would make the legacy stream depend on a capturing "
                               "blocking stream")
        return contextlib.nullcontext()

    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(FakeBranch, "fork", fork)
    eager, eager_losses = fit("kd", teacher, "none")
    with caplog.at_level("WARNING", logger="kdbench"):
        graphed, graphed_losses = fit("kd", teacher, "graphs")
    assert graphed_losses == eager_losses
    assert graphed.curve == eager.curve
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kdbench:")]
    branch_reason = graphed.tags["teacher_stream_fallback"]
    # any failure of a capture with the branch: its first try, whatever the cause
    assert ("legacy stream depend" if fails == "on the branch" else "not permitted when stream is capturing") in branch_reason
    assert lines[0].startswith("kdbench: captured steps run the teachers' forward in the step's own stream")
    assert lines[0].endswith(branch_reason)
    assert fake_graphs == [0, 0]  # the capture with the branch, the one without (replayed, or failed too)
    if fails == "on the branch":
        assert graphed.tags == {"capture": "graphs", "teacher_stream": "serial", "teacher_stream_fallback": branch_reason}
        assert len(lines) == 1, lines
    else:
        assert set(graphed.tags) == {"capture", "capture_fallback", "teacher_stream_fallback"}
        assert graphed.tags["capture"] == "eager"
        assert "operation not permitted when stream is capturing" in graphed.tags["capture_fallback"]
        assert len(lines) == 2 and lines[1].startswith("kdbench: training steps run eagerly"), lines


def _bf16_fit(method, teacher, capture_mode, weights, monkeypatch, seen):
    """A bf16 run under faked graphs (or eager), the teacher's weights held as ``weights``."""
    monkeypatch.setattr(engine, "TEACHER_WEIGHTS", weights)
    return fit(method, teacher, capture_mode, precision="bf16", seen=seen)


@pytest.mark.parametrize("method, mode", [("kd", "graphs"), ("at_grad", "graphs"), ("multi_teacher", "graphs"),
                                          ("kd", "compile+graphs")])
def test_a_bf16_captured_step_runs_the_teachers_from_bf16_weights_with_the_same_numbers(
        teacher, fake_graphs, captured_optimizer, monkeypatch, method, mode):
    """A bf16 run whose steps are graphs holds its frozen teachers' convolution and linear weights in
    bf16 (what autocast casts them to): every teacher forward of training runs them — the step's, the
    one ahead, at_grad's input gradients through the teacher, the extra teacher's, the compiled
    teacher's (Dynamo and AOT autograd, no C++ generated) — and the run is bitwise the run that lets
    autocast cast them at every forward. The shared teacher stays float32; eager bf16 steps keep
    autocast's casts."""
    if mode == "compile+graphs":
        monkeypatch.setattr(capture, "COMPILE_OPTIONS", {"backend": "aot_eager"})
        torch._dynamo.reset()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    held_seen, cast_seen, eager_seen = [], [], []
    held, held_losses = _bf16_fit(method, teacher, mode, "bf16", monkeypatch, held_seen)
    cast, cast_losses = _bf16_fit(method, teacher, mode, "fp32", monkeypatch, cast_seen)
    eager, _ = _bf16_fit(method, teacher, "none", "bf16", monkeypatch, eager_seen)
    assert set(held_seen) == {torch.bfloat16} and set(cast_seen) == set(eager_seen) == {torch.float32}
    assert len(held_seen) == len(cast_seen) > 0
    assert held.tags == {**cast.tags, "teacher_weights": "bf16"} and held.tags["capture"] == mode
    assert "teacher_weights" not in eager.tags
    # the student's weights too, but where its graph uses them twice (at_grad) or it is compiled
    assert ("student_weights" in held.tags) is (method != "at_grad" and mode == "graphs")
    assert held_losses == cast_losses and held.curve == cast.curve
    for key, value in cast.state_dict.items():
        assert torch.equal(held.state_dict[key], value), key
    assert all(torch.equal(teacher.state_dict()[k], v) and v.dtype == before[k].dtype for k, v in before.items())


def test_a_bf16_lockstep_group_holds_its_teachers_bf16_weights_once_with_the_same_numbers(
        teacher, fake_graphs, captured_optimizer, monkeypatch):
    """A lockstep group's one teacher, its weights held in bf16 once for all its members (and each
    member's student from its own bf16 copies): every member bitwise as in the group that lets
    autocast cast them; the teacher's hold ends with the group."""
    from kdbench.core import lockstep

    def group(weights):
        monkeypatch.setattr(engine, "TEACHER_WEIGHTS", weights)
        monkeypatch.setattr(engine, "STUDENT_WEIGHTS", weights)  # each member's student, too
        plans = [make_plan(RunConfig(method=method, recipe={"epochs": EPOCHS}, seed=1, capture="graphs",
                                     precision="bf16"), plugins.load()) for method in ("kd", "at")]
        setups = [engine.setup_student(p, teacher, CPU) for p in plans]
        members = [lockstep.member(p, s, CPU, lambda log: None, with_test=False) for p, s in zip(plans, setups)]
        shared = lockstep.share_teacher(setups, teacher, plans[0].teacher_obj.taps_of(teacher), "teacher")
        made = []
        bf16_weights = engine.bf16_weights
        monkeypatch.setattr(engine, "bf16_weights", lambda net: made.append(net) or bf16_weights(net))
        outcomes = lockstep.fit_group(members, shared, CPU)
        held = shared.tapped.weights
        shared.tapped.remove()
        assert shared.tapped.weights is None
        return outcomes, made, held

    held, made, weights = group("bf16")
    cast, none_made, none_held = group("fp32")
    assert made == [teacher] and {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert none_made == [] and none_held is None
    for a, b in zip(held, cast):
        assert a.error is None and b.error is None
        assert a.result.tags == {**b.result.tags, "teacher_weights": "bf16", "student_weights": "bf16"}
        assert a.result.curve == b.result.curve
        assert all(torch.equal(a.result.state_dict[k], v) for k, v in b.result.state_dict.items())


def test_a_replayed_step_writes_the_gradients_instead_of_zeroing_and_adding_into_them(teacher, fake_graphs,
                                                                                     captured_optimizer, monkeypatch):
    """The step sets the gradients to None before its backward, so a replay runs no zeroing kernel
    and no accumulation kernel per parameter: each gradient is written where the capture put it
    (in a real graph, its private pool). Checked on what each faked replay runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    plan = make_plan(RunConfig(method="kd", recipe={"epochs": 1}, capture="graphs"), plugins.load())
    setup = engine.setup_student(plan, teacher, CPU)
    params = list(setup.trainee.student.model.parameters())
    zeroed, added, replays = [], [], []

    class Writes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("zero_", "_foreach_zero_", "fill_", "_foreach_fill_"):
                zeroed.append(name)
            elif name in ("add_", "_foreach_add_"):
                targets = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
                added.extend(t.data_ptr() for t in targets)
            return func(*args, **(kwargs or {}))

    replay = FakeGraph.replay

    def watched(graph):
        if graph.ran:  # the capture's own step, already run
            return replay(graph)
        before = len(added)
        with Writes():
            replay(graph)
        grads = {p.grad.data_ptr() for p in params if p.grad is not None}
        replays.append((len(grads), grads & set(added[before:])))

    monkeypatch.setattr(FakeGraph, "replay", watched)
    engine.run_student(plan, setup, CPU, lambda log: None, with_test=False)
    assert len(replays) > 5 and all(count == len(params) for count, _ in replays), replays
    assert zeroed == [] and all(not into for _, into in replays), (zeroed, replays[:2])


def _student_fit(method, teacher, mode, weights, monkeypatch, seen):
    """A bf16 run under faked graphs, the student's weights held as ``weights`` and its BatchNorm
    counters advanced together ("bf16": the engine's default) or layer by layer ("fp32"); ``seen``
    gets, for every student convolution that ran, whether gradients were on (training) and its
    weight's dtype."""
    monkeypatch.setattr(engine, "STUDENT_WEIGHTS", weights)
    monkeypatch.setattr(engine, "BATCH_COUNTERS", "foreach" if weights == "bf16" else "per_layer")
    record = torch._dynamo.disable(lambda m, args: seen.append((torch.is_grad_enabled(), m.weight.dtype)))

    def setup(plan, *args):
        made = SETUP_STUDENT(plan, *args)
        convs = [m for m in made.trainee.student.model.modules() if isinstance(m, torch.nn.Conv1d)]
        for m in convs:
            m.register_forward_pre_hook(record)
        seen.append(len(convs))
        return made

    monkeypatch.setattr(engine, "setup_student", setup)
    return fit(method, teacher, mode, precision="bf16", epochs=1)  # 26 methods twice: one epoch each


@pytest.mark.parametrize("method", CAPTURED)
def test_a_bf16_captured_step_runs_the_student_from_bf16_copies_with_the_same_numbers(
        teacher, fake_graphs, captured_optimizer, monkeypatch, method):
    """Every method that captures: a bf16 run whose steps are graphs runs the student's forward from
    bf16 copies of its convolution and linear weights (their gradients copied back to float32, the
    copies refreshed after each optimizer step) — after each stage's first step, whose graph says
    which weights a step uses once (fitnets' pre-stage and main stage each hold theirs); at_grad,
    whose loss runs the student again for its input gradients, keeps autocast's casts (and so does
    a compiled student: the teachers' test above, compile+graphs). Bitwise the run whose student
    autocast casts at every forward, and the evaluation runs the float32 weights. With the student's
    BatchNorm counters advanced by one multi-tensor add: the same counts (in the state dicts)."""
    held_seen, cast_seen, mode = [], [], "graphs"
    held, held_losses = _student_fit(method, teacher, mode, "bf16", monkeypatch, held_seen)
    cast, cast_losses = _student_fit(method, teacher, mode, "fp32", monkeypatch, cast_seen)
    convs, held_seen, cast_seen = held_seen[0], held_seen[1:], cast_seen[1:]
    assert held_losses == cast_losses and held.curve == cast.curve
    for key, value in cast.state_dict.items():
        assert torch.equal(held.state_dict[key], value), key
    assert held.tags["capture"] == mode and "student_weights" not in cast.tags
    assert len(held_seen) == len(cast_seen) and {dtype for _, dtype in cast_seen} == {torch.float32}
    assert {dtype for grad, dtype in held_seen if not grad} == {torch.float32}  # evaluation, probes
    training = [dtype for grad, dtype in held_seen if grad]
    if method == "at_grad":
        assert "student_weights" not in held.tags and set(training) == {torch.float32}
        return
    assert held.tags == {**cast.tags, "student_weights": "bf16"}
    # each stage's first step runs the float32 weights (its graph tells the weights used once), every later one
    # the copies — but ft's paraphraser stage, which runs the student without training it: float32 throughout
    first, stages = training.count(torch.float32), {stage for stage, _, _ in held_losses}
    assert training.count(torch.bfloat16) > 10 * convs
    assert first == convs * len(stages) or (method == "ft" and first > convs * len(stages)), (first, convs, stages)


def test_a_replayed_bf16_step_casts_no_student_weight_and_adds_its_batch_counters_at_once(
        teacher, fake_graphs, captured_optimizer, monkeypatch):
    """What each faked replay of a bf16 KD step runs, with the student's weights held in bf16 and its
    BatchNorm counters advanced together, against autocast's casts and PyTorch's add per layer: two
    multi-tensor copies (gradients to float32, copies refreshed) in place of a cast per weight in the
    forward and one per gradient in the backward, and one multi-tensor add in place of one per
    BatchNorm layer; the counters count the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    replay = FakeGraph.replay

    def counted(seen):
        def watched(graph):
            if graph.ran:
                return replay(graph)
            with Ops() as ops:
                replay(graph)
            seen.append(ops.names)
        return watched

    per_replay, counts = {}, {}
    for lean in (True, False):
        monkeypatch.setattr(engine, "STUDENT_WEIGHTS", "bf16" if lean else "fp32")
        monkeypatch.setattr(engine, "BATCH_COUNTERS", "foreach" if lean else "per_layer")
        monkeypatch.setattr(FakeGraph, "replay", counted(per_replay.setdefault(lean, [])))
        plan = make_plan(RunConfig(method="kd", recipe={"epochs": 1}, capture="graphs", precision="bf16"),
                         plugins.load())
        setup = engine.setup_student(plan, teacher, CPU)
        student = setup.trainee.student.model
        engine.run_student(plan, setup, CPU, lambda log: None, with_test=False)
        counts[lean] = [m.num_batches_tracked.item() for m in student.modules()
                        if isinstance(m, torch.nn.BatchNorm1d)]
    weights = len(precision.cast_weights(student))
    assert weights == 4  # the embedded student's two convolutions, its linear layer's weight and bias
    assert len(counts[True]) == 2 and counts[True] == counts[False] and counts[True][0] > 20
    lean, plain = per_replay[True][-1], per_replay[False][-1]
    assert lean.count("_foreach_copy_") == 2 and plain.count("_foreach_copy_") == 0
    assert plain.count("_to_copy") - lean.count("_to_copy") == 2 * weights, (plain.count("_to_copy"), lean.count("_to_copy"))
    assert lean.count("_foreach_add_") - plain.count("_foreach_add_") == 1  # (the epoch totals add one too)
    assert plain.count("add_") - lean.count("add_") == 2  # the two BatchNorm layers' own adds
    allocations = {"empty", "empty_like", "empty_strided"}
    kernels = [[name for name in ops if name not in allocations] for ops in (lean, plain)]
    assert len(kernels[1]) - len(kernels[0]) == 2 * weights - 2 + 2 - 1, (sorted(lean), sorted(plain))