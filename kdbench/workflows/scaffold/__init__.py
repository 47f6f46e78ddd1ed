"""``kdbench plugin new``: a ready-to-publish plugin package from the templates next to this file.

The package has a pyproject.toml with the ``kdbench`` entry point, one module declaring
``KDBENCH_API``, a test calling :mod:`kdbench.testing`, and a README. It installs with
``pip install -e .`` and passes its own test unchanged.
"""
from __future__ import annotations

import re
from pathlib import Path
from string import Template

from kdbench.errors import KdbenchError

KINDS = ("method", "model", "dataset")
TEMPLATES = Path(__file__).parent / "templates"
_NAME = re.compile(r"^[a-z][a-z0-9_-]*[a-z0-9]$|^[a-z]$")

_CHECK_ARGS = {"method": "", "model": ", input_shapes=[(1, 40), (3, 32, 32)]", "dataset": ""}
_RUN = {
    "method": "kdbench run --method {name} --epochs 5",
    "model": "kdbench run --student {name} --epochs 5",
    "dataset": "kdbench run --dataset {name} --epochs 5",
}
_TAG = {"method": "method", "model": "student / plugin.teacher", "dataset": "dataset"}


def names(name: str) -> dict[str, str]:
    """The registered name, the distribution name and the module name for ``name``."""
    raw = name.strip()
    base = re.sub(r"^kdbench[-_]", "", raw.lower())
    if not _NAME.match(base) or "__" in base or "--" in base:
        raise KdbenchError(
            f"plugin name {raw!r} is not usable: use lower-case letters, digits, '-' or '_', "
            "starting with a letter (e.g. mymethod or my-method)"
        )
    return {
        "name": base,
        "dist": "kdbench-" + base.replace("_", "-"),
        "module": "kdbench_" + base.replace("-", "_"),
    }


def create(name: str, kind: str = "method", directory: str | Path = ".", registry=None) -> tuple[Path, list[Path]]:
    """Write the package into ``directory/<dist>``; return its root and the files written."""
    if kind not in KINDS:
        raise KdbenchError(f"unknown plugin kind {kind!r} (method, model or dataset)")
    n = names(name)
    if registry is not None:
        table = getattr(registry, kind + "s")
        taken = registry.contested.get((kind + "s", n["name"])) or (
            [table[n["name"]]] if n["name"] in table else [])
        if taken:
            raise KdbenchError(
                f"a {kind} named {n['name']!r} is already provided by "
                f"{' and '.join(entry.source for entry in taken)}; the name would be contested "
                "(usable only as DIST:NAME) — pick another name"
            )
    root = Path(directory) / n["dist"]
    if root.exists() and any(root.iterdir()):
        raise KdbenchError(f"{root} already exists and is not empty; pick another --dir or name")
    values = {
        **n,
        "kind": kind,
        "check": f"check_{kind}",
        "check_args": _CHECK_ARGS[kind],
        "run_example": _RUN[kind].format(**n),
        "tag": _TAG[kind],
    }
    files = {
        "pyproject.toml": "pyproject.toml.tmpl",
        "README.md": "README.md.tmpl",
        f"{n['module']}.py": f"{kind}.py.tmpl",
        f"tests/test_{n['module']}.py": "test.py.tmpl",
    }
    written = []
    for target, template in files.items():
        text = Template((TEMPLATES / template).read_text()).substitute(values)
        path = root / target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return root, written
