"""Lockstep: several students of one teacher trained together, one teacher forward per batch.

Methods of one (dataset, teacher, student, recipe, seed, precision, device) see the same
main-stage batches (common random numbers, :func:`kdbench.core.engine.stream`), and the teacher
is frozen in eval mode, so its outputs for a batch are the same for every method: a group
computes them once, with the union of the taps its members read, and each member trains on
them as it would alone — its own optimizer, modules, schedule, validation and test. On the CPU
in float32 a member's numbers are bitwise those of its separate run
(tests/core/test_lockstep.py).

Pre-stages: a member with pre-stages runs them alone first (each from its own stream, the
teacher forwarded for it alone), then joins the group for the main stage.

Each member keeps its own global RNG state (what a method's loss may draw from, e.g. CRD's
negative samples), swapped in around its work: interleaving the members changes nothing.

With ``--capture graphs`` or ``compile+graphs`` (the CUDA default) the group's whole step — the teacher forward and
every member's step — is one CUDA graph (:class:`_GroupGraph`). Timing metrics are the group's: a member's ``epoch_seconds`` is the group's
training time for the epoch divided by its members, ``peak_mem_mb`` the group's peak.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from kdbench.contracts import Outputs, Stage
from kdbench.core import capture as capturing
from kdbench.core import engine
from kdbench.core.engine import FitJob, FitResult, OnEpoch, StudentSetup
from kdbench.core.precision import autocast as precision_autocast
from kdbench.core.precision import resolve_precision
from kdbench.core.taps import Tapped

log = logging.getLogger("kdbench")


def alone_reason(plan) -> str | None:
    """Why the plan's method cannot share a teacher forward with others (None: it can)."""
    method = plan.method_obj
    if method.peers is not None:
        return "trains peer networks"
    if not method.needs_teacher or plan.teacher is None:
        return "trains without a teacher"
    if method.train_data is not None:
        return "trains on its own data, not the dataset's batches"
    if method.uses_teachers or plan.extra_teachers:
        return "reads extra teachers"
    return None


# --------------------------------------------------------------------------- the shared teacher


class _GroupTeacher:
    """The teacher with the union of the members' taps, and its outputs for the current batch
    (computed by the first member that asks, under that member's autocast: all members share
    the precision)."""

    def __init__(self, tapped: Tapped):
        self.tapped = tapped
        self.batch: torch.Tensor | None = None
        self.out: Outputs | None = None
        self.forwards = 0  # teacher forwards computed (a test counts them)

    def start_batch(self, x: torch.Tensor | None) -> None:
        self.batch, self.out = x, None

    def outputs(self, x: torch.Tensor) -> Outputs:
        if x is self.batch:
            if self.out is None:
                self.out = self.compute(x)
            return self.out
        # another input (a pre-stage, a loss that re-runs the teacher, a graph's static copy)
        return self.compute(x)

    def compute(self, x: torch.Tensor) -> Outputs:
        """A teacher forward on ``x`` (counted)."""
        self.forwards += 1
        return self.tapped(x)


class _TeacherView(nn.Module):
    """What one member sees as its teacher: the group's outputs, restricted to its taps."""

    def __init__(self, group: _GroupTeacher, wanted: list[str]):
        super().__init__()
        self.group, self.wanted = group, list(wanted)

    @property
    def model(self) -> nn.Module:
        """The teacher network (not a registered submodule: the member owns no teacher weights)."""
        return self.group.tapped.model

    @property
    def weights(self) -> dict[str, torch.Tensor] | None:
        """The tensors the group's teacher runs with in place of its own (``Tapped.use_weights``)."""
        return self.group.tapped.weights

    def use_weights(self, weights: dict[str, torch.Tensor] | None) -> None:
        self.group.tapped.use_weights(weights)

    def forward(self, x: torch.Tensor) -> Outputs:
        out = self.group.outputs(x)
        return Outputs(out.logits, {name: out.feats[name] for name in self.wanted})


def share_teacher(setups: list[StudentSetup], teacher_net: nn.Module, taps: dict, owner: str) -> _GroupTeacher:
    """Give every member a view of one tapped teacher (the union of their taps, in the model's
    declared order); the members' own teacher hooks are removed."""
    union = set()
    fused = [setup.trainee.teacher.inference for setup in setups]
    for setup in setups:
        union.update(setup.trainee.teacher.wanted)
        setup.trainee.teacher.remove()
    wanted = [name for name in taps if name in union]
    group = _GroupTeacher(Tapped(teacher_net, taps, wanted, owner).eval())
    if fused and all(f is not None for f in fused):
        # each member checked its fused teacher on its own taps (engine.fuse_teacher): one serves all
        group.tapped.use_inference(Tapped(fused[0].model, taps, wanted, owner))
    elif any(f is not None for f in fused):
        for setup in setups:  # a member reads a tap the fused teacher does not keep: the group runs unfused
            setup.trainee.teacher_fusion = "unfused: a lockstep group member reads taps the fused teacher does not keep"
    for setup in setups:
        setup.trainee.teacher = _TeacherView(group, setup.trainee.teacher.wanted)
    return group


# --------------------------------------------------------------------------- memory


def member_bytes(setup: StudentSetup, batch_size: int, input_shape, device: torch.device, precision: str,
                 eval_batch_size: int = 0) -> int:
    """A rough upper estimate of one member's device memory: weights, gradients and two optimizer
    buffers of the student and the method's modules, and the student's activations kept for the
    backward pass (every leaf module's output, counted on a forward of two samples).
    ``eval_batch_size``: the member's evaluation is replayed as CUDA graphs (a graphed run), whose
    two memory pools (the full and the last batch) each hold about three of the largest
    activations at that batch."""
    nets = [setup.trainee.student.model] + ([setup.trainee.modules] if setup.trainee.modules is not None else [])
    param_bytes = sum(p.numel() * p.element_size() for net in nets for p in net.parameters())
    counts: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _a, out: counts.append(out.numel() if torch.is_tensor(out) else 0))
             for m in setup.trainee.student.model.modules() if not list(m.children())]
    was = setup.trainee.student.training
    try:
        setup.trainee.student.eval()
        with torch.no_grad():
            setup.trainee.student(torch.zeros((2, *input_shape), device=device))
    finally:
        for hook in hooks:
            hook.remove()
        setup.trainee.student.train(was)
    element = 2 if precision == "bf16" else 4
    activations = sum(counts) // 2 * batch_size * element
    evaluation = 2 * 3 * max(counts, default=0) // 2 * eval_batch_size * element
    return int(4 * param_bytes + 1.5 * activations + evaluation)


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory on the device (None on the CPU: no limit is checked there)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free


def split_by_memory(sizes: list[int], budget: int | None) -> list[list[int]]:
    """Indices of the members in consecutive chunks whose summed sizes fit ``budget`` (None: one
    chunk). A member larger than the budget on its own gets a chunk of its own."""
    if budget is None:
        return [list(range(len(sizes)))] if sizes else []
    chunks: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if chunks and used + size <= budget:
            chunks[-1].append(i)
            used += size
        else:
            chunks.append([i])
            used = size
    return chunks


# --------------------------------------------------------------------------- training


class _RngState:
    """A member's own global random state (CPU, and the device's on CUDA), swapped in around
    its work so that the other members' draws do not shift it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def active(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        try:
            yield
        finally:
            self.cpu = torch.get_rng_state()
            if self.cuda is not None:
                self.cuda = torch.cuda.get_rng_state(self.device)


@dataclass
class Member:
    """One student of a group: its job (:func:`engine.student_job`), where its epochs go, and
    what :func:`engine.setup_student` measured."""

    job: FitJob
    on_epoch: OnEpoch
    info: dict
    rng: _RngState  # the global random state its setup left (:func:`member`)


def member(plan, setup: StudentSetup, device: torch.device, on_epoch: OnEpoch, with_test: bool = True) -> Member:
    """A group member for the student of ``setup``; call it right after :func:`engine.setup_student`
    (the member keeps the global random state its setup left, as its separate run would)."""
    return Member(engine.student_job(plan, setup, device, with_test), on_epoch, dict(setup.info), _RngState(device))


@dataclass
class MemberOutcome:
    result: FitResult | None = None
    error: BaseException | None = None


class _Running:
    """A member in the main stage: train_stage's state, per member."""

    def __init__(self, member: Member, device: torch.device, pre_seconds: float):
        self.member, self.job = member, member.job
        trainee = self.job.trainee
        self.stage = Stage("main", self.job.recipe.epochs, self.job.main_loss, train_student=True)
        engine.prepare_device(device)  # as train_stage does for a run alone
        state = engine.run_capture_state(trainee, device)
        self.opt = engine.stage_optimizer(trainee, self.stage, self.job.recipe, device if state.graphs else None)
        trainee.student.train()
        if trainee.modules is not None:
            trainee.modules.train()
        precision = resolve_precision(trainee.precision, device)
        self.step = engine.StageStep(trainee, self.stage, self.job.recipe.epochs, self.opt, device, precision, state,
                                     teacher_beside=False)
        self.validation = engine.Validation(self.job, device, member.on_epoch, pre_seconds)
        self.totals = engine.EpochTotals(device)  # reset each epoch (a captured step adds into it)
        self.lr = 0.0


def fit_group(members: list[Member], group: _GroupTeacher, device: torch.device) -> list[MemberOutcome]:
    """Train the members in lockstep; one outcome per member, in order. A member that fails
    (a non-finite loss, an error in its method) leaves the group with its error; the others go
    on. Ctrl-C stops the group."""
    outcomes = [MemberOutcome() for _ in members]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    running: dict[int, _Running] = {}
    for i, one in enumerate(members):
        try:
            with one.rng.active():
                group.start_batch(None)
                pre_seconds = engine.run_pre_stages(one.job, device, one.on_epoch)
                running[i] = _Running(one, device, pre_seconds)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - this member fails, the group goes on
            outcomes[i].error = exc
    if running:
        _main_stage(running, outcomes, group, device)
    for i, run in running.items():
        try:
            with run.member.rng.active():
                result = engine.finish_fit(run.job, run.validation, device)
            result.metrics.update(run.member.info)
            result.tags["lockstep"] = str(len(members))
            outcomes[i].result = result
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001
            outcomes[i].error = exc
    return outcomes


#: run the members' steps of a group graph on parallel streams (False: one after the other;
#: tests/benchmarks/lockstep_epoch.py --streams both measures the difference)
PARALLEL_STREAMS = True


class _GroupGraph:
    """The group's whole training step — one teacher forward and every member's step, with each
    member's epoch totals — replayed as one CUDA graph (when every member's step is captured:
    ``--capture graphs`` or ``compile+graphs`` on CUDA, the default there).

    The teacher forward runs on a branch of its own and the members' steps fork onto streams of
    their own and join again (:data:`PARALLEL_STREAMS`) — by default the teacher computing the next
    batch's outputs beside the whole group step while the members train on this batch's
    (``engine.TEACHER_STREAM`` "ahead"), or this batch's beside each member's student forward, the
    member's loss after it ("beside"): in the graph they are parallel branches, so the small kernels of
    several students (a resnet8x4 at batch 64 fills a fraction of an H100) run side by side
    instead of one after the other. Each member keeps its stream for the whole stage, so its
    gradients and optimizer state stay on one stream. Inside the graph the members share the
    device's random stream (no swapping in a graph): a method drawing random numbers on the
    device (CRD's negatives) draws other ones than alone, so its numbers are not bitwise those
    of its separate run."""

    def __init__(self, runs: dict[int, _Running], group: _GroupTeacher, device: torch.device,
                 streams: dict[int, capturing.Branch] | None):
        self.runs, self.group, self.device = dict(runs), group, device
        self.streams = {}
        if streams is not None:
            for i in self.runs:
                if i not in streams:
                    streams[i] = capturing.Branch(device)
                self.streams[i] = streams[i]
        # with parallel members, the teacher forward gets a branch of its own too (engine.TEACHER_STREAM):
        # "ahead" — the next batch's, beside the whole group step, the members reading this batch's
        # (computed during the previous step, engine.TeacherAhead); "beside" — this batch's, each
        # member's student forward beside it and the member joining it before its loss (engine._forward)
        self.branch = capturing.Branch(device) if self.streams and engine.TEACHER_STREAM != "serial" else None
        self.precision = next(iter(self.runs.values())).step.precision  # the members share it
        ahead = self.branch is not None and engine.TEACHER_STREAM == "ahead"
        self.ahead = engine.TeacherAhead([group.compute], self.branch, device, self.precision) if ahead else None
        for run in self.runs.values():
            run.step.branch = self.branch if self.ahead is None else None
            run.step.state.teacher_stream = engine.TEACHER_STREAM if self.branch is not None else "serial"  # its tag
        self.graphed = capturing.GraphedSteps(self._step, device)

    def _teacher(self, x) -> None:
        """The teacher forward, once, on the teacher branch (or the current stream), as its first
        member would run it — or, ahead, the next batch's started on the branch and this batch's
        handed to the members."""
        with torch.no_grad(), precision_autocast(self.device, self.precision, False):
            if self.ahead is not None:
                self.group.out = self.ahead.outputs()[0]
                self.ahead.launch()
                return
            with self.branch.fork() if self.branch is not None else contextlib.nullcontext():
                self.group.outputs(x)

    def _step(self, epoch: int, x, y, index):
        self.group.start_batch(x)
        if not self.streams:
            for run in self.runs.values():
                run.step.counted(epoch, x, y, index)
            return
        self._teacher(x)
        for i, run in self.runs.items():
            with self.streams[i].fork():
                run.step.counted(epoch, x, y, index)
        for i in self.runs:
            self.streams[i].join()
        if self.ahead is not None:  # every member done with this batch's outputs: the next batch's in their place
            self.ahead.land()

    def __call__(self, epoch: int, x, y, index, x_next: torch.Tensor | None = None) -> None:
        """The group's step on ``x``; ``x_next``, the epoch's next batch (None after the last), is
        what the teacher computes ahead."""
        for run in self.runs.values():
            run.step.totals = run.totals
        if self.ahead is not None:
            self.ahead.before(x, x_next)
        self.graphed(epoch, x, y, index)

    def fall_back(self, exc: BaseException) -> None:
        """Capturing failed: every member runs eagerly from here (each says so in its tags)."""
        for run in self.runs.values():
            run.step.state.fall_back(capturing.failure_reason(exc), eager=True)
            run.step.graphed = None


def _group_graph(running: dict[int, _Running], group: _GroupTeacher, device: torch.device,
                 streams: dict | None) -> _GroupGraph | None:
    """The group's graph when every member's step is captured; ``streams`` (member → stream,
    kept for the stage) for parallel branches, None for one member after the other."""
    if running and all(run.step.graphed is not None for run in running.values()):
        return _GroupGraph(running, group, device, streams)
    return None


def _main_stage(running: dict[int, _Running], outcomes: list[MemberOutcome], group: _GroupTeacher,
                device: torch.device) -> None:
    first = next(iter(running.values())).job
    recipe, train, augment = first.recipe, first.splits["train"], first.augment
    generator = engine.stream(first.seed, device)  # the main stream every member would draw alone
    streams: dict[int, capturing.Branch] | None = {} if PARALLEL_STREAMS else None
    graph: _GroupGraph | None = None
    for epoch in range(recipe.epochs):
        for run in running.values():
            run.lr = engine.lr_at(recipe, epoch)
            capturing.set_lr(run.opt, run.lr)
            run.step.begin_epoch(epoch)
            run.totals.reset()
        start = time.perf_counter()
        for (x, y, index), x_next in engine.with_next(train.shuffled(recipe.batch_size, generator, augment)):
            group.start_batch(x)
            if graph is None or graph.runs.keys() != running.keys():
                # kept while the members stay (GraphedSteps recaptures it at a new epoch if a
                # member's step read Step.epoch, as a run's step is); a member that failed leaves it
                graph = _group_graph(running, group, device, streams)
            if graph is not None and all(run.totals.ready for run in running.values()):
                try:
                    graph(epoch, x, y, index, x_next)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # noqa: BLE001 - capturing failed: this batch again, eagerly
                    if graph.streams:  # parallel branches first give way to one member after the other
                        log.warning("kdbench: lockstep members captured one after the other (parallel "
                                    "streams failed): %s", capturing.failure_reason(exc))
                        streams = None
                        graph = _group_graph(running, group, device, streams)
                    else:
                        graph.fall_back(exc)
                        graph = None
                    group.start_batch(x)
                else:
                    for run in running.values():
                        run.totals.count(len(y))
                    continue
            for i, run in list(running.items()):
                try:
                    with run.member.rng.active():
                        run.step(epoch, x, y, index, run.totals)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # noqa: BLE001
                    outcomes[i].error = exc
                    del running[i]
        group.start_batch(None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        share = (time.perf_counter() - start) / max(len(running), 1)  # per student-epoch
        for i, run in list(running.items()):
            try:
                with run.member.rng.active():
                    means = run.totals.means()
                    epoch_metrics = run.totals.metrics(means, run.lr, start)
                    epoch_metrics["epoch_seconds"] = share
                    engine.check_finite(run.totals.names, means, run.stage, epoch)
                    run.validation(epoch, epoch_metrics)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001
                outcomes[i].error = exc
                del running[i]
        if not running:
            return
