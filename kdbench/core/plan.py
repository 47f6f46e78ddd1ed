"""A run's configuration (what the user asked for) and its plan (resolved against the plugins)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

from kdbench import API_VERSION
from kdbench.contracts import Dataset, Method, Model, Probe, Recipe, Stage, resolve_hparams
from kdbench.errors import KdbenchError
from kdbench.core.plugins import Entry, Registry

#: Bump when the way teachers are trained changes: cached teachers are then retrained.
TEACHER_RECIPE_VERSION = 1


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

    def for_teacher(self, entry: Entry) -> "Plan":
        """This plan with ``entry`` as its (only) teacher: how an extra teacher is obtained and
        cached exactly like the main one (no checkpoint: that file is the main teacher's)."""
        config = replace(self.config, teacher=entry.obj.name, teacher_checkpoint=None, teachers=())
        teacher_recipe = teacher_recipe_of(self.dataset_obj, entry.obj.name)
        return replace(self, config=config, teacher=entry, extra_teachers=(), teacher_recipe=teacher_recipe)

    def teacher_key(self) -> str:
        """Cache key of the trained teacher: dataset, model, recipe, seed, recipe version."""
        return _digest(
            {
                "dataset": [self.dataset_obj.name, self.dataset_obj.version],
                "data_options": self.config.data_options,
                "model": [self.teacher_obj.name, dict(self.teacher_obj.kwargs)],
                "recipe": self.teacher_recipe.as_dict(),
                "seed": self.config.teacher_seed,
                "teacher_recipe_version": TEACHER_RECIPE_VERSION,
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
            }
        )

    def params(self) -> dict[str, Any]:
        """Flat parameters for tracking: method hyperparameters and the recipe."""
        out = {f"hp.{k}": v for k, v in self.hp.items()}
        out.update({f"recipe.{k}": v for k, v in self.recipe.as_dict().items()})
        out.update({f"data.{k}": v for k, v in self.config.data_options.items()})
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
    method = resolve_method(config.method, reg)
    dataset = reg.entry("datasets", config.dataset or default_dataset(reg))
    if dataset.obj.resolve is not None:
        dataset = replace(dataset, obj=resolve_dataset(dataset.obj, config.data_options))
    ds: Dataset = dataset.obj
    student_name = config.student or ds.default_student
    if not student_name:
        raise KdbenchError(f"dataset {ds.name!r} names no default student; pass --student")
    student = reg.entry("models", student_name)
    teacher = None
    if method.obj.needs_teacher:
        teacher_name = config.teacher or ds.default_teacher
        if not teacher_name:
            raise KdbenchError(f"dataset {ds.name!r} names no default teacher; pass --teacher")
        teacher = reg.entry("models", teacher_name)
    extra = tuple(reg.entry("models", name) for name in config.teachers)
    if extra and not method.obj.uses_teachers:
        raise KdbenchError(f"method {method.obj.name!r} uses one teacher; --teachers is for methods that "
                           "read several (e.g. multi_teacher)")
    hp = resolve_hparams(method.obj.hparams, config.hparams, f"method {method.obj.name!r}")
    base = ds.recipe
    if config.recipe_name:
        from kdbench.recipes import load_recipe

        base = load_recipe(config.recipe_name)
    # a recipe's per-model lr (e.g. 0.01 for MobileNetV2/ShuffleNet) applies to the network it trains
    recipe = base.for_model(student.obj.name).with_(**config.recipe)
    # student overrides and --recipe never touch the teacher: it is trained with the dataset's own
    teacher_recipe = teacher_recipe_of(ds, teacher.obj.name if teacher else "")
    if recipe.epochs < 1:
        raise KdbenchError(f"epochs must be at least 1, got {recipe.epochs}")
    return Plan(config, method, dataset, teacher, student, hp, recipe, teacher_recipe, extra)


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


# --------------------------------------------------------------------------- combined methods


def resolve_method(name: str, reg: Registry) -> Entry:
    """A registered method, or ``a+b[+c…]``: a combined method built on the fly (see
    :func:`combine_methods`)."""
    if "+" not in name:
        return reg.entry("methods", name)
    parts = [p.strip() for p in name.split("+")]
    if any(not p for p in parts) or len(set(parts)) != len(parts):
        raise KdbenchError(f"method {name!r}: combine distinct methods as a+b (e.g. at+kd)")
    entries = [reg.entry("methods", p) for p in parts]
    combined = combine_methods([e.obj for e in entries])
    dists = "+".join(dict.fromkeys(e.dist for e in entries))
    versions = "+".join(dict.fromkeys(e.version for e in entries))
    return Entry(combined, "+".join(e.plugin for e in entries), dists, versions)


def _sub_hp(hp: SimpleNamespace, prefix: str) -> SimpleNamespace:
    n = len(prefix)
    return SimpleNamespace(**{k[n:]: v for k, v in vars(hp).items() if k.startswith(prefix)})


def _sub_wanted(m: Method, hp, s_taps: list[str], t_taps: list[str] | None) -> tuple[list[str], list[str]]:
    from kdbench.core.taps import expand  # same rules as the engine's

    if callable(m.taps):
        names = list(m.taps(hp, s_taps, t_taps))
        return names, (names if t_taps is not None else [])
    return expand(m.taps, s_taps), (expand(m.taps, t_taps) if t_taps is not None else [])


class _Combined:
    """Helpers of one combined method (plain object: the Method itself stays a frozen dataclass)."""

    def __init__(self, methods: list[Method]):
        self.methods = methods
        self.prefix = {m.name: m.name + "." for m in methods}

    def sub_probe(self, m: Method, probe: Probe) -> Probe:
        hp = _sub_hp(probe.hp, self.prefix[m.name])
        t_taps = probe.teacher_taps if probe.teacher_shapes else None
        s_names, t_names = _sub_wanted(m, hp, probe.student_taps, t_taps)
        return replace(
            probe, hp=hp,
            student_shapes={k: v for k, v in probe.student_shapes.items() if k in s_names},
            teacher_shapes={k: v for k, v in probe.teacher_shapes.items() if k in t_names},
        )

    def taps(self, hp, s_taps, t_taps):
        out: list[str] = []
        for m in self.methods:
            s_names, t_names = _sub_wanted(m, _sub_hp(hp, self.prefix[m.name]), s_taps, t_taps)
            out += [n for n in s_names if n not in out and (t_taps is None or n in t_names)]
        return out

    def check(self, probe: Probe) -> None:
        for m in self.methods:
            if m.check is not None:
                m.check(self.sub_probe(m, probe))

    def build(self, probe: Probe):
        from torch import nn

        mods = nn.ModuleDict()
        wanted = {}
        for m in self.methods:
            sub = self.sub_probe(m, probe)
            wanted[m.name] = (set(sub.student_shapes), set(sub.teacher_shapes))
            built = m.build(sub) if m.build is not None else None
            if built is not None:
                mods[m.name] = built
        mods.kdbench_wanted = wanted  # each part's own taps, to give its loss only those
        return mods

    def sub_step(self, m: Method, step):
        hp = _sub_hp(step.hp, self.prefix[m.name])
        wanted = getattr(step.modules, "kdbench_wanted", None)
        student, teacher, teachers = step.student, step.teacher, step.teachers
        s_w, t_w = wanted[m.name] if wanted is not None else (None, None)
        keep = lambda feats, names: {k: v for k, v in feats.items() if names is None or k in names}  # noqa: E731
        # teachers are frozen: their outputs reach each part detached, whatever the part does
        frozen = lambda o: replace(o, logits=o.logits.detach(),  # noqa: E731
                                   feats={k: v.detach() for k, v in keep(o.feats, t_w).items()})
        student = replace(student, feats=keep(student.feats, s_w))
        teacher = frozen(teacher) if teacher is not None else None
        teachers = [frozen(o) for o in teachers] if teachers is not None else None
        modules = step.modules[m.name] if step.modules is not None and m.name in step.modules else None
        return replace(step, hp=hp, student=student, teacher=teacher, teachers=teachers, modules=modules)

    def loss(self, step):
        terms: dict = {}
        for i, m in enumerate(self.methods):
            for key, value in m.loss(self.sub_step(m, step)).items():
                if key == "ce" and i > 0:
                    continue  # cross-entropy on the labels is counted once: the first part's
                terms[key if key not in terms else f"{m.name}.{key}"] = value
        return terms

    def stages(self, hp):
        out = []
        for m in self.methods:
            for st in (m.stages(_sub_hp(hp, self.prefix[m.name])) if m.stages is not None else []):
                epochs = self.prefix[m.name] + st.epochs if isinstance(st.epochs, str) else st.epochs
                out.append(Stage(f"{m.name}.{st.name}", epochs, self._stage_loss(m, st), st.train_student))
        return out

    def _stage_loss(self, m: Method, st: Stage):
        def loss(step):
            return st.loss(replace(self.sub_step(m, step), stage=st.name))
        return loss

    def peers(self, modules):
        out = []
        for m in self.methods:
            if m.peers is not None and m.name in modules:
                out += list(m.peers(modules[m.name]))
        return out

    def train_data(self, probe, teacher_net, device):
        (m,) = [m for m in self.methods if m.train_data is not None]
        return m.train_data(self.sub_probe(m, probe), teacher_net, device)


def combine_methods(methods: list[Method]) -> Method:
    """``a+b``: both methods' terms on one student.

    Hyperparameters are namespaced by method (``at.beta``, ``kd.alpha``); taps are the union (each
    part's loss sees only its own); ``check`` runs both; the extra modules live in a ModuleDict
    keyed by method name; pre-stages are both's, in order (named ``a.stage``). The loss is the
    union of the terms with cross-entropy counted once: the first part's ``"ce"`` is kept and the
    later parts' ``"ce"`` dropped (so in ``at+kd`` CE has at's weight and KD is ``kd.alpha``·KD);
    another clashing term name is prefixed with its method's name.
    """
    if sum(m.train_data is not None for m in methods) > 1:
        raise KdbenchError("at most one part of a combined method may supply its own training data")
    c = _Combined(methods)
    hparams = tuple(replace(h, name=c.prefix[m.name] + h.name) for m in methods for h in m.hparams)
    any_callable = any(callable(m.taps) for m in methods)
    taps = c.taps if any_callable else tuple(dict.fromkeys(t for m in methods for t in m.taps))
    return Method(
        name="+".join(m.name for m in methods),
        loss=c.loss,
        description=" + ".join(m.description for m in methods),
        citation="; ".join(m.citation for m in methods if m.citation),
        hparams=hparams,
        taps=taps,
        build=c.build,
        check=c.check,
        stages=c.stages if any(m.stages is not None for m in methods) else None,
        needs_teacher=any(m.needs_teacher for m in methods),
        uses_teachers=any(m.uses_teachers for m in methods),
        peers=c.peers if any(m.peers is not None for m in methods) else None,
        train_data=c.train_data if any(m.train_data is not None for m in methods) else None,
    )
