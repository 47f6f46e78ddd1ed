"""The public contracts: what a method, a model and a dataset are.

Plugins build these dataclasses and hand them to ``register(...)`` (see :mod:`kdbench.hookspecs`).
Every field added later gets a default, so plugins written against API version 1 keep working.

Feature taps: a model names places in its network (``Tap``), the harness reads them with forward
hooks, so a model needs no special ``forward``. Conventional tap names, which methods ask for:

* ``stem`` — output of the first conv block;
* ``stage1`` … ``stageN`` — output of each stage, shallow to deep;
* ``stage1_pre`` … — the same stage before its final activation, where the model has one;
* ``pool`` — the pooled feature vector (the classifier's input).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from kdbench.errors import KdbenchError

if TYPE_CHECKING:  # torch is imported on first use (see __getattr__): describing plugins needs none
    import torch
    from torch import nn

# --------------------------------------------------------------------------- hyperparameters


@dataclass(frozen=True)
class HParam:
    """One hyperparameter of a method.

    ``low``/``high`` bound the *valid* values (checked on ``--set``; None = unbounded, and the
    bounds are inclusive unless ``open_low``); ``space`` is the Optuna search range (``log`` for a
    log-uniform one) and ``choices`` the values of a categorical one. The type is the default's.
    A hyperparameter with ``tune=False`` is kept out of the search space.
    """

    name: str
    default: Any
    help: str = ""
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    space: tuple[float, float] | None = None
    log: bool = False
    choices: tuple | None = None
    tune: bool = True

    @property
    def kind(self) -> type:
        return type(self.default)

    def parse(self, raw: Any) -> Any:
        """Convert a value (possibly the string of ``--set key=value``) to this parameter's type."""
        kind = self.kind
        try:
            if kind is bool:
                if isinstance(raw, str):
                    low = raw.strip().lower()
                    if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(raw)
                    return low in ("1", "true", "yes", "on")
                return bool(raw)
            if kind is int:
                as_float = float(raw)
                if not as_float.is_integer():
                    raise ValueError(raw)
                return int(as_float)
            if kind is float:
                return float(raw)
            return kind(raw)
        except (TypeError, ValueError):
            raise KdbenchError(
                f"hyperparameter {self.name}={raw!r} is not a valid {kind.__name__}"
            ) from None

    def check(self, value: Any) -> Any:
        """Parse and range-check ``value``; raise a one-line :class:`KdbenchError` if it is bad."""
        value = self.parse(value)
        if self.choices is not None and value not in self.choices:
            raise KdbenchError(
                f"hyperparameter {self.name}={value!r} is not one of {list(self.choices)}"
            )
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise KdbenchError(f"hyperparameter {self.name}={value} must be finite")
            if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
                rel = ">" if self.open_low else ">="
                raise KdbenchError(f"hyperparameter {self.name}={value} must be {rel} {self.low}")
            if self.high is not None and value > self.high:
                raise KdbenchError(f"hyperparameter {self.name}={value} must be <= {self.high}")
        return value

    def suggest(self, trial, prefix: str = "") -> Any:
        """Sample a value from an Optuna trial (only for tunable parameters)."""
        name = prefix + self.name
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        lo, hi = self.space
        if self.kind is int:
            return trial.suggest_int(name, int(lo), int(hi), log=self.log)
        return trial.suggest_float(name, float(lo), float(hi), log=self.log)

    def validate_declaration(self) -> None:
        """Raise ValueError when the declaration itself is wrong (caught at plugin load)."""
        if not self.name.isidentifier():
            raise ValueError(f"hyperparameter name {self.name!r} is not an identifier")
        self.check(self.default)
        if not self.tune or self.kind in (bool, str) and self.choices is None:
            return
        if self.choices is not None:
            if not self.choices:
                raise ValueError(f"{self.name}: empty choices")
            for c in self.choices:
                self.check(c)
            return
        if self.space is None:
            raise ValueError(f"{self.name}: tunable but has no search space (space=(lo, hi))")
        lo, hi = self.space
        if not lo < hi:
            raise ValueError(f"{self.name}: search space {self.space} is empty")
        if self.log and lo <= 0:
            raise ValueError(f"{self.name}: log search space must be positive, got {self.space}")
        self.check(lo), self.check(hi)

    def describe_space(self) -> str:
        if not self.tune:
            return "fixed"
        if self.choices is not None:
            return "{" + ", ".join(map(str, self.choices)) + "}"
        if self.space is None:
            return "fixed"
        return f"[{self.space[0]}, {self.space[1]}]" + (" log" if self.log else "")


def resolve_hparams(hparams: Sequence[HParam], overrides: Mapping[str, Any], owner: str) -> dict:
    """Defaults updated with checked overrides; an unknown key is an error naming the known ones."""
    known = {h.name: h for h in hparams}
    values = {h.name: h.default for h in hparams}
    for key, raw in overrides.items():
        if key not in known:
            from kdbench.errors import closest

            names = ", ".join(known) or "none"
            raise KdbenchError(
                f"{owner} has no hyperparameter {key!r}{closest(key, known)} (it has: {names})"
            )
        values[key] = known[key].check(raw)
    return values


# --------------------------------------------------------------------------- models and taps


@dataclass(frozen=True)
class Tap:
    """A place in a network read by a forward hook: the output of ``module`` (a dotted name from
    ``named_modules()``), or its first input when ``input=True`` (e.g. the classifier's input is
    the pooled vector; a ReLU module's input is the pre-activation)."""

    module: str
    input: bool = False


@dataclass(frozen=True)
class Model:
    """A network builder and its feature taps.

    ``build(num_classes, input_shape, **kwargs)`` returns an ``nn.Module`` mapping a batch of
    inputs to logits; it raises :class:`KdbenchError` when it cannot take ``input_shape``.
    ``taps`` maps tap names to :class:`Tap` (or a dotted module name), or is a function of the
    built module returning that mapping (for models whose depth varies).

    ``fuse(net, dtype) -> nn.Module`` (optional): the network's inference form as a frozen teacher,
    given an eval-mode copy of a built network — the same function up to rounding with fewer
    kernels (e.g. :class:`kdbench.fusion.FusedConv`), fused in place or new, its weights in ``dtype``
    (the run's precision), or None when it has nothing to fuse. It keeps the module names of the
    taps it preserves; a tap whose module it removes is not read from it. On CUDA at bf16 kdbench runs it for the teacher's forward
    passes without gradients (a method's ``Step.teacher_net`` keeps the original), after checking
    its logits and the taps the run reads against the original's on a batch.
    """

    name: str
    build: Callable[..., nn.Module]
    taps: Mapping[str, Tap | str] | Callable[[nn.Module], Mapping[str, Tap | str]] = field(
        default_factory=dict
    )
    description: str = ""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    fuse: Callable[[nn.Module, Any], nn.Module] | None = None

    def make(self, num_classes: int, input_shape: Sequence[int], **kwargs) -> nn.Module:
        return self.build(num_classes, tuple(input_shape), **{**self.kwargs, **kwargs})

    def taps_of(self, module: nn.Module) -> dict[str, Tap]:
        taps = self.taps(module) if callable(self.taps) else self.taps
        return {k: v if isinstance(v, Tap) else Tap(v) for k, v in taps.items()}


@dataclass(frozen=True)
class ModelSource:
    """A family of models named ``PREFIX:NAME`` that exists outside kdbench (e.g. ``timm:resnet18``
    when timm is installed), registered with ``register(...)`` in ``register_models`` like a Model.

    ``resolve(name) -> Model`` builds the :class:`Model` for ``NAME`` on first use (raise
    :class:`KdbenchError` when the package is missing or the name unknown)."""

    prefix: str
    resolve: Callable[[str], Model]
    description: str = ""


@dataclass(frozen=True)
class Leaderboard:
    """A benchmark suite a plugin ships (``register_leaderboards``): ``kdbench bench NAME`` and
    ``kdbench leaderboard NAME`` then find it by ``name``. ``path`` is the suite's TOML file (e.g.
    ``importlib.resources.files(__package__) / "leaderboards" / "mine.toml"`` installed as package
    data); its format is that of ``leaderboards/*.toml`` (see the README's Leaderboards section)."""

    name: str
    path: Any  # str | os.PathLike: where the TOML file is
    description: str = ""


# --------------------------------------------------------------------------- datasets and recipes


@dataclass(frozen=True)
class Augment:
    """Training augmentation, run batched on the device (no per-sample Python).

    ``crop_pad``: pad each spatial side with zeros by this many pixels, then crop back to the
    original size at a random offset per sample (1-D: a random shift). ``flip``: mirror the last
    axis with probability ½. Both act on the raw values, before scaling and normalisation (as
    torchvision's ``RandomCrop(padding=…)`` on the image: a uint8 image is padded with black).
    ``noise``: add Gaussian noise of this std after normalisation.
    """

    crop_pad: int = 0
    flip: bool = False
    noise: float = 0.0


@dataclass(frozen=True)
class Recipe:
    """How a network is trained: data, not code. Part of every run's config hash."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"  # sgd | adam | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "multistep"  # multistep | cosine | constant
    milestones: tuple[int, ...] = ()  # epochs at which lr *= gamma (multistep)
    gamma: float = 0.1
    eval_batch_size: int = 1024
    #: ``((model, lr), …)``: a learning rate per network that replaces ``lr`` (the reference trains
    #: MobileNetV2/ShuffleNet students with a lower one); applied by :meth:`for_model` when a plan
    #: is made (to the student; to a teacher only from a dataset's own ``teacher_recipe``).
    model_lr: tuple[tuple[str, float], ...] = ()

    def for_model(self, name: str) -> Recipe:
        """The recipe that trains network ``name``: its ``model_lr`` entry (if any) replaces
        ``lr``, and the table is dropped (what is recorded is the lr actually used)."""
        table = dict(self.model_lr)
        return replace(self, lr=float(table.get(name, self.lr)), model_lr=())

    def with_(self, **changes) -> Recipe:
        """A copy with ``changes``; ``epochs`` rescales multistep milestones proportionally."""
        if "epochs" in changes and "milestones" not in changes and self.milestones:
            scale = changes["epochs"] / self.epochs
            changes["milestones"] = tuple(max(1, round(m * scale)) for m in self.milestones)
        known = {f.name for f in fields(self)}
        bad = set(changes) - known
        if bad:
            raise KdbenchError(f"recipe has no field {sorted(bad)} (it has: {', '.join(sorted(known))})")
        return replace(self, **changes)

    def as_dict(self) -> dict:
        out = asdict(self)
        if not out["model_lr"]:
            del out["model_lr"]  # a recipe without the table hashes as it did before it existed
        return out


@dataclass(frozen=True)
class Dataset:
    """A classification dataset.

    ``load(split, **options)`` returns ``(x, y)`` tensors for ``split`` in ``"train"``, ``"val"``,
    ``"test"``: x is ``[N, *input_shape]`` (uint8 images are scaled by 1/255 on the device), y
    int64 labels; or a ``torch.utils.data.Dataset`` of ``(x, y)`` samples for data too large for
    the device, which is then streamed by a DataLoader with workers (same batched augmentation).
    A source without a validation split carves one from train with a fixed seed
    (see :func:`kdbench.data.carve_validation`); ``"train"`` then excludes it. Splits are loaded
    lazily and one at a time, so a run that never needs a split never reads it.
    ``mean``/``std`` (per channel) normalise on the device. ``recipe`` trains students,
    ``teacher_recipe`` (default: ``recipe``) teachers. ``version`` is part of the teacher-cache
    key: bump it when the data changes. The default dataset of ``kdbench run`` is the first
    registered ``embedded`` one that names a default teacher and student.
    """

    name: str
    load: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    num_classes: int
    input_shape: tuple[int, ...]
    recipe: Recipe
    teacher_recipe: Recipe | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    augment: Augment = Augment()
    default_teacher: str | None = None
    default_student: str | None = None
    description: str = ""
    version: str = "1"
    embedded: bool = False  # needs no files: ships with, or is generated offline by, a package
    #: ``download(data_dir, base_url=None)`` fetches and verifies the files ``load`` reads
    #: (``kdbench data download NAME``); ``base_url`` replaces the official host (a mirror).
    download: Callable[..., Any] | None = None
    #: ``resolve(**data_options) -> Dataset``: for a dataset whose classes or input shape depend
    #: on its files (a user's image folder), the concrete Dataset for these options; called when
    #: a run is planned, before anything is loaded. Raise :class:`KdbenchError` when unusable.
    resolve: Callable[..., Dataset] | None = None


# --------------------------------------------------------------------------- methods


@dataclass
class Outputs:
    """A network's outputs for one batch.

    * ``logits``: ``[B, num_classes]``.
    * ``feats``: the feature taps the method asked for (``Method.taps``), by tap name, each
      ``[B, *shape]`` as the tapped module produced it.
    """

    logits: torch.Tensor
    feats: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Step:
    """What a method's loss sees for one training batch.

    * ``x``, ``y``: the batch as the networks get it (normalised, augmented) and its labels.
    * ``student``: the student's :class:`Outputs` (with the graph: the loss trains through it).
    * ``teacher``: the frozen teacher's :class:`Outputs` (no graph); None without a teacher.
    * ``hp``: the method's hyperparameters, by name (``step.hp.T``).
    * ``modules``: what the method's ``build`` returned (trained with the student), or None.
    * ``epoch``: 0-based, within the current stage; ``epochs``: that stage's epoch count. A
      captured step (``--capture graphs``) that reads ``epoch`` is captured again at each epoch;
      one that does not is captured once per stage. A warm-up factor is :meth:`ramp`, which does
      not read it.
    * ``stage``: the current stage's name (``"main"``, or a pre-stage's :attr:`Stage.name`).
    * ``index``: the batch's sample indices in the training split (e.g. for a memory bank).
    * ``student_net``: the student as ``x -> Outputs`` (same taps), for methods that re-run it.
    * ``teacher_net``: the frozen teacher as ``x -> Outputs``; None without a teacher.
    * ``teachers``: the :class:`Outputs` of the run's extra teachers (``RunConfig.teachers``),
      same taps as ``teacher``; None when the run has none (the main teacher stays ``teacher``).
    * ``ramps``: where :meth:`ramp` gets its values in a run (the engine's); None elsewhere.
    """

    x: torch.Tensor
    y: torch.Tensor
    student: Outputs
    teacher: Outputs | None
    hp: SimpleNamespace
    modules: nn.Module | None
    epoch: int
    epochs: int
    stage: str
    index: torch.Tensor | None = None
    student_net: nn.Module | None = None
    teacher_net: nn.Module | None = None
    teachers: list[Outputs] | None = None
    ramps: Any = None

    def ramp(self, length: float) -> torch.Tensor | float:
        """The warm-up factor ``min((epoch + 1) / length, 1)`` (1 when ``length`` ≤ 0): a linear
        ramp over the stage's first ``length`` epochs, counted from 1 as mdistiller counts them.

        In a run it is a float32 scalar on the device that the engine sets at the start of each
        epoch, so a captured step that reads it is captured once per stage (one that reads
        ``epoch`` is captured again at each epoch); outside a run (``ramps`` None: a step made by
        hand or by :func:`kdbench.testing.make_step`) it is a float."""
        if self.ramps is None:
            return ramp_value(self.epoch, length)
        return self.ramps.get(length)


def ramp_value(epoch: int, length: float) -> float:
    """:meth:`Step.ramp`'s value at the 0-based ``epoch``."""
    return 1.0 if length <= 0 else min((epoch + 1) / length, 1.0)


@dataclass
class Probe:
    """What a method's ``build``/``check`` (and ``train_data``) see before training.

    * ``hp``: the method's hyperparameters, by name.
    * ``num_classes``, ``input_shape``: the dataset's (``input_shape`` per sample, no batch axis).
    * ``student_shapes``, ``teacher_shapes``: per-sample shapes (no batch axis) of the taps the
      method asked for, by tap name; ``teacher_shapes`` is empty without a teacher.
    * ``student_taps``, ``teacher_taps``: every tap each model offers (asked for or not).
    * ``new_student()``: a freshly initialised student network (each call a new seed), e.g. for
      the peers of mutual learning.
    * ``num_train``: samples in the training split (e.g. to size a memory bank).
    * ``num_teachers``: frozen teachers of the run, the main one plus the extra ones.
    """

    hp: SimpleNamespace
    num_classes: int
    input_shape: tuple[int, ...]
    student_shapes: dict[str, tuple[int, ...]]
    teacher_shapes: dict[str, tuple[int, ...]]
    student_taps: list[str]
    teacher_taps: list[str]
    new_student: Callable[[], nn.Module]
    num_train: int = 0
    num_teachers: int = 0


def __getattr__(name: str):
    """``torch``, ``nn`` and ``LossFn`` (which names ``torch.Tensor``), imported on first use so that
    importing the contracts (every plugin does, and ``kdbench list``) does not load torch (≈1 s)."""
    if name not in ("torch", "nn", "LossFn"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch

    globals().update(torch=torch, nn=torch.nn, LossFn=Callable[[Step], Mapping[str, torch.Tensor]])
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), "torch", "nn", "LossFn"})


@dataclass(frozen=True)
class Stage:
    """A training stage run before the main one (e.g. FitNets' hint stage).

    Runs ``epochs`` epochs (an int, or the name of an int hyperparameter) with ``loss``; the
    student's parameters are optimised when ``train_student`` (else only the method's modules).
    ``ref_epochs`` (0: off): the hyperparameter named by ``epochs`` counts epochs of a main stage
    ``ref_epochs`` long (e.g. RepDistiller's 30 init epochs of 240), so when a run is planned its
    default (or per-run default, :class:`Defaults`) is scaled to the recipe's length,
    ``max(1, round(value·epochs/ref_epochs))`` (0 stays 0); a value set explicitly is used as is.
    ``lr``: the stage's constant learning rate — a number, or the name of a float hyperparameter
    (whose value 0 means "the recipe's"); None: the recipe's base lr (see :meth:`lr_for`).
    """

    name: str
    epochs: int | str
    loss: LossFn
    train_student: bool = True
    ref_epochs: int = 0
    lr: float | str | None = None

    def lr_for(self, hp: SimpleNamespace, base_lr: float) -> float:
        """The stage's learning rate given the run's hyperparameters and the recipe's base lr."""
        lr = getattr(hp, self.lr) if isinstance(self.lr, str) else self.lr
        return float(lr) if lr else base_lr


@dataclass(frozen=True)
class Defaults:
    """Hyperparameter defaults for the runs of one dataset/teacher/student (``Method.defaults_for``).

    ``dataset``, ``teacher``, ``student`` are fnmatch patterns (``"*"`` matches anything; a run
    without a teacher has teacher ``""``); ``values`` replace the method's declared defaults in a
    matching run; ``source`` says where they come from (e.g. the reference config file) and is
    recorded with the run (``hp_source``). Values set explicitly (``--set``) always win.
    """

    values: Mapping[str, Any]
    dataset: str = "*"
    teacher: str = "*"
    student: str = "*"
    source: str = ""

    def matches(self, dataset: str, teacher: str, student: str) -> bool:
        from fnmatch import fnmatchcase

        return (fnmatchcase(dataset, self.dataset) and fnmatchcase(teacher, self.teacher)
                and fnmatchcase(student, self.student))

    def label(self) -> str:
        return self.source or f"{self.dataset}/{self.teacher}/{self.student}"


@dataclass(frozen=True)
class Method:
    """A distillation method (``vanilla`` — no distillation — is one too).

    * ``loss(step) -> {"ce": …, "kd": …}``: named, already weighted terms; their sum is minimised.
    * ``hparams``: declared hyperparameters with defaults and search space.
    * ``taps``: tap names needed on both networks (fnmatch patterns such as ``"stage?"`` allowed),
      or a function ``(hp, student_taps, teacher_taps) -> names``.
    * ``build(probe) -> nn.Module | None``: extra trainable modules (connectors, …) built from the
      probed tap shapes; their parameters are trained with the student and counted.
    * ``check(probe)``: raise :class:`KdbenchError` when this teacher/student pair cannot be served.
    * ``stages(hp) -> [Stage, …]``: stages run before the main one.
    * ``needs_teacher``: False for methods that train without a frozen teacher.
    * ``uses_teachers``: True for methods that read the extra teachers (``Step.teachers``); a run
      with ``--teachers`` and a method that would ignore them is refused.
    * ``peers(modules) -> [nn.Module, …]``: extra networks (x → logits) among the method's
      modules that are evaluated like the student and reported as ``peer1_*``, ``peer2_*`` …
      (the student is ``peer0``), e.g. the peers of mutual learning.
    * ``train_data(probe, teacher_net, device) -> (x, y)``: the method's own training inputs (in
      the network's input space: already normalised) replacing the dataset's train split, which
      is then never loaded for the student (data-free distillation); ``y`` are the labels the
      batches carry (the engine reports training accuracy against them).
    * ``defaults_for``: :class:`Defaults` replacing the declared defaults for matching
      dataset/teacher/student triples (per-pair or per-dataset reference values); the first
      matching entry applies, explicit ``--set`` values win over it, and the run records which one
      applied (``hp_source``). Default ``()``: the declared defaults everywhere (API version 1).
    """

    name: str
    loss: LossFn
    description: str = ""
    citation: str = ""
    hparams: tuple[HParam, ...] = ()
    taps: Sequence[str] | Callable[[SimpleNamespace, list[str], list[str]], Sequence[str]] = ()
    build: Callable[[Probe], nn.Module | None] | None = None
    check: Callable[[Probe], None] | None = None
    stages: Callable[[SimpleNamespace], Sequence[Stage]] | None = None
    needs_teacher: bool = True
    uses_teachers: bool = False
    peers: Callable[[nn.Module], Sequence[nn.Module]] | None = None
    train_data: Callable[[Probe, nn.Module | None, torch.device], tuple[torch.Tensor, torch.Tensor]] | None = None
    defaults_for: tuple[Defaults, ...] = ()
    #: False: the training step cannot be captured as a CUDA graph or compiled (host-side
    #: sampling, data-dependent shapes, host reads in the loss); ``--capture`` then runs it eagerly
    capturable: bool = True

    def defaults_of(self, dataset: str, teacher: str, student: str) -> Defaults | None:
        """The first :attr:`defaults_for` entry matching the triple, or None."""
        return next((d for d in self.defaults_for if d.matches(dataset, teacher, student)), None)

    def hparam_defaults(self) -> dict:
        return {h.name: h.default for h in self.hparams}

    def search_space(self) -> list[HParam]:
        return [h for h in self.hparams if h.tune and (h.space is not None or h.choices is not None)]

    def validate_declaration(self) -> None:
        """Raise ValueError when the method is declared wrongly (checked at plugin load)."""
        if not callable(self.loss):
            raise ValueError(f"method {self.name!r}: loss is not callable")
        names = [h.name for h in self.hparams]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name!r}: duplicate hyperparameter names {names}")
        for h in self.hparams:
            try:
                h.validate_declaration()
            except (ValueError, KdbenchError) as exc:
                raise ValueError(f"method {self.name!r}: {exc}") from None
        for entry in self.defaults_for:
            try:
                resolve_hparams(self.hparams, entry.values, f"method {self.name!r} defaults_for {entry.label()}")
            except KdbenchError as exc:
                raise ValueError(str(exc)) from None
