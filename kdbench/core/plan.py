"""A run's configuration (what the user asked for) and its plan (resolved against the plugins),
and the identities derived from a plan: the teacher's cache key and the run's config hash."""
from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field, replace
from typing import Any

from kdbench import API_VERSION
from kdbench.contracts import Dataset, Method, Model, Recipe, resolve_hparams
from kdbench.core.compose import combine_entries
from kdbench.core.plugins import Entry, Registry
from kdbench.core.precision import non_default
from kdbench.errors import KdbenchError
from kdbench.recipes import load_recipe

#: Bump when the way teachers are trained changes: cached teachers are then retrained.
TEACHER_RECIPE_VERSION = 1

#: Bump when the way students are trained changes their numbers: the config hash changes, so old
#: and new runs never count as the same cell nor mix in one table. Not part of the teacher key
#: (teachers are unchanged; their cache and runs stay valid). 2: common random numbers (issue
#: 17) — pre-stages draw from their own stream, so the main stage's batches no longer depend on
#: the method.
PROTOCOL_VERSION = 2


@dataclass(frozen=True)
class RunConfig:
    """What a user asks for; every None is filled from the dataset's defaults."""

    method: str = "kd"
    dataset: str | None = None
    teacher: str | None = None
    student: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)  # overrides, e.g. {"epochs": 2}
    seed: int = 0
    teacher_seed: int = 0
    device: str | None = None
    teacher_checkpoint: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    teachers: tuple[str, ...] = ()  # extra teachers beyond ``teacher``, for methods that use them
    recipe_name: str | None = None  # a named recipe (kdbench/recipes) or .toml path replacing the dataset's
    precision: str | None = None  # "bf16" | "fp32"; None: the device's default (kdbench.core.precision)
    capture: str | None = None  # how training steps are captured (kdbench.core.capture); never hashed


@dataclass(frozen=True)
class Plan:
    config: RunConfig
    method: Entry
    dataset: Entry
    teacher: Entry | None
    student: Entry
    hp: dict[str, Any]
    recipe: Recipe
    teacher_recipe: Recipe
    extra_teachers: tuple[Entry, ...] = ()  # RunConfig.teachers, resolved
    #: where ``hp`` came from: "defaults", a matching ``Method.defaults_for`` entry, scaled stage
    #: lengths, explicit values ("set"), joined with " + "; recorded with the run's parameters
    hp_source: str = "defaults"

    @property
    def method_obj(self) -> Method:
        return self.method.obj

    @property
    def dataset_obj(self) -> Dataset:
        return self.dataset.obj

    @property
    def student_obj(self) -> Model:
        return self.student.obj

    @property
    def teacher_obj(self) -> Model | None:
        return self.teacher.obj if self.teacher else None

    def for_teacher(self, entry: Entry) -> Plan:
        """This plan with ``entry`` as its (only) teacher: how an extra teacher is obtained and
        cached exactly like the main one (no checkpoint: that file is the main teacher's)."""
        config = replace(self.config, teacher=entry.obj.name, teacher_checkpoint=None, teachers=())
        teacher_recipe = teacher_recipe_of(self.dataset_obj, entry.obj.name)
        return replace(self, config=config, teacher=entry, extra_teachers=(), teacher_recipe=teacher_recipe)

    def _precision_key(self) -> dict:
        """``{"precision": …}`` when the run's precision is not its device's default, else empty:
        runs at the default precision keep the identities they had before it was an option."""
        other = non_default(self.config.precision, self.config.device)
        return {"precision": other} if other else {}

    def teacher_key(self) -> str:
        """Cache key of the trained teacher: dataset, model, recipe, seed, recipe version (and a
        non-default precision)."""
        return _digest(
            {
                "dataset": [self.dataset_obj.name, self.dataset_obj.version],
                "data_options": self.config.data_options,
                "model": [self.teacher_obj.name, dict(self.teacher_obj.kwargs)],
                "recipe": self.teacher_recipe.as_dict(),
                "seed": self.config.teacher_seed,
                "teacher_recipe_version": TEACHER_RECIPE_VERSION,
                **self._precision_key(),
            }
        )

    def config_hash(self, teacher_id: str | None = None) -> str:
        """Identity of the student run: same hash = same experiment (device excluded)."""
        return _digest(
            {
                "method": self.method_obj.name,
                "hp": self.hp,
                "dataset": [self.dataset_obj.name, self.dataset_obj.version],
                "data_options": self.config.data_options,
                "student": [self.student_obj.name, dict(self.student_obj.kwargs)],
                "teacher": teacher_id,
                "recipe": self.recipe.as_dict(),
                "seed": self.config.seed,
                "api": API_VERSION,
                "protocol": PROTOCOL_VERSION,
                **self._precision_key(),
            }
        )

    def params(self) -> dict[str, Any]:
        """Flat parameters for tracking: method hyperparameters and the recipe."""
        out = {f"hp.{k}": v for k, v in self.hp.items()}
        out.update({f"recipe.{k}": v for k, v in self.recipe.as_dict().items()})
        out.update({f"data.{k}": v for k, v in self.config.data_options.items()})
        out["hp_source"] = self.hp_source
        return out


def _digest(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def default_dataset(reg: Registry) -> str:
    """The first registered embedded dataset that names default models (kdbench's own load first)."""
    for name, entry in reg.datasets.items():
        if entry.obj.embedded and entry.obj.default_teacher and entry.obj.default_student:
            return name
    raise KdbenchError("no embedded dataset with default models is registered; pass --dataset")


def make_plan(config: RunConfig, reg: Registry) -> Plan:
    """Resolve names against the registry and check the hyperparameters; errors are one line."""
    non_default(config.precision, config.device)  # an unknown precision is a one-line error
    method = resolve_method(config.method, reg)
    dataset = _dataset_entry(config, reg)
    ds: Dataset = dataset.obj
    student, teacher, extra = _network_entries(config, method.obj, ds, reg)
    recipe = _student_recipe(config, ds, student.obj.name)
    hp, hp_source = plan_hparams(method.obj, config, ds.name, teacher.obj.name if teacher else "",
                                 student.obj.name, recipe)
    # student overrides and --recipe never touch the teacher: it is trained with the dataset's own
    teacher_recipe = teacher_recipe_of(ds, teacher.obj.name if teacher else "")
    if recipe.epochs < 1:
        raise KdbenchError(f"epochs must be at least 1, got {recipe.epochs}")
    return Plan(config, method, dataset, teacher, student, hp, recipe, teacher_recipe, extra, hp_source)


def plan_hparams(method: Method, config: RunConfig, dataset: str, teacher: str, student: str,
                 recipe: Recipe) -> tuple[dict[str, Any], str]:
    """The hyperparameters a run uses and where they came from: the declared defaults, replaced by
    the first matching ``Method.defaults_for`` entry, pre-stage lengths with a ``ref_epochs``
    scaled to the recipe's length, then the explicit values (never scaled, always winning)."""
    owner = f"method {method.name!r}"
    entry = method.defaults_of(dataset, teacher, student)
    sources = ["defaults"] + ([entry.label()] if entry is not None else [])
    hp = resolve_hparams(method.hparams, dict(entry.values) if entry is not None else {}, owner)
    explicit = resolve_hparams(method.hparams, config.hparams, owner)
    hp.update({key: explicit[key] for key in config.hparams})
    scaled = _scaled_stage_lengths(method, hp, recipe.epochs, set(config.hparams))
    if any(hp[k] != v for k, v in scaled.items()):
        sources.append(f"stage epochs x{recipe.epochs}/{_ref_epochs(method, hp)}")
    hp.update(scaled)
    if config.hparams:
        sources.append("set")
    return hp, " + ".join(sources)


def _ref_stages(method: Method, hp: dict[str, Any]) -> list:
    if method.stages is None:
        return []
    from types import SimpleNamespace

    return [s for s in method.stages(SimpleNamespace(**hp)) if isinstance(s.epochs, str) and s.ref_epochs > 0]


def _ref_epochs(method: Method, hp: dict[str, Any]) -> int:
    return next((s.ref_epochs for s in _ref_stages(method, hp)), 0)


def _scaled_stage_lengths(method: Method, hp: dict[str, Any], epochs: int, explicit: set[str]) -> dict[str, int]:
    """Pre-stage lengths given in epochs of a ``Stage.ref_epochs``-long run, at ``epochs`` epochs
    (at least 1 unless 0); explicitly set ones are left out."""
    out = {}
    for stage in _ref_stages(method, hp):
        value = hp[stage.epochs]
        if stage.epochs not in explicit and value > 0:
            out[stage.epochs] = max(1, round(value * epochs / stage.ref_epochs))
    return out


def _dataset_entry(config: RunConfig, reg: Registry) -> Entry:
    """The run's dataset (the default one when unnamed), made concrete for its data options."""
    dataset = reg.entry("datasets", config.dataset or default_dataset(reg))
    if dataset.obj.resolve is not None:
        dataset = replace(dataset, obj=resolve_dataset(dataset.obj, config.data_options))
    _check_load_options(dataset.obj, config.data_options)
    return dataset


def _check_load_options(ds: Dataset, options: dict) -> None:
    """``--data-dir``/``--data-option`` that the dataset's ``load`` does not take: one line, before
    anything runs (not a TypeError from inside the first split's load)."""
    if not options:
        return
    try:
        signature = inspect.signature(ds.load)
    except (TypeError, ValueError):
        return  # not introspectable (a C function): let load decide
    try:
        signature.bind("train", **options)
    except TypeError:
        taken = [p.name for p in signature.parameters.values()
                 if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
        flags = ", ".join(("--data-dir" if key == "data_dir" else f"--data-option {key}=…") for key in options)
        raise KdbenchError(
            f"dataset {ds.name!r} takes no option {', '.join(map(repr, options))} (its load takes "
            f"{', '.join(taken) or 'none'}); drop {flags}"
        ) from None


def _network_entries(config: RunConfig, method: Method, ds: Dataset,
                     reg: Registry) -> tuple[Entry, Entry | None, tuple[Entry, ...]]:
    """The student, the teacher (None when the method needs none) and the extra teachers."""
    student_name = config.student or ds.default_student
    if not student_name:
        raise KdbenchError(f"dataset {ds.name!r} names no default student; pass --student")
    student = reg.entry("models", student_name)
    teacher = None
    if method.needs_teacher:
        teacher_name = config.teacher or ds.default_teacher
        if not teacher_name:
            raise KdbenchError(f"dataset {ds.name!r} names no default teacher; pass --teacher")
        teacher = reg.entry("models", teacher_name)
    extra = tuple(reg.entry("models", name) for name in config.teachers)
    if extra and not method.uses_teachers:
        raise KdbenchError(f"method {method.name!r} uses one teacher; --teachers is for methods that "
                           "read several (e.g. multi_teacher)")
    return student, teacher, extra


def _student_recipe(config: RunConfig, ds: Dataset, student: str) -> Recipe:
    """The dataset's recipe (or the named ``--recipe``) for ``student``, with the overrides."""
    base = load_recipe(config.recipe_name) if config.recipe_name else ds.recipe
    # a recipe's per-model lr (e.g. 0.01 for MobileNetV2/ShuffleNet) applies to the network it trains
    return base.for_model(student).with_(**config.recipe)


def teacher_recipe_of(ds: Dataset, teacher: str) -> Recipe:
    """How ``teacher`` is trained: the dataset's ``teacher_recipe`` (its per-model lr applied), or
    else its student recipe without the per-model lr table, which is for students (RepDistiller
    trains every teacher at 0.05 and only MobileNetV2/ShuffleNet *students* at 0.01)."""
    if ds.teacher_recipe is not None:
        return ds.teacher_recipe.for_model(teacher)
    return replace(ds.recipe, model_lr=())


def resolve_dataset(ds: Dataset, options: dict) -> Dataset:
    """The concrete Dataset of a dataset that depends on its files (``Dataset.resolve``)."""
    try:
        concrete = ds.resolve(**options)
    except KdbenchError:
        raise
    except TypeError as exc:
        raise KdbenchError(f"dataset {ds.name!r}: bad data option ({exc})") from None
    if not isinstance(concrete, Dataset):
        raise KdbenchError(f"dataset {ds.name!r}: resolve() returned {type(concrete).__name__}, not a Dataset")
    return concrete


def resolve_method(name: str, reg: Registry) -> Entry:
    """A registered method, or ``a+b[+c…]``: a combined method built on the fly (see
    :func:`kdbench.core.compose.combine_methods`)."""
    if "+" not in name:
        return reg.entry("methods", name)
    parts = [p.strip() for p in name.split("+")]
    if any(not p for p in parts) or len(set(parts)) != len(parts):
        raise KdbenchError(f"method {name!r}: combine distinct methods as a+b (e.g. at+kd)")
    return combine_entries([reg.entry("methods", p) for p in parts])
