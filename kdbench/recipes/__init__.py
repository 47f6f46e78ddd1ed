"""Training recipes as data: ``NAME.toml`` files in this folder, read with tomllib.

Each file has a ``description``, a ``[recipe]`` table whose keys are :class:`kdbench.contracts.Recipe`
fields, and optionally a ``[student_lr]`` table: a learning rate per model name that replaces the
recipe's for that student (the reference trains MobileNetV2/ShuffleNet students at 0.01, every
teacher at 0.05). The table travels in the
Recipe (``model_lr``) and is applied when a run is planned (:meth:`Recipe.for_model`), so
``kdbench run --dataset cifar100 --student mobilenetv2`` trains at 0.01 like the reference.

``kdbench run --recipe NAME`` (or a path to a ``.toml`` of the same form) replaces the dataset's
recipe for the student.
"""
from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from kdbench.contracts import Recipe
from kdbench.errors import KdbenchError, closest

HERE = Path(__file__).parent
#: what kdbench.core.engine builds (tests/core/test_engine.py ties the two together)
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("multistep", "cosine", "constant")
#: field -> (kind, lowest value, whether the lowest value itself is allowed); kind: int | float | bool | str
FIELD_RULES: dict[str, tuple[str, float | None, bool]] = {
    "epochs": ("int", 1, True), "batch_size": ("int", 1, True), "eval_batch_size": ("int", 1, True),
    "lr": ("float", 0.0, False), "momentum": ("float", 0.0, True), "weight_decay": ("float", 0.0, True),
    "gamma": ("float", 0.0, False), "nesterov": ("bool", None, True),
    "optimizer": ("str", None, True), "schedule": ("str", None, True),
}
CHOICES = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES}


def names() -> list[str]:
    """The recipes shipped here."""
    return sorted(p.stem for p in HERE.glob("*.toml"))


def read(name: str) -> dict:
    """The parsed toml of recipe ``name`` (a name, or a path to a .toml file)."""
    path = Path(name) if name.endswith(".toml") else HERE / f"{name}.toml"
    if not path.is_file():
        if name.endswith(".toml"):
            raise KdbenchError(f"recipe file {name!r} does not exist")
        raise KdbenchError(f"unknown recipe {name!r}{closest(name, names())} (known: {', '.join(names())})")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise KdbenchError(f"recipe file {path} is not valid TOML: {exc}; fix the file") from None
    except UnicodeDecodeError:
        raise KdbenchError(f"recipe file {path} is not a text (UTF-8) TOML file; "
                           "pass a recipe .toml file") from None


def field_problem(key: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the Recipe field ``key`` ('lr must be a number > 0, got
    'fast''), or None when it is fine. Unknown keys are not judged here (see :func:`check_fields`)."""
    if key == "milestones":
        if not isinstance(value, (list, tuple)) or not all(is_int(m) and m >= 0 for m in value):
            return f"milestones must be a list of whole numbers >= 0 (epochs), got {value!r}"
        return None
    if key not in FIELD_RULES:
        return None
    kind, low, inclusive = FIELD_RULES[key]
    if kind == "bool":
        return None if isinstance(value, bool) else f"{key} must be true or false, got {value!r}"
    if kind == "str":
        choices = CHOICES[key]
        if isinstance(value, str) and value in choices:
            return None
        near = closest(value, choices) if isinstance(value, str) else ""  # "; did you mean X?"
        hint = f" ({near.removeprefix('; ')})" if near else ""
        return f"{key} must be one of {', '.join(choices)}, got {value!r}{hint}"
    rel = ">=" if inclusive else ">"
    if kind == "int":
        ok, what = is_int(value), f"a whole number {rel} {low}"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        what = f"a number {rel} {low:g}"
    if not ok or value < low or (value == low and not inclusive):
        return f"{key} must be {what}, got {value!r}"
    return None


def check_fields(table: Mapping, where: str, fix: str) -> dict:
    """``table`` (Recipe fields: a recipe file's ``[recipe]``, a suite's ``[recipe]`` overrides)
    checked up front, before any run exists; milestones become a tuple, other values are kept as
    written (an int lr stays an int: config hashes do not change). A bad value is one line
    '{where} KEY must be …, got …; {fix}' (``fix`` may name ``{key}``). Unknown keys pass through
    (the caller refuses them with the list of known fields)."""
    out = dict(table)
    for key, value in table.items():
        problem = field_problem(key, value)
        if problem:
            raise KdbenchError(f"{where} {problem}; {fix.format(key=key)}")
        if key == "milestones":
            out[key] = tuple(value)
    return out


def is_int(value: Any) -> bool:
    """A whole number as TOML writes one (true and false are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def load_recipe(name: str, student: str | None = None) -> Recipe:
    """The :class:`Recipe` called ``name`` with its ``student_lr`` table as ``model_lr``; with
    ``student``, the table is applied (that student's lr replaces the recipe's)."""
    doc = read(name)
    table = doc.get("recipe", {})
    if not isinstance(table, dict):
        raise KdbenchError(f"recipe {name!r}: 'recipe' must be a table ([recipe] with lr, batch_size, "
                           f"epochs, ...), got {table!r}; fix the file")
    known = {f.name for f in fields(Recipe)} - {"model_lr"}
    bad = sorted(set(table) - known)
    if bad:
        raise KdbenchError(f"recipe {name!r} has unknown field {bad[0]!r}{closest(bad[0], known)} "
                           f"(Recipe fields: {', '.join(sorted(known))})")
    table = check_fields(table, f"recipe {name!r}: [recipe]", "fix {key} in its [recipe] table")
    table["model_lr"] = tuple(sorted(_student_lr(name, doc).items()))
    try:
        recipe = Recipe(**table)
    except TypeError as exc:
        raise KdbenchError(f"recipe {name!r} is incomplete: {exc}") from None
    return recipe.for_model(student) if student is not None else recipe


def student_lr(name: str) -> dict[str, float]:
    """Per-model learning rates of recipe ``name`` (model name -> lr)."""
    return _student_lr(name, read(name))


def _student_lr(name: str, doc: dict) -> dict[str, float]:
    table = doc.get("student_lr", {})
    if not isinstance(table, dict):
        raise KdbenchError(f"recipe {name!r}: student_lr must be a table of model = lr, got {table!r}; "
                           "fix the file")
    for model, lr in table.items():
        problem = field_problem("lr", lr)
        if problem:
            raise KdbenchError(f"recipe {name!r}: [student_lr] {model} = {lr!r}: {problem}; "
                               "fix the [student_lr] table")
    return {model: float(lr) for model, lr in table.items()}
