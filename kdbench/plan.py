"""A run's configuration (what the user asked for) and its plan (resolved against the plugins)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from . import API_VERSION
from .contracts import Dataset, Method, Model, Recipe, resolve_hparams
from .errors import KdbenchError
from .plugins import Entry, Registry

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
    method = reg.entry("methods", config.method)
    dataset = reg.entry("datasets", config.dataset or default_dataset(reg))
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
    hp = resolve_hparams(method.obj.hparams, config.hparams, f"method {method.obj.name!r}")
    recipe = ds.recipe.with_(**config.recipe)
    teacher_recipe = ds.teacher_recipe or ds.recipe  # student overrides never touch the teacher
    if recipe.epochs < 1:
        raise KdbenchError(f"epochs must be at least 1, got {recipe.epochs}")
    return Plan(config, method, dataset, teacher, student, hp, recipe, teacher_recipe)
