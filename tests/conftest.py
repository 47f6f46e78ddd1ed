import sys

import pytest

from kdbench.core import plugins
from helpers import make_dist


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
    # a test's `kdbench run` trains no vanilla baseline alongside unless it asks for one
    # (tests/cli/test_run_baseline.py does): the runs a test counts are the ones it made
    monkeypatch.setenv("KDBENCH_BASELINE", "never")
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
