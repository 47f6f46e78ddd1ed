"""The training engine: teacher and student training loops, evaluation, stages.

It knows the contracts, never a method, model or dataset by name, and never the tracker: it
reports each epoch to an ``on_epoch`` callback. The hot loop keeps everything on the device and
reads losses and accuracy once per epoch.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import operator
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.contracts import Augment, Dataset, LossFn, Method, Model, Outputs, Probe, Recipe, Stage, Step
from kdbench.core import capture as capturing
from kdbench.core import metrics
from kdbench.core.precision import autocast as precision_autocast
from kdbench.core.precision import bf16_weights, cast_weights, float32_outputs, loss_region, resolve_precision
from kdbench.core.splits import DeviceSplit, load_split, model_layout
from kdbench.core.taps import Tapped, wanted_taps
from kdbench.errors import KdbenchError, NonFiniteLoss

#: where the frozen teachers' forward runs when the step is replayed as a CUDA graph: "ahead" —
#: on a stream of its own, for the next batch, beside the whole step on this one (:class:`TeacherAhead`);
#: "beside" — on a stream of its own, for this batch, beside the student's forward; "serial" —
#: before the student's forward, as eagerly. The same kernels on the same inputs: the same numbers.
#: ``tests/benchmarks/cifar_epoch.py --teacher-stream all`` measures the three.
TEACHER_STREAMS = ("ahead", "beside", "serial")
TEACHER_STREAM = "ahead"

#: how a bf16 run's captured steps (``graphs``, ``compile+graphs``) hold the frozen teachers'
#: convolution and linear weights: "bf16" — a bf16 copy of each, made once per run (the shared
#: teacher itself stays float32), what autocast would otherwise cast at every forward: the same
#: numbers bitwise, about 35 kernels fewer per resnet32x4 forward (:func:`precision.bf16_weights`);
#: "fp32" — cast by autocast at every forward. ``cifar_epoch.py --teacher-weights`` measures both.
TEACHER_WEIGHT_CHOICES = ("bf16", "fp32")
TEACHER_WEIGHTS = "bf16"

#: when a frozen teacher whose model offers an inference form (``Model.fuse``: the built-in ResNets'
#: and VGGs' convolutions fused with their BatchNorm, ReLU and shortcut add, one cuDNN call each)
#: runs it for its forward passes without gradients: "cuda" — at bf16 on CUDA, where it saved 16 %
#: of a batch-1024 KD step and 3 % at batch 64 on an H200 (docs/PERFORMANCE.md) and its rounding
#: is bf16's; "off" — never; "always" — on any device and precision (tests: the CPU runs the
#: same modules without cuDNN's fused kernels). ``cifar_epoch.py --teacher-fusion`` measures it.
TEACHER_FUSION_CHOICES = ("cuda", "off", "always")
TEACHER_FUSION = "cuda"
#: how far (relative to the largest value) a fused teacher's logits and taps may be from the
#: original's on the check batch, by precision: bf16 rounding noise is about 1 %; a tap moved by
#: the fusion (e.g. after a ReLU instead of before it) is off by tens of percent
FUSION_TOLERANCE = {"bf16": 0.05, "fp32": 1e-3}

#: how a bf16 run's uncompiled captured steps hold the student's convolution and linear weights:
#: "bf16" — a bf16 copy of each that the step's forward runs, its gradients turned into the float32
#: weights' by one multi-tensor copy and the copies refreshed after the optimizer step by another
#: (:class:`HeldStudent`): the same numbers bitwise, two kernels where autocast makes two per weight
#: and step (24 of a resnet8x4 step's: its 10 convolutions' weights, its linear weight and bias);
#: "fp32" — cast by autocast at every forward, each gradient cast back in the backward.
#: ``cifar_epoch.py --student-weights`` measures both.
STUDENT_WEIGHT_CHOICES = ("bf16", "fp32")
STUDENT_WEIGHTS = "bf16"

#: how uncompiled captured steps advance the student's BatchNorm batch counters
#: (``num_batches_tracked``): "foreach" — all of them by one multi-tensor add per step
#: (:class:`BatchCounters`; the same counts); "per_layer" — each layer its own add, as PyTorch's
#: BatchNorm does (10 kernels of a resnet8x4 step). ``cifar_epoch.py --batch-counters`` measures both.
BATCH_COUNTER_CHOICES = ("foreach", "per_layer")
BATCH_COUNTERS = "foreach"


@dataclass
class EpochLog:
    role: str  # "teacher" | "student"
    stage: str
    epoch: int  # 1-based within the stage
    epochs: int
    metrics: dict[str, float]


OnEpoch = Callable[[EpochLog], None]


@dataclass
class FitResult:
    """What one training run measured. ``metrics`` holds the final, flat numbers."""

    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[float] = field(default_factory=list)  # validation top-1 per main-stage epoch
    seconds: list[float] = field(default_factory=list)  # cumulative training seconds
    state_dict: dict | None = None  # the student's last weights
    best_state_dict: dict | None = None  # its weights at the best validation epoch (tested runs)
    peer_val: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # how the run was executed, e.g. capture fallback


def select_device(name: str | None = None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KdbenchError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdbenchError("--device cuda asked for, but PyTorch sees no CUDA device; use --device cpu")
    try:  # another kind (mps, xpu, …): only where this PyTorch build and machine have it
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):
        raise KdbenchError(f"--device {name!r} is not usable here (this PyTorch build or machine has no "
                           f"{device.type} backend); use cpu or cuda") from None
    return device


def autocast(device: torch.device, precision: str | None = None):
    """The networks' autocast region at ``precision`` (None: the device's default — bf16 on CUDA,
    nothing on the CPU); see :mod:`kdbench.core.precision`."""
    return precision_autocast(device, resolve_precision(precision, device))


def lr_at(recipe: Recipe, epoch: int) -> float:
    """Learning rate for 0-based ``epoch`` under the recipe's schedule."""
    if recipe.schedule == "multistep":
        return recipe.lr * recipe.gamma ** sum(epoch >= milestone for milestone in recipe.milestones)
    if recipe.schedule == "cosine":
        return 0.5 * recipe.lr * (1 + math.cos(math.pi * epoch / recipe.epochs))
    if recipe.schedule == "constant":
        return recipe.lr
    raise KdbenchError(f"unknown lr schedule {recipe.schedule!r} (multistep, cosine or constant)")


def make_optimizer(params, recipe: Recipe, device_lr: torch.device | None = None) -> torch.optim.Optimizer:
    """The recipe's optimizer. ``device_lr``: fused, with the learning rate in a tensor on that
    device (what a captured step needs: the schedule writes into it); else the plain one."""
    params = [p for p in params if p.requires_grad]
    fused = {} if device_lr is None else {"fused": True}
    lr = recipe.lr if device_lr is None else torch.tensor(float(recipe.lr), device=device_lr)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=recipe.momentum,
            weight_decay=recipe.weight_decay, nesterov=recipe.nesterov, **fused,
        )
    if recipe.optimizer in ("adam", "adamw"):
        cls = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
        # Adam keeps a step count: on the device (capturable) so a replayed graph advances it
        capturable = {} if device_lr is None else {"capturable": True}
        return cls(params, lr=lr, weight_decay=recipe.weight_decay, **fused, **capturable)
    raise KdbenchError(f"unknown optimizer {recipe.optimizer!r} (sgd, adam or adamw)")


def build_model(model: Model, dataset: Dataset, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    try:
        net = model.make(dataset.num_classes, dataset.input_shape)
    except KdbenchError:
        raise
    except Exception as exc:
        raise KdbenchError(
            f"model {model.name!r} could not be built for dataset {dataset.name!r} "
            f"(input {tuple(dataset.input_shape)}, {dataset.num_classes} classes): {exc}"
        ) from None
    if device.type == "cuda" and len(dataset.input_shape) == 3:
        net = net.to(memory_format=torch.channels_last)
    return net.to(device)


def unreadable_reason(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in one line and without torch's advice to
    unpickle arbitrary objects (``weights_only=False`` runs code from the file)."""
    text = str(exc)
    if "Weights only load failed" in text:
        return "the file is damaged or holds pickled objects other than tensors (kdbench loads weights only)"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return f"damaged or not a PyTorch file ({type(exc).__name__}: {lines[0] if lines else '?'})"


def load_checkpoint(net: nn.Module, path: str, owner: str) -> None:
    """Load ``{'model': state_dict}`` or a bare state dict; name the first mismatch."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KdbenchError(f"teacher checkpoint {path!r} does not exist") from None
    except Exception as exc:
        raise KdbenchError(f"teacher checkpoint {path!r} could not be read: {unreadable_reason(exc)}") from None
    state = blob.get("model", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise KdbenchError(f"teacher checkpoint {path!r} holds no state dict")
    own = net.state_dict()
    for key, value in own.items():
        if key not in state:
            raise KdbenchError(f"teacher checkpoint {path!r} does not fit {owner}: missing key {key!r}")
        if tuple(state[key].shape) != tuple(value.shape):
            raise KdbenchError(
                f"teacher checkpoint {path!r} does not fit {owner}: {key!r} has shape "
                f"{tuple(state[key].shape)}, the model needs {tuple(value.shape)}"
            )
    extra = [k for k in state if k not in own]
    if extra:
        raise KdbenchError(f"teacher checkpoint {path!r} does not fit {owner}: unexpected key {extra[0]!r}")
    broken = [k for k in own if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())]
    if broken:  # it would make every loss non-finite, and the message then blame the student's lr
        raise KdbenchError(f"teacher checkpoint {path!r} has non-finite values (NaN or inf) in {len(broken)} "
                           f"tensor(s), first {broken[0]!r}: it cannot teach; pass a trained checkpoint")
    net.load_state_dict(state)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(net: nn.Module, split: DeviceSplit, batch_size: int, device: torch.device,
             precision: str | None = None, graphs: capturing.GraphedEval | None = None) -> dict:
    """Top-1 and top-5 accuracy (fractions) of ``net`` (returning logits or Outputs); the network
    runs at ``precision`` (None: the device's default), the accuracy is counted in float32.
    ``graphs``: the batches replayed as CUDA graphs (what a run with captured steps passes)."""
    was = net.training
    net.eval()
    precision = resolve_precision(precision, device)

    def batch_correct(x, y):
        with precision_autocast(device, precision, graphs is None):
            out = net(x)
        logits = out.logits if hasattr(out, "logits") else out
        return metrics.topk_correct(logits.float(), y)

    correct = torch.zeros(2, device=device, dtype=torch.long)
    for x, y in split.batches(batch_size):
        correct += batch_correct(x, y) if graphs is None else graphs.correct(net, x, y, batch_correct)
    net.train(was)
    top1, top5 = (correct.double() / max(len(split), 1)).tolist()
    return {"top1": top1, "top5": top5}


# --------------------------------------------------------------------------- training


def cross_entropy(step: Step) -> dict[str, torch.Tensor]:
    return {"ce": F.cross_entropy(step.student.logits, step.y)}


@dataclass
class Trainee:
    """What is optimised: the student (tapped), the method's extra modules, a frozen teacher."""

    student: Tapped
    teacher: Tapped | None
    modules: nn.Module | None
    hp: SimpleNamespace
    teachers: list[Tapped] = field(default_factory=list)  # extra frozen teachers (Step.teachers)
    peers: list[nn.Module] = field(default_factory=list)  # extra evaluated networks (Method.peers)
    precision: str | None = None  # "bf16" | "fp32"; None: the device's default
    capture: str = "none"  # how steps are captured: kdbench.core.capture.CAPTURES
    capturable: bool = True  # False: the method's step cannot be captured (Method.capturable)
    method_name: str = ""
    capture_state: capturing.CaptureState | None = None  # set by the first stage trained
    teacher_fusion: str | None = None  # "fused", or why not (:func:`fuse_teacher`); None: not tried

    @property
    def frozen(self) -> list[Tapped]:
        """The frozen teachers: the teacher (when there is one) first, then the extra teachers."""
        return ([self.teacher] if self.teacher is not None else []) + list(self.teachers)


def stage_optimizer(trainee: Trainee, stage: Stage, recipe: Recipe,
                     device_lr: torch.device | None = None) -> torch.optim.Optimizer:
    """The optimizer of a stage: the method's modules, and the student when the stage trains it."""
    params = list(trainee.modules.parameters()) if trainee.modules is not None else []
    if stage.train_student:
        params = list(trainee.student.parameters()) + params
    if not params:
        raise KdbenchError(f"stage {stage.name!r} has no parameters to train")
    return make_optimizer(params, recipe, device_lr)


def _forward(trainee: Trainee, x: torch.Tensor, branch: capturing.Branch | None = None,
             ahead: TeacherAhead | None = None) -> tuple[Outputs, Outputs | None, list[Outputs] | None]:
    """The student's outputs for a batch, and the frozen teachers' (computed without a graph) —
    on ``branch``, beside the student's forward, when there is one; computed during the previous
    step when ``ahead`` holds them (it then starts the next batch's on its branch)."""
    if ahead is not None:
        ahead.launch()
        teacher, teachers = ahead.outputs()
        return trainee.student(x), teacher, teachers
    with branch.fork() if branch is not None else contextlib.nullcontext(), torch.no_grad():
        teacher = trainee.teacher(x) if trainee.teacher is not None else None
        teachers = [net(x) for net in trainee.teachers] if trainee.teachers else None
    student = trainee.student(x)
    if branch is not None:
        branch.join()
    return student, teacher, teachers


def teacher_branch(trainee: Trainee, state: capturing.CaptureState, device: torch.device) -> capturing.Branch | None:
    """A stream of its own for the frozen teachers' forward when the step is replayed as a CUDA
    graph (:data:`TEACHER_STREAM` not "serial", and no capture with the branch has failed in this
    run): in the graph the teachers' forward and the student's step are then parallel branches.
    Same kernels, same numbers; only their order on the GPU changes."""
    if not state.graphs or (trainee.teacher is None and not trainee.teachers):
        return None
    if state.teacher_stream is None:
        state.teacher_stream = TEACHER_STREAM
    return capturing.Branch(device) if state.teacher_stream != "serial" else None


def _copy_outputs(into: Outputs, out: Outputs) -> None:
    into.logits.copy_(out.logits)
    for name, t in into.feats.items():
        t.copy_(out.feats[name])


def _clone_outputs(out: Outputs) -> Outputs:
    return Outputs(out.logits.clone(), {name: t.clone() for name, t in out.feats.items()})


class TeacherAhead:
    """The frozen teachers' outputs one batch ahead (:data:`TEACHER_STREAM` "ahead"): a step
    starts the teachers' forward of the *next* batch on the branch and trains on this batch's,
    computed during the previous step, so in the step's graph the teachers run beside the whole
    student step (forward, loss, backward, optimizer), not only beside its forward. At its end the
    step joins the branch and copies those outputs into the buffers the next step reads.

    The teachers are frozen and in eval mode, and each batch's outputs come from the same kernels
    on the same batch as when computed in its own step: the numbers are the same. The first batch
    of an epoch is computed before its step, eagerly; the last step of an epoch computes its own
    batch again, for nothing (one teacher forward per epoch: the graph's inputs keep their shape).
    Memory: the teachers' outputs twice more (logits and taps of one batch)."""

    def __init__(self, nets: list[Callable[[torch.Tensor], Outputs]], branch: capturing.Branch,
                 device: torch.device, precision: str, has_teacher: bool = True):
        self.nets = list(nets)  # the teacher (when ``has_teacher``) first, then the extra teachers
        self.has_teacher = has_teacher
        self.branch, self.device, self.precision = branch, device, precision
        self.current: list[Outputs] | None = None  # buffers: the outputs of the step's batch
        self.upcoming: torch.Tensor | None = None  # buffer: the next batch (what the branch reads)
        self.computed: list[Outputs] | None = None  # the branch's outputs, until the step's end
        self.ready_for: torch.Tensor | None = None  # the batch whose outputs ``current`` will hold

    def before(self, x: torch.Tensor, x_next: torch.Tensor | None) -> None:
        """Before a step on ``x`` (or its replay), on the host's stream: ``x``'s outputs computed
        now unless the previous step computed them, and the next batch into the branch's input."""
        if self.ready_for is not x:
            with torch.no_grad(), precision_autocast(self.device, self.precision, False):
                outs = [net(x) for net in self.nets]
            if self.current is None:
                self.current = [_clone_outputs(out) for out in outs]
            else:
                for into, out in zip(self.current, outs):
                    _copy_outputs(into, out)
        upcoming = x if x_next is None else x_next
        if self.upcoming is None:
            self.upcoming = upcoming.clone()
        else:
            self.upcoming.copy_(upcoming)
        self.ready_for = x_next

    def forget(self) -> None:
        """The next step computes its batch's outputs first (a step that failed half-way)."""
        self.ready_for = None

    def launch(self) -> None:
        """In the step: the next batch's outputs, on the branch."""
        with self.branch.fork(), torch.no_grad():
            self.computed = [net(self.upcoming) for net in self.nets]

    def outputs(self) -> tuple[Outputs | None, list[Outputs] | None]:
        """This batch's outputs: the teacher's and the extra teachers'."""
        first = 1 if self.has_teacher else 0
        return (self.current[0] if self.has_teacher else None), (self.current[first:] or None)

    def land(self) -> None:
        """At the step's end: the branch joined, its outputs where the next step reads them."""
        self.branch.join()
        for into, out in zip(self.current, self.computed):
            _copy_outputs(into, out)
        self.computed = None


class _AtPrecision(nn.Module):
    """A network as a method's loss re-runs it (``Step.student_net``/``teacher_net``): under the
    run's autocast, its outputs cast to float32 — the loss itself runs with autocast off."""

    def __init__(self, net: nn.Module, device: torch.device, precision: str, cache: bool = True):
        super().__init__()
        self.net, self.device, self.precision, self.cache = net, device, precision, cache

    def forward(self, x):
        with precision_autocast(self.device, self.precision, self.cache):
            out = self.net(x)
        return float32_outputs(out) if isinstance(out, Outputs) else out.float()


def _batch_loss(trainee: Trainee, stage: Stage, epoch: int, epochs: int, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor | None, device: torch.device | None = None,
                precision: str = "fp32", cache: bool = True, branch: capturing.Branch | None = None,
                ahead: TeacherAhead | None = None,
                ramps: capturing.Ramps | None = None) -> tuple[Outputs, dict[str, torch.Tensor], torch.Tensor]:
    """One batch through the networks (under ``precision``'s autocast; the teachers on ``branch``)
    and the stage's loss (in float32, autocast off; its warm-up factors from ``ramps``): the
    student's outputs, the named loss terms and their sum."""
    device = device if device is not None else x.device
    with precision_autocast(device, precision, cache):
        student, teacher, teachers = _forward(trainee, x, branch, ahead)
    student_net, teacher_net = trainee.student, trainee.teacher
    if precision == "bf16":  # cast at the one boundary; a no-op for float32 tensors
        student, teacher = float32_outputs(student), float32_outputs(teacher)
        teachers = [float32_outputs(t) for t in teachers] if teachers is not None else None
        student_net = _AtPrecision(trainee.student, device, precision, cache)
        teacher_net = _AtPrecision(trainee.teacher, device, precision, cache) if trainee.teacher is not None else None
    step = capturing.step_class()(
        x=x, y=y, student=student, teacher=teacher, hp=trainee.hp, modules=trainee.modules,
        epoch=epoch, epochs=epochs, stage=stage.name, index=index,
        student_net=student_net, teacher_net=teacher_net, teachers=teachers, ramps=ramps,
    )
    with loss_region(device, precision):
        terms = stage.loss(step)
    return student, terms, functools.reduce(operator.add, list(terms.values()))


class EpochTotals:
    """One epoch's loss terms (weighted by batch size) and correct predictions, summed on the
    device; read once, at the end of the epoch. A stage keeps one and :meth:`reset` s it each
    epoch: a step captured as a CUDA graph adds into the same buffers on every replay
    (:meth:`accumulate`, captured with the step), the host counts the samples (:meth:`count`)."""

    def __init__(self, device: torch.device):
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0

    @property
    def ready(self) -> bool:
        """The buffers exist, so :meth:`accumulate` allocates nothing (it may then be captured)."""
        return self.sums is not None

    def accumulate(self, terms: dict[str, torch.Tensor], logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch on the device (no host read, nothing counted on the host)."""
        batch_terms = torch.stack([v.detach().float() for v in terms.values()])
        if self.sums is None:
            self.names, self.sums = list(terms), batch_terms * len(y)
        else:
            self.sums.add_(batch_terms, alpha=len(y))
        self.correct.add_((logits.detach().argmax(1) == y).sum())

    def count(self, n: int) -> None:
        self.seen += n

    def reset(self) -> None:
        """Zero the buffers in place (a captured step keeps their addresses)."""
        if self.sums is not None:
            self.sums.zero_()
        self.correct.zero_()
        self.seen = 0

    def means(self) -> list[float]:
        """Each term's mean over the epoch's samples: the epoch's one host sync."""
        return (self.sums / max(self.seen, 1)).tolist()

    def metrics(self, means: list[float], lr: float, start: float) -> dict[str, float]:
        """``loss_NAME`` per term, ``loss``, ``train_top1``, ``lr``, ``epoch_seconds``."""
        out = {f"loss_{n}": v for n, v in zip(self.names, means)}
        out["loss"] = sum(means)
        out["train_top1"] = self.correct.item() / max(self.seen, 1)
        out["lr"] = lr
        out["epoch_seconds"] = time.perf_counter() - start
        return out


def check_finite(names: list[str], means: list[float], stage: Stage, epoch: int) -> None:
    if not all(math.isfinite(v) for v in means):
        detail = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, means))
        raise NonFiniteLoss(
            f"loss became non-finite in stage {stage.name!r} epoch {epoch + 1} ({detail}); "
            "lower the lr or the method's weights"
        )


def prepare_device(device: torch.device) -> None:
    """Before training on ``device``: on CUDA, cuDNN autotuning (batches have fixed shapes, so
    it picks its fastest convolution algorithms once)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def run_capture_state(trainee: Trainee, device: torch.device) -> capturing.CaptureState:
    """The run's capture state (made by its first stage; the networks compiled once)."""
    if trainee.capture_state is None:
        trainee.capture_state = capturing.start(trainee.capture, device, trainee.capturable, trainee.method_name)
        capturing.compile_networks(trainee.capture_state, [trainee.student.model],
                                   frozen=[t.model for t in trainee.frozen])
        hold_teacher_weights(trainee, trainee.capture_state, resolve_precision(trainee.precision, device))
    return trainee.capture_state


def hold_teacher_weights(trainee: Trainee, state: capturing.CaptureState, precision: str) -> None:
    """The frozen teachers' convolution and linear weights held in bf16 (:data:`TEACHER_WEIGHTS`)
    for a bf16 run whose steps are replayed as CUDA graphs, where a cast per layer is a kernel
    replayed at every step; eager steps (launch-bound on the host) keep autocast's casts."""
    if not (trainee.frozen and state.graphs and precision == "bf16" and TEACHER_WEIGHTS == "bf16"):
        return
    for tapped in trainee.frozen:
        if tapped.weights is None:  # a lockstep group's teacher is held once, for all its members
            tapped.use_weights(bf16_weights(tapped.model))
    state.teacher_weights = "bf16"


def weight_uses(loss: torch.Tensor, weights: list[torch.Tensor]) -> list[int]:
    """How many times ``loss``'s autograd graph uses each of ``weights`` (leaves): the edges into
    each one's gradient accumulator. A network compiled as one autograd function counts once,
    however often it uses a weight inside."""
    counts = {id(w): 0 for w in weights}
    if loss.grad_fn is None:
        return [0] * len(weights)
    seen, stack = {loss.grad_fn}, [loss.grad_fn]
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None:
                continue
            variable = getattr(node, "variable", None)  # an AccumulateGrad node's leaf
            if variable is not None and id(variable) in counts:
                counts[id(variable)] += 1
            if node not in seen:
                seen.add(node)
                stack.append(node)
    return [counts[id(w)] for w in weights]


class HeldStudent:
    """The student's convolution and linear weights held in bf16 in a bf16 run's captured steps
    (:data:`STUDENT_WEIGHTS`), uncompiled (``graphs``: under ``compile+graphs`` the switch from the
    first step's float32 weights to the copies would compile the student a second time). The
    step's forward runs bf16 copies of them (``Tapped.use_weights``) where autocast would cast each
    float32 weight at every call, and cast its gradient back in the backward; after the backward
    one multi-tensor copy turns the copies' gradients into the float32 weights' (exact: bf16 to
    float32), the optimizer steps the float32 weights as before, and a second one refreshes the
    copies from them (the rounding autocast's cast makes). Two kernels in place of two per weight,
    the same numbers bitwise.

    Only the weights for which that holds are held: the stage's first step runs as before, and its
    autograd graph says how often the step uses each weight (:func:`weight_uses`). A weight used
    twice — a method re-running the student in its loss (``Step.student_net``), a layer called
    twice, a weight shared by two layers, a loss reaching it directly — keeps autocast's casts: its
    gradients would add up in bf16 on the copy, where autocast adds them in float32. A held weight
    that a later step reaches directly keeps that gradient, the copy's added to it. The copies are
    in place only during the step's forward and loss: evaluation, and its graphs (which read the
    weights where they live, and outlive the stage), run the float32 weights."""

    def __init__(self, student: Tapped, state: capturing.CaptureState):
        self.student, self.state = student, state
        weights = cast_weights(student.model)
        self.names, self.masters = list(weights), list(weights.values())
        self.copies: list[torch.Tensor] | None = None
        self.decided = False

    def begin(self) -> None:
        """Before the step's forward: the copies in place, their gradients set to None."""
        if self.copies is not None:
            for copy in self.copies:
                copy.grad = None
            self.student.use_weights(dict(zip(self.names, self.copies)))

    def end(self) -> None:
        """After the step's loss (whether it succeeded or not): the float32 weights in place again."""
        self.student.use_weights(None)

    def count(self, loss: torch.Tensor) -> None:
        """Before the stage's first backward: the weights to hold, those its graph uses at most once."""
        if self.decided:
            return
        self.decided = True
        once = [(name, master) for (name, master), uses in
                zip(zip(self.names, self.masters), weight_uses(loss, self.masters)) if uses <= 1]
        total = len(self.masters)
        self.names, self.masters = [name for name, _ in once], [master for _, master in once]
        if self.masters:  # the run's tag: "bf16", or how many of them where some are used twice
            self.state.student_weights = "bf16" if len(once) == total else f"bf16 ({len(once)} of {total})"

    def gradients(self) -> None:
        """After the backward: the copies' gradients onto the float32 weights."""
        if self.copies is None:
            return
        fresh = []
        for master, copy in zip(self.masters, self.copies):
            if copy.grad is None:  # not reached: no gradient, as under autocast
                continue
            if master.grad is None:
                fresh.append((master, copy))
            else:  # reached directly too
                master.grad.add_(copy.grad)
        grads = [torch.empty_like(master) for master, _ in fresh]
        if grads:
            torch._foreach_copy_(grads, [copy.grad for _, copy in fresh])
        for (master, _), grad in zip(fresh, grads):
            master.grad = grad

    def after_step(self) -> None:
        """After the optimizer step: the copies refreshed (after the stage's first step: made)."""
        if self.copies is None and self.decided and self.masters:
            with torch.no_grad():
                self.copies = [m.detach().to(torch.bfloat16).requires_grad_(m.requires_grad) for m in self.masters]
            return
        self.refresh()

    def refresh(self) -> None:
        """The copies from the float32 weights."""
        if self.copies is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.copies, self.masters)


class BatchCounters:
    """The student's BatchNorm batch counters advanced by one multi-tensor add per step in an
    uncompiled captured step (:data:`BATCH_COUNTERS`), where PyTorch's BatchNorm adds 1 to each
    layer's ``num_batches_tracked`` in its training forward: a kernel per layer and step. During the
    step's forward and loss each counter is set aside (None: the layer then skips its add and, with
    a momentum, never reads the count), and ``torch._foreach_add_`` adds 1 to all of them after.

    Only layers that use PyTorch's own BatchNorm forward, track running statistics with a momentum,
    and that the stage's first step (run as before, its layers' training calls counted by forward
    hooks) calls once in training mode: a layer a step calls twice (a method re-running the
    student) counts each call, as before."""

    def __init__(self, net: nn.Module):
        base = nn.modules.batchnorm._BatchNorm
        self.layers = [m for m in net.modules() if isinstance(m, base) and type(m).forward is base.forward
                       and m.momentum is not None and m.track_running_stats
                       and isinstance(m.num_batches_tracked, torch.Tensor)]
        self.counters: list[torch.Tensor] | None = None  # the layers' counters, once decided
        self.calls: dict[nn.Module, int] = {}  # training calls per layer in the stage's first step
        self.hooks: list = []
        self.aside = False  # the counters are set aside for the step under way

    def begin(self) -> None:
        """Before the step's forward: the counters set aside (the first step: its calls counted)."""
        if self.counters is None:
            self.calls = dict.fromkeys(self.layers, 0)
            self.hooks = [m.register_forward_pre_hook(self._count) for m in self.layers]
            return
        for layer in self.layers:
            layer.num_batches_tracked = None
        self.aside = True

    def _count(self, layer: nn.Module, _args) -> None:
        if layer.training:
            self.calls[layer] += 1

    def end(self) -> None:
        """After the step's loss (whether it succeeded or not): the counters back in their layers
        (after the first step: the layers it called once in training mode are the ones managed)."""
        if self.counters is None:
            for hook in self.hooks:
                hook.remove()
            self.hooks = []
            self.layers = [m for m in self.layers if self.calls[m] == 1]
            self.counters = [m.num_batches_tracked for m in self.layers]
            return
        for layer, counter in zip(self.layers, self.counters):
            layer.num_batches_tracked = counter

    def advance(self) -> None:
        """After a step's loss that set the counters aside: 1 added to each, in one kernel."""
        if self.aside:
            self.aside = False
            if self.counters:
                torch._foreach_add_(self.counters, 1)


class StageStep:
    """One training step of a stage — eager, or replayed as a CUDA graph (``--capture graphs``) —
    that adds the batch's loss terms and accuracy to the epoch's totals (inside the graph when
    the step is one). A step that fails while it is being compiled or captured makes the run fall
    back to eager (:class:`capturing.CaptureState`)."""

    def __init__(self, trainee: Trainee, stage: Stage, epochs: int, opt: torch.optim.Optimizer,
                 device: torch.device, precision: str, state: capturing.CaptureState, teacher_beside: bool = True):
        self.trainee, self.stage, self.epochs, self.opt = trainee, stage, epochs, opt
        self.device, self.precision, self.state = device, precision, state
        self.totals: EpochTotals | None = None  # the epoch's, set by __call__
        self.ramps = capturing.Ramps(device)  # the loss's warm-up factors, set by begin_epoch
        self.graphed = capturing.GraphedSteps(self.counted, device) if state.graphs else None
        # the teachers' forward beside the student's (False: a lockstep group's graph runs its teacher
        # and hands its members the branch it ran on), one batch ahead by default
        self.branch = teacher_branch(trainee, state, device) if teacher_beside else None
        # the student's weights held in bf16 (HeldStudent), its BatchNorm counters advanced at once
        # (BatchCounters): uncompiled graphs of a stage that trains it
        self.held = self.counters = None
        if state.graphs and not state.compiles and stage.train_student:
            if precision == "bf16" and STUDENT_WEIGHTS == "bf16":
                self.held = HeldStudent(trainee.student, state)
            if BATCH_COUNTERS == "foreach":
                self.counters = BatchCounters(trainee.student.model)
        self.ahead = None
        if self.branch is not None and state.teacher_stream == "ahead":
            self.ahead = TeacherAhead(trainee.frozen, self.branch, device, precision,
                                      has_teacher=trainee.teacher is not None)

    def eager(self, epoch: int, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None):
        """Forward, loss, backward and optimizer step; the student's logits and the loss terms.

        The gradients are set to None, not zeroed, on every path: the backward then writes each
        parameter's gradient as a new tensor instead of adding it into a zeroed one — in a captured
        step, into the graph's private memory pool at its capture, the same buffers at every replay,
        with no zeroing kernels and no accumulation kernel per parameter (PyTorch's whole-network
        capture pattern); and a parameter the step's loss does not reach is skipped by the
        optimizer, as eagerly, instead of taking a momentum and weight-decay step on a zero gradient."""
        graphs = self.graphed is not None
        ahead = self.ahead if graphs else None
        held = self.held if graphs else None
        counters = self.counters if graphs else None
        for part in (held, counters):
            if part is not None:
                part.begin()
        try:
            student, terms, loss = _batch_loss(self.trainee, self.stage, epoch, self.epochs, x, y, index,
                                               self.device, self.precision, cache=not graphs,
                                               branch=self.branch if graphs else None, ahead=ahead,
                                               ramps=self.ramps)
        finally:
            for part in (held, counters):
                if part is not None:
                    part.end()
        if counters is not None:
            counters.advance()
        if held is not None:
            held.count(loss)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if held is not None:
            held.gradients()
        self.opt.step()
        if held is not None:
            held.after_step()
        if ahead is not None:
            ahead.land()
        return student.logits, terms

    def begin_epoch(self, epoch: int) -> None:
        """Before the epoch's first step: its warm-up factors (outside any graph)."""
        self.ramps.set_epoch(epoch)

    def counted(self, epoch: int, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None):
        """:meth:`eager`, then the batch added to the totals on the device (what is captured)."""
        logits, terms = self.eager(epoch, x, y, index)
        self.totals.accumulate(terms, logits, y)
        return logits, terms

    def __call__(self, epoch: int, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None,
                 totals: EpochTotals, x_next: torch.Tensor | None = None) -> None:
        """One step on ``x``; ``x_next``, the next batch of the epoch (None after the last), is
        where the teachers run ahead (:class:`TeacherAhead`)."""
        self.totals = totals
        try:
            if self.ahead is not None and self.graphed is not None:
                self.ahead.before(x, x_next)
            if self.graphed is not None and totals.ready:
                self.graphed(epoch, x, y, index)
            else:  # eager, or the totals' buffers not made yet (a capture must not allocate them)
                self.counted(epoch, x, y, index)
        except KdbenchError:
            raise
        except Exception as exc:
            if self.state.used == "none":
                raise
            # compiling or capturing failed: the same batch again, eagerly (a failed capture ran
            # nothing). A capture with the teachers on their branch is tried again with them in the
            # step's stream before anything else is given up; then compile+graphs → graphs (the rest
            # of the stage captured afresh, uncompiled) → eager.
            if self.branch is not None and self.graphed is not None and self.graphed.capture_failed:
                self.state.serial_teacher(capturing.failure_reason(exc))
                self.branch = self.ahead = None
            else:
                self.state.fall_back(capturing.failure_reason(exc))
            self.graphed = capturing.GraphedSteps(self.counted, self.device) if self.state.graphs else None
            if self.held is not None:  # in step with the float32 weights, whatever the failed step did
                self.held.refresh()
            if self.ahead is not None and self.graphed is not None:  # the failed step may have landed
                self.ahead.forget()
                self.ahead.before(x, x_next)
            self.counted(epoch, x, y, index)
        totals.count(len(y))


def with_next(batches: Iterator[tuple]) -> Iterator[tuple[tuple, torch.Tensor | None]]:
    """Each batch with the next one's input (None after the last): drawn one batch earlier, from
    the same generator in the same order, so the batches are the same."""
    batches = iter(batches)
    current = next(batches, None)
    for following in batches:
        yield current, following[0]
        current = following
    if current is not None:
        yield current, None


def train_stage(
    trainee: Trainee,
    stage: Stage,
    epochs: int,
    recipe: Recipe,
    train: DeviceSplit,
    generator: torch.Generator,
    augment: Augment,
    device: torch.device,
    after_epoch: Callable[[int, dict], None],
    scheduled: bool,
) -> float:
    """Run one stage; returns its training seconds. ``after_epoch(epoch0, metrics)`` is called
    with the epoch's mean loss terms and training accuracy (one host read per epoch)."""
    precision = resolve_precision(trainee.precision, device)
    prepare_device(device)
    state = run_capture_state(trainee, device)
    graphs = state.graphs
    opt = stage_optimizer(trainee, stage, recipe, device if graphs else None)
    total_seconds = 0.0
    trainee.student.train()
    if trainee.modules is not None:
        trainee.modules.train()
    step = StageStep(trainee, stage, epochs, opt, device, precision, state)
    totals = EpochTotals(device)
    for epoch in range(epochs):
        lr = lr_at(recipe, epoch) if scheduled else stage.lr_for(trainee.hp, recipe.lr)
        capturing.set_lr(opt, lr)
        step.begin_epoch(epoch)
        start = time.perf_counter()
        totals.reset()
        for (x, y, index), x_next in with_next(train.shuffled(recipe.batch_size, generator, augment)):
            step(epoch, x, y, index, totals, x_next)
        means = totals.means()
        epoch_metrics = totals.metrics(means, lr, start)
        check_finite(totals.names, means, stage, epoch)
        total_seconds += epoch_metrics["epoch_seconds"]
        after_epoch(epoch, epoch_metrics)
    return total_seconds


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory: CUDA allocator peak on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def _snapshot(net: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# --------------------------------------------------------------------------- one training run


@dataclass
class FitJob:
    """What :func:`fit` trains: who, with which loss and recipe, on which data."""

    trainee: Trainee
    role: str  # "teacher" | "student": EpochLog.role
    main_loss: LossFn  # the main stage's loss
    recipe: Recipe
    splits: dict[str, DeviceSplit]  # "train" and "val"
    augment: Augment  # training augmentation (the dataset's)
    seed: int  # of the generator that shuffles and augments
    pre_stages: list[tuple[Stage, int]] = field(default_factory=list)  # (stage, epochs), run first in order
    #: loads the test split; when given, the end of the run is tested (never during tuning)
    load_test: Callable[[], DeviceSplit] | None = None


class Validation:
    """The main stage's after-epoch step: validates the student (and the peers), keeps the curve,
    the cumulative seconds and the best-on-validation weights, and reports the epoch."""

    def __init__(self, job: FitJob, device: torch.device, on_epoch: OnEpoch, pre_seconds: float):
        self.job, self.device, self.on_epoch, self.pre_seconds = job, device, on_epoch, pre_seconds
        self.result = FitResult()
        self.best_top1, self.best_epoch, self.best_state = -1.0, 0, None
        self.graphs: capturing.GraphedEval | None = None  # made at the first evaluation of a graphed run

    def evaluate(self, net: nn.Module, split: DeviceSplit) -> dict:
        """Accuracy of ``net`` on ``split``; replayed as CUDA graphs when the run's steps are."""
        state = self.job.trainee.capture_state
        if self.graphs is None and state is not None and state.graphs:
            self.graphs = capturing.GraphedEval(self.device)
        graphs = self.graphs if state is not None and state.graphs else None
        return evaluate(net, split, self.job.recipe.eval_batch_size, self.device, self.job.trainee.precision, graphs)

    def __call__(self, epoch: int, epoch_metrics: dict) -> None:
        result, student = self.result, self.job.trainee.student
        result.seconds.append((result.seconds[-1] if result.seconds else self.pre_seconds) + epoch_metrics["epoch_seconds"])
        val = self.evaluate(student, self.job.splits["val"])
        result.curve.append(val["top1"])
        if val["top1"] > self.best_top1:
            self.best_top1, self.best_epoch, self.best_state = val["top1"], epoch + 1, _snapshot(student.model)
        logged = {**epoch_metrics, "val_top1": val["top1"], "val_top5": val["top5"]}
        self._add_peers(logged, val["top1"])
        self.on_epoch(EpochLog(self.job.role, "main", epoch + 1, self.job.recipe.epochs, logged))

    def _add_peers(self, logged: dict, student_top1: float) -> None:
        peers = self.job.trainee.peers
        if not peers:
            return
        logged["peer0_val_top1"] = student_top1
        for i, peer in enumerate(peers, 1):
            logged[f"peer{i}_val_top1"] = self.evaluate(peer, self.job.splits["val"])["top1"]
        self.result.peer_val = {k: v for k, v in logged.items() if k.startswith("peer")}


def stream(seed: int, device: torch.device, *name) -> torch.Generator:
    """The generator of one random stream of a run (batch order and augmentation draws).

    The main stage draws from ``stream(seed, device)``, seeded with the run's seed itself (so a
    teacher, or a method without pre-stages, draws what it always drew); pre-stage ``i`` from
    ``stream(seed, device, "pre-stage", i)``. Separate streams are what makes the numbers common
    (issue 17): every method of one seed sees the same main-stage batches and augmentations,
    however many batches its pre-stages drew."""
    if not name:
        return torch.Generator(device=device).manual_seed(seed)
    digest = hashlib.sha256(json.dumps([seed, *name]).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def fit(job: FitJob, device: torch.device, on_epoch: OnEpoch) -> FitResult:
    """Pre-stages, then the main stage with per-epoch validation; test at the end (last epoch
    and best-on-validation weights) when ``job.load_test`` is given."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pre_seconds = run_pre_stages(job, device, on_epoch)
    validation = Validation(job, device, on_epoch, pre_seconds)
    main = Stage("main", job.recipe.epochs, job.main_loss, train_student=True)
    train_stage(job.trainee, main, job.recipe.epochs, job.recipe, job.splits["train"], stream(job.seed, device),
                job.augment, device, validation, scheduled=True)
    return finish_fit(job, validation, device)


def finish_fit(job: FitJob, validation: Validation, device: torch.device) -> FitResult:
    """The result of a trained run: summary, test (when asked), peers, peak memory, capture tags."""
    result = validation.result
    result.metrics.update(_summary(job, validation))
    if job.load_test is not None:
        result.metrics.update(_test(job, validation))
    else:
        result.state_dict = _snapshot(job.trainee.student.model)
    result.metrics.update(result.peer_val)  # last epoch's validation accuracy of each peer
    result.metrics["peak_mem_mb"] = peak_memory_mb(device)[0]
    if job.trainee.teacher_fusion is not None:
        result.tags["teacher_fusion"] = job.trainee.teacher_fusion
    state = job.trainee.capture_state
    if state is not None:
        capturing.check_compiled(state)
        result.tags.update(state.tags())
        capturing.uncompile(state.compiled)  # the networks outlive the run (a cached teacher): eager again
        state.compiled = []
    return result


def run_pre_stages(job: FitJob, device: torch.device, on_epoch: OnEpoch) -> float:
    """Train the pre-stages in order, at the recipe's base lr, each from its own random stream
    (:func:`stream`); returns their training seconds."""
    seconds = 0.0
    for i, (stage, epochs) in enumerate(job.pre_stages):
        log = _pre_stage_log(job.role, stage, epochs, on_epoch)
        seconds += train_stage(job.trainee, stage, epochs, job.recipe, job.splits["train"],
                               stream(job.seed, device, "pre-stage", i), job.augment, device, log, scheduled=False)
    return seconds


def _pre_stage_log(role: str, stage: Stage, epochs: int, on_epoch: OnEpoch) -> Callable[[int, dict], None]:
    """A pre-stage's after-epoch step: report the epoch, its metrics named ``stage/metric``."""
    def log(epoch: int, epoch_metrics: dict) -> None:
        named = {f"{stage.name}/{k}": v for k, v in epoch_metrics.items()}
        on_epoch(EpochLog(role, stage.name, epoch + 1, epochs, named))

    return log


def _summary(job: FitJob, validation: Validation) -> dict[str, float]:
    """Time, throughput, final and best validation accuracy, and convergence of a finished run."""
    train, recipe, result = job.splits["train"], job.recipe, validation.result
    per_epoch = len(train) - len(train) % recipe.batch_size if len(train) > recipe.batch_size else len(train)
    out = {"train_seconds": result.seconds[-1]}
    out["throughput"] = per_epoch * (recipe.epochs + sum(e for _, e in job.pre_stages)) / max(out["train_seconds"], 1e-9)
    out["final_val_top1"] = result.curve[-1]
    out["best_val_top1"] = validation.best_top1
    out["best_val_epoch"] = validation.best_epoch
    out.update(metrics.convergence(result.curve, result.seconds))
    return out


def _test(job: FitJob, validation: Validation) -> dict[str, float]:
    """Test accuracy of the last weights, of the best-on-validation ones and of each peer; the
    student keeps (and the result records) its last weights."""
    student, result = job.trainee.student, validation.result
    test = job.load_test()
    last = validation.evaluate(student, test)
    out = {"test_top1": last["top1"], "test_top5": last["top5"]}
    result.state_dict = _snapshot(student.model)
    result.best_state_dict = validation.best_state
    student.model.load_state_dict(validation.best_state)
    at_best = validation.evaluate(student, test)
    out["test_top1_bestval"], out["test_top5_bestval"] = at_best["top1"], at_best["top5"]
    student.model.load_state_dict(result.state_dict)
    if job.trainee.peers:
        out["peer0_test_top1"] = out["test_top1"]
        for i, peer in enumerate(job.trainee.peers, 1):
            out[f"peer{i}_test_top1"] = validation.evaluate(peer, test)["top1"]
    return out


# --------------------------------------------------------------------------- teacher and student


def load_splits(dataset: Dataset, device: torch.device, options: dict, names=("train", "val")) -> dict:
    return {name: load_split(dataset, name, device, options) for name in names}


def _test_loader(plan, device: torch.device) -> Callable[[], DeviceSplit]:
    return lambda: load_split(plan.dataset_obj, "test", device, plan.config.data_options)


def run_teacher(plan, device: torch.device, on_epoch: OnEpoch) -> tuple[nn.Module, FitResult]:
    """Train the plan's teacher with the teacher recipe (plain cross-entropy)."""
    dataset = plan.dataset_obj
    seed = plan.config.teacher_seed
    net = build_model(plan.teacher_obj, dataset, device, seed)
    job = FitJob(
        trainee=Trainee(student=Tapped(net, {}, [], "teacher"), teacher=None, modules=None, hp=SimpleNamespace(),
                        precision=plan.config.precision, capture=capturing.resolve(plan.config.capture, device)),
        role="teacher",
        main_loss=cross_entropy,
        recipe=plan.teacher_recipe,
        splits=load_splits(dataset, device, plan.config.data_options),
        augment=dataset.augment,
        seed=seed,
        load_test=_test_loader(plan, device),
    )
    result = fit(job, device, on_epoch)
    net.eval().requires_grad_(False)
    return net, result


def build_teacher(plan, device: torch.device) -> nn.Module:
    """An untrained teacher network of the plan (to load a checkpoint or a cached state into)."""
    return build_model(plan.teacher_obj, plan.dataset_obj, device, plan.config.teacher_seed)


def _tap_shapes(tapped: Tapped, input_shape, device) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the taps ``tapped`` reads (one forward pass in eval mode)."""
    was = tapped.training
    tapped.eval()
    with torch.no_grad():
        out = tapped(torch.zeros((2, *input_shape), device=device))
    tapped.train(was)
    return {k: tuple(v.shape[1:]) for k, v in out.feats.items()}


@dataclass
class _TappedNetworks:
    """The run's networks with the method's taps attached, and the taps each model offers."""

    student: Tapped
    teacher: Tapped | None
    extra: list[Tapped]  # the extra teachers
    student_taps: list[str]
    teacher_taps: list[str] | None  # None: no teacher


def _tap_networks(plan, hp: SimpleNamespace, student_net: nn.Module, teacher_net: nn.Module | None,
                  extra_nets) -> _TappedNetworks:
    """Attach the taps the method reads; the teachers are frozen (eval mode, no gradients)."""
    method: Method = plan.method_obj
    student_taps = plan.student_obj.taps_of(student_net)
    teacher_taps = plan.teacher_obj.taps_of(teacher_net) if teacher_net is not None else None
    try:
        student_wanted, teacher_wanted = wanted_taps(
            method, hp, list(student_taps), list(teacher_taps) if teacher_taps is not None else None
        )
    except KdbenchError as exc:
        raise KdbenchError(f"method {method.name!r} cannot use this pair: {exc}") from None
    student = Tapped(student_net, student_taps, student_wanted, f"student {plan.student_obj.name!r}")
    teacher = None
    if teacher_net is not None:
        teacher_net.eval().requires_grad_(False)
        teacher = Tapped(teacher_net, teacher_taps, teacher_wanted, f"teacher {plan.teacher_obj.name!r}").eval()
    extra = [_tap_extra_teacher(method, hp, entry.obj, net, list(student_taps))
             for entry, net in zip(plan.extra_teachers, extra_nets)]
    return _TappedNetworks(student, teacher, extra, list(student_taps),
                           list(teacher_taps) if teacher_taps is not None else None)


def _tap_extra_teacher(method: Method, hp: SimpleNamespace, model: Model, net: nn.Module,
                       student_taps: list[str]) -> Tapped:
    net.eval().requires_grad_(False)
    taps = model.taps_of(net)
    try:
        _, wanted = wanted_taps(method, hp, student_taps, list(taps))
    except KdbenchError as exc:
        raise KdbenchError(f"method {method.name!r} cannot use teacher {model.name!r}: {exc}") from None
    return Tapped(net, taps, wanted, f"teacher {model.name!r}").eval()


def _probe(plan, hp: SimpleNamespace, networks: _TappedNetworks, device: torch.device, num_train: int) -> Probe:
    """What the method's ``check``/``build`` see: tap shapes, classes, a maker of new students."""
    dataset: Dataset = plan.dataset_obj
    seeds = iter(range(plan.config.seed + 1, plan.config.seed + 1_000_000))  # each new student differs
    return Probe(
        hp=hp,
        num_classes=dataset.num_classes,
        input_shape=tuple(dataset.input_shape),
        student_shapes=_tap_shapes(networks.student, dataset.input_shape, device),
        teacher_shapes=_tap_shapes(networks.teacher, dataset.input_shape, device) if networks.teacher is not None else {},
        student_taps=networks.student_taps,
        teacher_taps=networks.teacher_taps or [],
        new_student=lambda: build_model(plan.student_obj, dataset, device, next(seeds)),
        num_train=num_train,
        num_teachers=(networks.teacher is not None) + len(networks.extra),
    )


def _method_train_split(method: Method, probe: Probe, teacher_net: nn.Module | None, device: torch.device) -> DeviceSplit:
    """The training split a method supplies itself (``Method.train_data``); ``probe.num_train`` follows."""
    x, y = method.train_data(probe, teacher_net, device)
    probe.num_train = len(y)
    return DeviceSplit(x.detach().to(device), y.to(device).long(), None, None)


def _pre_stages(method: Method, hp: SimpleNamespace) -> list[tuple[Stage, int]]:
    """The method's stages with their epochs (an int, or the hyperparameter it names); 0 skips one."""
    out = []
    for stage in method.stages(hp) if method.stages is not None else []:
        epochs = getattr(hp, stage.epochs) if isinstance(stage.epochs, str) else stage.epochs
        if epochs > 0:
            out.append((stage, int(epochs)))
    return out


def _cost_info(student_net: nn.Module, teacher_nets: list[nn.Module], modules: nn.Module | None,
               dataset: Dataset, device: torch.device, own_data: bool, extra_teachers: bool) -> dict[str, float]:
    """Parameters and FLOPs of the networks (all teachers summed), and whether train was loaded."""
    info = {
        "params_student": metrics.count_params(student_net),
        "params_teacher": sum(metrics.count_params(n) for n in teacher_nets),  # all teachers
        "params_extra": metrics.count_params(modules),
        "flops_student": metrics.flops_per_sample(student_net, dataset.input_shape, device),
        "train_split_loaded": 0 if own_data else 1,
    }
    if teacher_nets:
        info["flops_teacher"] = sum(metrics.flops_per_sample(n, dataset.input_shape, device) for n in teacher_nets)
    if extra_teachers:
        info["num_teachers"] = len(teacher_nets)
    return info


@dataclass
class StudentSetup:
    trainee: Trainee
    pre_stages: list[tuple[Stage, int]]
    info: dict[str, float]
    splits: dict[str, DeviceSplit]


def setup_student(plan, teacher_net: nn.Module | None, device: torch.device,
                  extra_teachers: list[nn.Module] | tuple = ()) -> StudentSetup:
    """Build the student, tap both networks, probe shapes, check the pair, build the method's
    modules, and count parameters and FLOPs — everything that can fail before training.

    ``extra_teachers`` are the networks of ``plan.extra_teachers`` (tapped like the teacher). A
    method with ``train_data`` supplies the training inputs itself: the dataset's train split is
    then never loaded (``train_split_loaded`` = 0)."""
    method: Method = plan.method_obj
    dataset: Dataset = plan.dataset_obj
    capturing.check_capture(plan.config.capture, device)  # e.g. graphs off CUDA: fail before any work
    hp = SimpleNamespace(**plan.hp)
    own_data = method.train_data is not None
    splits = load_splits(dataset, device, plan.config.data_options, ("val",) if own_data else ("train", "val"))
    student_net = build_model(plan.student_obj, dataset, device, plan.config.seed)
    networks = _tap_networks(plan, hp, student_net, teacher_net, extra_teachers)
    fusion = None
    if networks.teacher is not None:
        fusion = fuse_teacher(networks.teacher, plan.teacher_obj, dataset.input_shape, device,
                              resolve_precision(plan.config.precision, device))
    probe = _probe(plan, hp, networks, device, num_train=0 if own_data else len(splits["train"]))
    if method.check is not None:
        method.check(probe)
    if own_data:
        splits["train"] = _method_train_split(method, probe, teacher_net, device)
    modules = method.build(probe) if method.build is not None else None
    if modules is not None:
        modules = modules.to(device)
    pre_stages = _pre_stages(method, hp)
    peers = list(method.peers(modules)) if method.peers is not None and modules is not None else []
    teacher_nets = ([teacher_net] if teacher_net is not None else []) + list(extra_teachers)
    info = _cost_info(student_net, teacher_nets, modules, dataset, device, own_data, bool(networks.extra))
    trainee = Trainee(student=networks.student, teacher=networks.teacher, modules=modules, hp=hp,
                      teachers=networks.extra, peers=peers, precision=plan.config.precision,
                      capture=capturing.resolve(plan.config.capture, device), capturable=getattr(method, "capturable", True),
                      method_name=method.name, teacher_fusion=fusion)
    return StudentSetup(trainee, pre_stages, info, splits)


def fuse_teacher(tapped: Tapped, model: Model, input_shape, device: torch.device, precision: str) -> str | None:
    """Give a frozen teacher its model's inference form (``Model.fuse``, :data:`TEACHER_FUSION`) for
    its forward passes without gradients (:meth:`Tapped.use_inference`): a fused copy, checked on a
    batch against the original — logits and every tap the run reads within
    :data:`FUSION_TOLERANCE` — before it is used. Returns the run tag's value: "fused", or why the
    teacher runs unfused (a tap the fused form does not keep, a failed check: one line then); None
    when fusion does not apply (no ``fuse``, another device or precision)."""
    if model.fuse is None or TEACHER_FUSION == "off" or (
            TEACHER_FUSION == "cuda" and (device.type != "cuda" or precision != "bf16")):
        return None
    try:
        fused_net = model.fuse(tapped.copy_model().eval(), torch.bfloat16 if precision == "bf16" else torch.float32)
    except Exception as exc:  # a plugin's fuse: its failure costs the speed, not the run
        return _unfused(tapped, f"its model's fuse failed: {capturing.failure_reason(exc)}")
    if fused_net is None:
        return None
    kept = dict(fused_net.named_modules())
    dropped = [name for name in tapped.wanted if tapped.taps[name].module not in kept]
    if dropped:  # expected (e.g. a tap inside a fused block): a tag, no line
        return f"unfused: the method reads tap {dropped[0]!r}, which the fused teacher does not keep"
    fused = Tapped(fused_net.requires_grad_(False), tapped.taps, tapped.wanted, tapped.owner)
    problem = fusion_mismatch(tapped, fused, input_shape, device, precision)
    if problem:
        fused.remove()
        return _unfused(tapped, problem)
    tapped.use_inference(fused)
    return "fused"


def _unfused(tapped: Tapped, problem: str) -> str:
    """One line for a fusion that should have worked and did not; the tag's value."""
    capturing.log.warning("kdbench: %s runs unfused: %s", tapped.owner, problem)
    return f"unfused: {problem}"


@torch.no_grad()
def fusion_mismatch(tapped: Tapped, fused: Tapped, input_shape, device: torch.device, precision: str) -> str:
    """What differs between a teacher and its fused form (``Model.fuse``) on a batch of 8 random
    inputs — logits and ``tapped.wanted`` — ("": nothing beyond :data:`FUSION_TOLERANCE`); a fused
    form that fails to run differs too. Also the conformance kit's check of a model's ``fuse``."""
    x = torch.randn(8, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    x = model_layout(x)
    try:
        with precision_autocast(device, precision, False):
            a, b = tapped(x), fused(x)
    except (RuntimeError, ValueError, TypeError) as exc:
        return f"its fused form failed: {capturing.failure_reason(exc)}"
    tol = FUSION_TOLERANCE[precision]
    for name, u, v in [("logits", a.logits, b.logits), *((n, a.feats[n], b.feats[n]) for n in tapped.wanted)]:
        u, v = u.float(), v.float()
        if u.shape != v.shape:
            return f"its fused form's {name} has shape {tuple(v.shape)}, not {tuple(u.shape)}"
        off = ((u - v).abs().max() / u.abs().max().clamp_min(1e-12)).item()
        if not off <= tol:
            return f"its fused form's {name} is {off:.3g} off the original's (relative to the largest value; at most {tol} allowed)"
    return ""


def run_student(plan, setup: StudentSetup, device: torch.device, on_epoch: OnEpoch, with_test: bool = True) -> FitResult:
    """Train the student of ``setup`` with the plan's method; test only when ``with_test``."""
    result = fit(student_job(plan, setup, device, with_test), device, on_epoch)
    result.metrics.update(setup.info)
    return result


def student_job(plan, setup: StudentSetup, device: torch.device, with_test: bool = True) -> FitJob:
    """What :func:`fit` trains for the student of ``setup`` (also a lockstep group's member)."""
    return FitJob(
        trainee=setup.trainee,
        role="student",
        main_loss=plan.method_obj.loss,
        recipe=plan.recipe,
        splits=setup.splits,
        augment=plan.dataset_obj.augment,
        seed=plan.config.seed,
        pre_stages=setup.pre_stages,
        load_test=_test_loader(plan, device) if with_test else None,
    )
