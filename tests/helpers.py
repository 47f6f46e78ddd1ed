"""Helpers shared by test modules (``tests`` is on the path: ``from helpers import make_dist``)."""
import textwrap
from pathlib import Path


def make_dist(root: Path, name: str, version: str, entry_points: dict, modules: dict) -> Path:
    """A minimal installed distribution (dist-info + modules) under ``root``, as pip would leave it."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    eps = "[kdbench]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(eps)
    for mod, src in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(src))
    return root
