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

import tomllib
from dataclasses import fields
from pathlib import Path

from kdbench.contracts import Recipe
from kdbench.errors import KdbenchError, closest

HERE = Path(__file__).parent


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
        raise KdbenchError(f"recipe file {path} is not valid TOML: {exc}") from None


def load_recipe(name: str, student: str | None = None) -> Recipe:
    """The :class:`Recipe` called ``name`` with its ``student_lr`` table as ``model_lr``; with
    ``student``, the table is applied (that student's lr replaces the recipe's)."""
    doc = read(name)
    table = dict(doc.get("recipe", {}))
    known = {f.name for f in fields(Recipe)} - {"model_lr"}
    bad = sorted(set(table) - known)
    if bad:
        raise KdbenchError(f"recipe {name!r} has unknown field {bad[0]!r} (Recipe fields: {', '.join(sorted(known))})")
    if "milestones" in table:
        table["milestones"] = tuple(int(m) for m in table["milestones"])
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
    try:
        return {k: float(v) for k, v in doc.get("student_lr", {}).items()}
    except (TypeError, ValueError) as exc:
        raise KdbenchError(f"recipe {name!r}: [student_lr] must map model names to numbers ({exc})") from None
