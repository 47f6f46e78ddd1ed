"""Every third-party package kdbench or its built-in plugins import is declared in pyproject.toml,
and every declared runtime dependency is imported somewhere (nothing dead)."""
import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "kdbench", ROOT / "plugins" / "kdbench_builtin"]
OURS = {"kdbench", "kdbench_builtin"}
#: imported only when the user installed them on purpose (documented as optional)
OPTIONAL = {"timm", "psycopg2", "psycopg", "ray"}


def imported_top_levels() -> dict[str, str]:
    found = {}
    for root in SOURCES:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in OURS and top not in sys.stdlib_module_names:
                        found.setdefault(top, f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!\[; ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}


def test_every_imported_package_is_declared():
    dists = packages_distributions()
    deps = declared()
    missing = []
    for top, where in imported_top_levels().items():
        if top in OPTIONAL:
            continue
        names = {d.lower() for d in dists.get(top, [top])}
        if not names & deps:
            missing.append(f"{top} (imported at {where}; distribution {sorted(names)})")
    assert not missing, "imported but not declared in pyproject.toml: " + ", ".join(missing)


def test_every_declared_dependency_is_imported():
    dists = packages_distributions()
    provided = {d.lower() for top in imported_top_levels() for d in dists.get(top, [top])}
    unused = declared() - provided
    assert not unused, f"declared but never imported: {sorted(unused)}"
