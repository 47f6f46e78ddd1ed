"""The architecture, enforced: kdbench's folders are its layers and imports only go downward.

Layers, lowest first (a module may import its own layer and the ones below it):

0. the public plugin API: ``kdbench`` itself and its top-level modules (contracts, hookspecs, fusion,
   errors, losses, data) and ``kdbench.recipes``;
1. ``kdbench.core``: plugin loading, plans, taps, data splits, the engine, metrics;
2. ``kdbench.workflows`` (run, teachers, tune, suites, bench, leaderboard, tracking, scaffold) and
   ``kdbench.testing`` (the conformance kit) — side by side: neither imports the other;
3. ``kdbench.cli`` (and ``kdbench.__main__``).

Every import counts, also one inside a function. Import cycles between kdbench modules are
refused too. The built-in plugins import only the public API and never a sibling method.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kdbench"
BUILTIN = ROOT / "plugins" / "kdbench_builtin"

#: top-level package of a module → (rank, group); same rank in another group is forbidden
LAYERS = {
    "api": (0, "api"),
    "core": (1, "core"),
    "workflows": (2, "workflows"),
    "testing": (2, "testing"),
    "cli": (3, "cli"),
}
PUBLIC = ("kdbench", "kdbench.contracts", "kdbench.hookspecs", "kdbench.errors", "kdbench.losses",
          "kdbench.data", "kdbench.recipes", "kdbench.fusion")


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def modules(root: Path, package: str) -> dict[str, Path]:
    return {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    if module == "kdbench.__main__":
        return "cli"
    return "api"


def imports(path: Path, module: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported kdbench module) for every import in ``path``, relative ones resolved;
    ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if sub in known else target))
    return [(line, name) for line, name in out if name == "kdbench" or name.startswith("kdbench.")]


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[int, str]]]]:
    mods = modules(PACKAGE, "kdbench")
    return mods, {name: imports(path, name, set(mods)) for name, path in mods.items()}


def test_every_kdbench_module_is_in_a_layer_folder_or_the_public_api():
    mods, _ = graph()
    top_level = {name for name in mods if name.count(".") == 1 and layer_of(name) == "api"}
    assert top_level <= {"kdbench.contracts", "kdbench.hookspecs", "kdbench.errors", "kdbench.losses",
                         "kdbench.data", "kdbench.recipes", "kdbench.fusion", "kdbench.__main__"}, top_level
    for layer in LAYERS:
        if layer != "api":
            assert (PACKAGE / layer / "__init__.py").is_file(), f"kdbench/{layer}/ is missing"


def test_imports_only_go_down_the_layers():
    mods, edges = graph()
    wrong = []
    for name, found in edges.items():
        rank, group = LAYERS[layer_of(name)]
        for line, target in found:
            target_rank, target_group = LAYERS[layer_of(target)]
            if target_rank > rank or (target_rank == rank and target_group != group):
                wrong.append(f"{mods[name].relative_to(ROOT)}:{line}: {layer_of(name)} imports "
                             f"{target} ({layer_of(target)})")
    assert not wrong, "upward or sideways imports:\n" + "\n".join(wrong)


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def module_edges(mods, edges) -> dict[str, list[str]]:
    """Module → modules it imports; importing a package's own ``__init__`` from inside the package
    (``from kdbench import hookimpl``) is not an edge of a cycle unless ``__init__`` imports back."""
    return {name: sorted({t for _, t in found if t in mods and t != name}) for name, found in edges.items()}


def test_no_import_cycles():
    mods, edges = graph()
    cycle = find_cycle(module_edges(mods, edges))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a"]}) is None


def test_the_layer_check_names_the_offending_line(tmp_path):
    # an upward import inside a function is found, with its line
    pkg = tmp_path / "kdbench"
    (pkg / "core").mkdir(parents=True)
    (pkg / "workflows").mkdir()
    (pkg / "core" / "x.py").write_text("def f():\n    from kdbench.workflows import y\n")
    (pkg / "workflows" / "y.py").write_text("")
    mods = modules(pkg, "kdbench")
    found = imports(pkg / "core" / "x.py", "kdbench.core.x", set(mods))
    assert found == [(2, "kdbench.workflows.y")]
    assert LAYERS[layer_of("kdbench.workflows.y")][0] > LAYERS[layer_of("kdbench.core.x")][0]


def test_builtin_plugins_use_only_the_public_api_and_no_sibling_method():
    mods = modules(BUILTIN, "kdbench_builtin")
    wrong = []
    for name, path in mods.items():
        known = set(mods) | set(modules(PACKAGE, "kdbench"))
        for line, target in imports(path, name, known):
            if target not in PUBLIC:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: imports {target} (not public API)")
        if name.startswith("kdbench_builtin.methods.") and path.name != "__init__.py":
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level and node.module:
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports sibling .{node.module}")
    assert not wrong, "\n".join(wrong)
