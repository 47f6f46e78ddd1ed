"""Captured steps on the CPU: torch.compile gives eager's numbers, a method that cannot be
captured (or a capture that fails) runs eagerly and says so, the lr lives in a tensor."""
import contextlib
import copy
import dataclasses
import subprocess
import sys
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kdbench.cli import options
from kdbench.contracts import Method
from kdbench.core import capture, engine, plugins, precision
from kdbench.core.plan import RunConfig, make_plan
from kdbench.core.plugins import Entry
from kdbench.errors import KdbenchError

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    plan = make_plan(RunConfig(method="kd"), plugins.load())
    return engine.build_teacher(plan, CPU).eval().requires_grad_(False)


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile through Dynamo and AOT autograd, without generating C++ (fast on CI)."""
    monkeypatch.setattr(capture, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def fit(reg, method, teacher, **config):
    plan = make_plan(RunConfig(method=method, recipe={"epochs": 2}, **config), reg)
    setup = engine.setup_student(plan, teacher if plan.method_obj.needs_teacher else None, CPU)
    logs = []
    result = engine.run_student(plan, setup, CPU, logs.append, with_test=False)
    for net in (setup.trainee.student.model, setup.trainee.teacher.model if setup.trainee.teacher else None):
        if net is not None:
            capture.uncompile([net])
    return result, {k: v for log in logs for k, v in log.metrics.items() if k.startswith("loss")}


@pytest.mark.parametrize("method", ["kd", "at", "rkd"])
def test_compiled_networks_give_eager_numbers(teacher, aot_eager, method):
    reg = plugins.load()
    eager, eager_terms = fit(reg, method, teacher)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    compiled, compiled_terms = fit(reg, method, teacher, capture="compile")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # student and teacher at least
    assert compiled.tags == {"capture": "compile"} and eager.tags == {}
    assert set(eager_terms) == set(compiled_terms)
    for k, v in eager_terms.items():
        assert compiled_terms[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert compiled.curve == pytest.approx(eager.curve, abs=0.01)
    for k, v in eager.state_dict.items():
        if v.is_floating_point():
            assert torch.allclose(compiled.state_dict[k], v, rtol=1e-3, atol=1e-4), k


def _uncapturable(seen: list) -> Method:
    kd = plugins.load().methods["kd"].obj

    def loss(step):
        seen.append(step.student_net.model._compiled_call_impl)
        return kd.loss(step)
    return Method(name="hostside", loss=loss, hparams=kd.hparams, capturable=False)


def test_a_method_that_cannot_be_captured_runs_eagerly_and_is_tagged(teacher, aot_eager, caplog):
    seen = []
    reg = plugins.registry()
    reg.methods["hostside"] = Entry(_uncapturable(seen), "test", "tests", "0")
    eager, _ = fit(reg, "hostside", teacher)
    asked, _ = fit(reg, "hostside", teacher, capture="compile")
    assert asked.tags == {"capture": "eager",
                          "capture_fallback": "method 'hostside' declares that its step cannot be captured"}
    assert all(impl is None for impl in seen)  # the networks were never compiled
    assert any("training steps run eagerly (--capture compile not used): method 'hostside'" in r.getMessage()
               for r in caplog.records)
    for k, v in eager.state_dict.items():
        assert torch.equal(asked.state_dict[k], v), k  # bitwise: the same eager step


def test_combined_method_with_an_uncapturable_part_is_uncapturable():
    reg = plugins.registry()
    seen = []
    reg.methods["hostside"] = Entry(_uncapturable(seen), "test", "tests", "0")
    assert make_plan(RunConfig(method="hostside+at"), reg).method_obj.capturable is False
    assert make_plan(RunConfig(method="kd+at"), reg).method_obj.capturable is True


def test_a_capture_that_fails_at_run_time_falls_back_to_eager(teacher, monkeypatch, caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("data-dependent shape\nsecond line")

    monkeypatch.setattr(capture, "COMPILE_OPTIONS", {"backend": broken_backend})
    torch._dynamo.reset()
    reg = plugins.load()
    eager, eager_terms = fit(reg, "kd", teacher)
    fell, fell_terms = fit(reg, "kd", teacher, capture="compile")
    torch._dynamo.reset()
    assert fell.tags["capture"] == "eager" and "data-dependent shape" in fell.tags["capture_fallback"]
    assert "second line" not in fell.tags["capture_fallback"]
    warned = [r.getMessage() for r in caplog.records if "eagerly" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0]
    assert fell_terms == eager_terms
    for k, v in eager.state_dict.items():
        assert torch.equal(fell.state_dict[k], v), k


def test_graphs_need_cuda_and_unknown_modes_are_one_line():
    reg = plugins.load()
    plan = make_plan(RunConfig(method="kd", capture="graphs", recipe={"epochs": 1}), reg)
    with pytest.raises(KdbenchError, match="--capture graphs needs a CUDA device"):
        engine.setup_student(plan, None, CPU)
    with pytest.raises(KdbenchError, match=r"--capture compile\+graphs needs a CUDA device"):
        capture.check_capture("compile+graphs", CPU)
    both = capture.CaptureState(asked="compile+graphs", used="compile+graphs")
    assert both.compiles and both.graphs and both.tags() == {"capture": "compile+graphs"}
    assert not capture.CaptureState(asked="graphs", used="graphs").compiles
    both.fall_back("compiler failed")  # the graphs are kept, the networks uncompiled
    assert both.used == "graphs" and both.tags() == {"capture": "graphs", "capture_fallback": "compiler failed"}
    both.fall_back("capture failed")
    assert both.used == "none" and both.tags()["capture"] == "eager"
    declared = capture.start("compile+graphs", torch.device("cuda"), capturable=False, method_name="kdsvd")
    assert declared.used == "none"  # a step that cannot be captured runs eagerly, not as graphs
    with pytest.raises(KdbenchError, match="unknown capture mode 'graph'; choose one of: none, compile, graphs"):
        capture.check_capture("graph")


def test_lr_in_a_device_tensor_trains_like_a_float_lr():
    """What a captured step needs: a fused optimizer reading its lr from a tensor that the
    schedule writes into."""
    from kdbench.contracts import Recipe

    recipe = Recipe(epochs=3, batch_size=8, lr=0.1, schedule="multistep", milestones=(1, 2), momentum=0.9,
                    weight_decay=5e-4, nesterov=True)

    def train(device_lr):
        torch.manual_seed(0)
        net = torch.nn.Linear(5, 3)
        opt = engine.make_optimizer(net.parameters(), recipe, device_lr)
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        lrs = []
        for epoch in range(3):
            capture.set_lr(opt, engine.lr_at(recipe, epoch))
            lrs.append(float(opt.param_groups[0]["lr"]))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        return net, opt, lrs

    plain, plain_opt, plain_lrs = train(None)
    fused, fused_opt, fused_lrs = train(CPU)
    assert isinstance(fused_opt.param_groups[0]["lr"], torch.Tensor) and fused_opt.defaults["fused"]
    assert plain_lrs == pytest.approx(fused_lrs) and plain_lrs == pytest.approx([0.1, 0.01, 0.001])
    assert torch.allclose(plain.weight, fused.weight, atol=1e-6)


def test_cli_names_the_choices_of_precision_and_capture():
    from kdbench.cli import main as cli

    assert options.PRECISIONS == precision.PRECISIONS and options.CAPTURES == capture.CAPTURES
    for args, line in ((["--precision", "fp16"], "error: unknown --precision 'fp16'; choose one of: bf16, fp32"),
                       (["--capture", "cuda-graphs"], "error: unknown --capture 'cuda-graphs'; choose one of: none, compile, graphs, compile+graphs")):
        for command in ("run", "tune"):
            result = CliRunner().invoke(cli, [command, *args])
            assert result.exit_code == 2, result.output
            assert result.output.strip() == line


def test_engine_and_benchmarks_import_neither_mlflow_nor_optuna():
    scripts = [str(ROOT / "tests/benchmarks" / name) for name in ("cifar_epoch.py", "lockstep_epoch.py", "teacher_fusion.py")]
    code = ("import sys, runpy; import kdbench.core.engine, kdbench.core.capture, kdbench.core.precision, "
            "kdbench.core.plan, kdbench.core.plugins; "
            f"[runpy.run_path(path, run_name='not_main') for path in {scripts!r}]; "
            "bad = [m for m in ('mlflow', 'optuna') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_runs_in_one_process_with_other_taps_do_not_reuse_each_others_compiled_code(teacher, aot_eager):
    """The taps are forward hooks: code compiled for one run's hooks must not serve the next run
    (another method, another tuning trial) — it would miss taps, or read stale ones."""
    reg = plugins.load()
    for method in ("kd", "at", "fitnets"):  # kd has no taps: compiled without hooks first
        result, terms = fit(reg, method, teacher, capture="compile")
        assert result.tags == {"capture": "compile"}, (method, result.tags)


def test_every_run_of_a_process_compiles(teacher, aot_eager):
    """Dynamo's compiled code is kept per network class, for every instance: with its default
    limit of 8 entries the fourth run of a process (a worker's next cell, a tune trial) trained
    uncompiled under a capture=compile tag, on the H100 as here. Each run now compiles afresh."""
    reg = plugins.load()
    counters = torch._dynamo.utils.counters
    for method in ("kd", "at", "sp", "pkt", "rkd"):
        before = counters["stats"]["unique_graphs"]
        result, _ = fit(reg, method, teacher, capture="compile")
        assert counters["stats"]["unique_graphs"] - before >= 2, method  # student and teacher
        assert result.tags == {"capture": "compile"}, (method, result.tags)
    assert capture.recompile_limit_hits() == 0 and capture._live == []


def test_the_teacher_is_compiled_with_the_frozen_networks_options(teacher, aot_eager, monkeypatch):
    """``FROZEN_COMPILE_OPTIONS`` (a thorough compile for the forward-only teacher) reach the
    teacher alone; the student keeps ``COMPILE_OPTIONS``."""
    graphs = []

    def frozen_backend(gm, example_inputs):  # a torch.compile backend that records what it gets
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(capture, "FROZEN_COMPILE_OPTIONS", {"backend": frozen_backend})
    result, terms = fit(plugins.load(), "kd", teacher, capture="compile")
    assert result.tags == {"capture": "compile"}
    assert len(graphs) == 1  # the teacher's forward (eval mode, no grad): the student's went to aot_eager
    inputs = [n for n in graphs[0].graph.nodes if n.op == "placeholder"]  # the batch, weights, buffers
    shapes = {tuple(n.meta["example_value"].shape) for n in inputs if "example_value" in n.meta}
    assert {tuple(p.shape) for p in teacher.parameters()} <= shapes, shapes  # the teacher's weights


def test_a_run_that_reaches_the_recompile_limit_says_so_in_its_tags(teacher, aot_eager, monkeypatch, caplog):
    monkeypatch.setattr(capture, "RECOMPILE_LIMIT", 1)
    with torch._dynamo.config.patch(recompile_limit=1):  # train mode, then eval: 2 entries
        result, _ = fit(plugins.load(), "kd", teacher, capture="compile")
    assert result.tags["capture"] == "compile"
    assert "recompile limit" in result.tags["capture_fallback"]
    assert "recompile limit was reached" in caplog.text


def test_compile_graphs_is_the_default_on_cuda_only_and_an_explicit_mode_wins():
    from kdbench.core import capture

    assert capture.resolve(None, torch.device("cuda")) == "compile+graphs"
    assert capture.resolve(None, torch.device("cpu")) == "none"
    assert capture.resolve("none", torch.device("cuda")) == "none"
    assert capture.resolve("compile", torch.device("cpu")) == "compile"


def test_an_evaluation_whose_capture_fails_runs_eagerly_with_the_same_numbers(teacher, caplog):
    """GraphedEval falls back to eager forwards when capturing fails (here: no CUDA), says so
    once, and counts exactly what the eager evaluation counts — over a full and a partial batch."""
    reg = plugins.load()
    plan = make_plan(RunConfig(method="kd"), reg)
    val = engine.load_split(plan.dataset_obj, "val", CPU, {})
    batch = len(val) // 3 + 1  # two full batches and a partial one
    eager = engine.evaluate(teacher, val, batch, CPU)
    graphs = capture.GraphedEval(CPU)
    first = engine.evaluate(teacher, val, batch, CPU, graphs=graphs)
    again = engine.evaluate(teacher, val, batch, CPU, graphs=graphs)
    assert first == again == eager and 0 < eager["top1"] < eager["top5"] < 1
    with torch.no_grad():
        logits = torch.cat([teacher(x) for x, _ in val.batches(batch)])
    labels = torch.cat([y for _, y in val.batches(batch)])
    assert eager["top1"] == (logits.argmax(1) == labels).sum().item() / len(labels)
    warned = [r.getMessage() for r in caplog.records if "evaluation runs eagerly" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and graphs.reason and not graphs.graphs


def test_epoch_totals_keep_their_buffers_across_epochs_and_count_what_was_added():
    """A captured step adds into the totals' buffers by address: reset() must zero them in place;
    the means are the batch-size-weighted means of the terms, accuracy the share of argmax hits."""
    totals = engine.EpochTotals(CPU)
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
    y = torch.tensor([0, 0, 0])
    assert not totals.ready
    totals.accumulate({"ce": torch.tensor(1.0), "kd": torch.tensor(0.5)}, logits, y)
    totals.count(3)
    assert totals.ready
    sums, correct = totals.sums.data_ptr(), totals.correct.data_ptr()
    totals.accumulate({"ce": torch.tensor(4.0), "kd": torch.tensor(2.0)}, logits[:1], y[:1])
    totals.count(1)
    assert totals.means() == pytest.approx([(3 * 1.0 + 4.0) / 4, (3 * 0.5 + 2.0) / 4])
    assert totals.metrics(totals.means(), 0.1, 0.0)["train_top1"] == 3 / 4
    totals.reset()
    assert (totals.sums.data_ptr(), totals.correct.data_ptr()) == (sums, correct)
    assert totals.seen == 0 and totals.sums.tolist() == [0.0, 0.0] and totals.correct.item() == 0
    totals.accumulate({"ce": torch.tensor(2.0), "kd": torch.tensor(1.0)}, logits[1:], y[1:])
    totals.count(2)
    assert totals.means() == pytest.approx([2.0, 1.0]) and totals.names == ["ce", "kd"]


# --------------------------------------------------------------------------- reads of Step.epoch

def _reads_epoch(reg, method: str, teacher) -> bool:
    """Whether one batch of each of the method's stages (pre-stages, then main), after an eager
    step of each as a capture's warm-up, reads the epoch."""
    plan = make_plan(RunConfig(method=method, recipe={"epochs": 1}), reg)
    setup = engine.setup_student(plan, teacher if plan.method_obj.needs_teacher else None, CPU)
    split = setup.splits["train"]
    x, y, index = split.x[:64], split.y[:64], torch.arange(64)
    stages = [stage for stage, _ in setup.pre_stages] + [engine.Stage("main", 1, plan.method_obj.loss)]
    ramps = [capture.Ramps(CPU) for _ in stages]  # each stage step's own
    for stage, stage_ramps in zip(stages, ramps):
        engine._batch_loss(setup.trainee, stage, 0, 1, x, y, index, CPU, ramps=stage_ramps)
    with capture.watching_epoch() as seen:
        for stage, stage_ramps in zip(stages, ramps):
            engine._batch_loss(setup.trainee, stage, 0, 1, x, y, index, CPU, ramps=stage_ramps)
    return seen[0]


@pytest.mark.parametrize("method", sorted(plugins.load().methods) + ["kd+dkd", "kd+at", "fitnets+crd"])
def test_no_built_in_method_reads_the_epoch(teacher, method):
    """The captured graph of every method (pre-stages included) is kept across epochs: dkd's and
    reviewkd's warm-up factors are ``Step.ramp``'s device scalars, not reads of the epoch."""
    assert _reads_epoch(plugins.load(), method, teacher) is False


def test_a_ramp_is_a_device_scalar_set_at_each_epoch_and_one_made_in_a_capture_counts_as_a_read():
    ramps = capture.Ramps(CPU)
    step = dataclasses.replace(_watched(epoch=0), ramps=ramps)
    with capture.watching_epoch() as seen:  # made during a capture: its value would be frozen
        value = step.ramp(4.0)
    assert seen[0] is True and value.dtype == torch.float32 and value.item() == 0.25
    assert step.ramp(0.0).item() == 1.0  # a warm-up step's (no capture watches)
    with capture.watching_epoch() as seen:  # the capture after it: the same tensors
        assert step.ramp(4.0) is value and step.ramp(0.0) is ramps.values[0.0]
    assert seen[0] is False
    got = []
    for epoch in range(6):
        ramps.set_epoch(epoch)
        got.append((value.item(), ramps.values[0.0].item()))
    assert got == [(0.25, 1.0), (0.5, 1.0), (0.75, 1.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)]
    # outside a run: the same formula, as a float
    assert [dataclasses.replace(step, ramps=None, epoch=e).ramp(2.5) for e in (0, 1, 2)] == [0.4, 0.8, 1.0]


def _watched(epoch: int = 3):
    return capture.WatchedStep(x=torch.zeros(2, 1), y=torch.zeros(2), student=None, teacher=None,
                               hp=SimpleNamespace(T=4.0), modules=None, epoch=epoch, epochs=5, stage="main")


@pytest.mark.parametrize("read, counts", [
    (lambda s: s.epoch, True),
    (lambda s: getattr(s, "epoch"), True),
    (lambda s: vars(s)["epoch"], True),
    (lambda s: copy.copy(s).epochs, True),  # its copy's epoch could be read later, unwatched
    (lambda s: dataclasses.asdict(s)["epochs"], True),
    (lambda s: dataclasses.replace(s, hp=SimpleNamespace()).epoch, True),
    (lambda s: dataclasses.replace(s, hp=SimpleNamespace()).hp, False),  # how combined methods split a step
    (lambda s: (s.epochs, s.stage, s.hp.T, s.x.sum()), False),
])
def test_every_way_of_reading_a_steps_epoch_counts_and_passing_it_on_does_not(read, counts):
    step = _watched()
    with capture.watching_epoch() as seen:
        read(step)
    assert seen[0] is counts
    assert capture.step_class() is engine.Step  # plain steps once no capture watches
    read(step)  # no watcher: nothing to tell


def test_a_graphed_step_is_captured_again_at_a_new_epoch_only_if_it_read_the_epoch(monkeypatch):
    """CUDA graphs faked on the CPU: a capture runs the step, a replay runs it again with what the
    capture saw (a graph freezes Python values). A step reading the epoch is recaptured each
    epoch and so always computes with the right one; a step that does not is captured once."""
    live = {}

    class FakeGraph:
        def replay(self):
            steps = live["steps"]
            steps.step(steps.epoch, *steps.static)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(capture, "on_side_stream", lambda device, fn: fn())

    def trained(read):
        used = []

        def step(epoch, x, y, index):
            made = capture.step_class()(x=x, y=y, student=None, teacher=None, hp=SimpleNamespace(),
                                        modules=None, epoch=epoch, epochs=3, stage="main")
            used.append((epoch, read(made)))

        steps = live["steps"] = capture.GraphedSteps(step, CPU)
        for epoch in range(3):
            for _ in range(capture.WARMUP_STEPS + 2):
                steps(epoch, torch.zeros(4, 2), torch.zeros(4), None)
        return steps.captures, used

    captures, used = trained(lambda made: made.epoch)
    assert captures == 3 and all(true == seen for true, seen in used)
    captures, used = trained(lambda made: made.epochs)
    assert captures == 1
