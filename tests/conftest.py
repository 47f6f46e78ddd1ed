import sys
import textwrap
from pathlib import Path

import pytest

from kdbench.core import plugins


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


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory):
    """One teacher cache for the whole session: the default teacher is trained once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def env(monkeypatch, tmp_path, teacher_cache):
    """An isolated working directory, tracking store and plugin registry."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(teacher_cache))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("KDBENCH_PLUGINS", raising=False)
    monkeypatch.delenv("KDBENCH_DISABLE", raising=False)
    plugins.reset()
    yield tmp_path
    plugins.reset()


@pytest.fixture
def add_dist(monkeypatch, tmp_path):
    """Install a fake plugin distribution on sys.path for this test."""
    def add(name, version, entry_points, modules):
        root = make_dist(tmp_path / f"site-{name}", name, version, entry_points, modules)
        monkeypatch.syspath_prepend(str(root))
        plugins.reset()
        return root

    yield add
    for mod in [m for m in sys.modules if m.startswith("kdtest_")]:
        del sys.modules[mod]
    plugins.reset()
