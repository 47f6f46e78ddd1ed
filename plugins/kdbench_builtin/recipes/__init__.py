"""Training recipes as data: ``NAME.toml`` files in this folder, read with tomllib.

Each file has a ``description``, a ``[recipe]`` table whose keys are :class:`kdbench.Recipe`
fields, and optionally a ``[student_lr]`` table: a learning rate per student model name that
replaces the recipe's (the reference trains MobileNetV2/ShuffleNet students with a lower lr).
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
        raise KdbenchError(f"unknown recipe {name!r}{closest(name, names())} (known: {', '.join(names())})")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise KdbenchError(f"recipe file {path} is not valid TOML: {exc}") from None


def load_recipe(name: str, student: str | None = None) -> Recipe:
    """The :class:`Recipe` called ``name``; with ``student``, its ``student_lr`` entry (if any)
    replaces the learning rate."""
    doc = read(name)
    table = dict(doc.get("recipe", {}))
    known = {f.name for f in fields(Recipe)}
    bad = sorted(set(table) - known)
    if bad:
        raise KdbenchError(f"recipe {name!r} has unknown field {bad[0]!r} (Recipe fields: {', '.join(sorted(known))})")
    if "milestones" in table:
        table["milestones"] = tuple(int(m) for m in table["milestones"])
    if student is not None and student in student_lr(name):
        table["lr"] = float(student_lr(name)[student])
    try:
        return Recipe(**table)
    except TypeError as exc:
        raise KdbenchError(f"recipe {name!r} is incomplete: {exc}") from None


def student_lr(name: str) -> dict[str, float]:
    """Per-student learning rates of recipe ``name`` (model name -> lr)."""
    return {k: float(v) for k, v in read(name).get("student_lr", {}).items()}
