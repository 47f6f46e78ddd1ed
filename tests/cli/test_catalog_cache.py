"""The catalog commands (`kdbench list`, `plugins`, `show`) print from a cache once a first one has
loaded the plugins: the same bytes as loading them, without importing any plugin or torch, and a
cache that no longer matches what is installed (an edited plugin, another plugin selection) or is
damaged is not used."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from kdbench.cli import main
from kdbench.core import plugins

TP = """
from kdbench import hookimpl
from kdbench.contracts import Method, HParam

def loss(step):
    raise NotImplementedError

@hookimpl
def register_methods(register):
    register(Method(name="{name}", loss=loss, description="{description}",
                    hparams=(HParam("w", 1.0, low=0.0, space=(0.1, 2.0)),)))
"""


@pytest.fixture
def cache(env, tmp_path, monkeypatch):
    """A cache folder of this test's own (the session's is shared by every test)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(folder))
    return folder / "catalog"


def invoke(*args):
    """The command in a process state like a fresh `kdbench`: nothing loaded yet."""
    plugins.reset()
    result = CliRunner().invoke(main, list(args))
    return result


def test_cached_output_is_the_loaded_output_for_every_builtin(cache):
    registry = plugins.registry()
    commands = [("list",), ("list", "methods"), ("list", "models"), ("list", "datasets"), ("list", "recipes"),
                ("plugins",), ("plugins", "--no-third-party"), ("plugins", "--disable", "builtin-models"),
                ("show", "model", "cnn1d_2x16", "--dataset", "mnist1d")]
    commands += [("show", kind[:-1], name) for kind in ("methods", "models", "datasets")
                 for name, _ in registry.listing(kind)]
    assert len(commands) > 60
    # what each prints with the plugins loaded in this process (the cache is not read; only
    # `plugins --disable/--no-third-party`, which load their own selection, store it)
    loaded = {command: CliRunner().invoke(main, list(command)) for command in commands}
    assert all(result.exit_code == 0 for result in loaded.values())
    assert len(list(cache.glob("*.json"))) == 2
    shutil.rmtree(cache)
    # cold: the first command loads the plugins and stores the catalog; `show model` builds the
    # network once (its taps), so each of those loads the plugins the first time
    for command in commands:
        cold = invoke(*command)
        assert (cold.exit_code, cold.output) == (0, loaded[command].output), command
    assert len(list(cache.glob("*.json"))) == 3  # three plugin selections
    # warm: the same bytes, and the plugins were not loaded
    for command in commands:
        warm = invoke(*command)
        assert (warm.exit_code, warm.output) == (0, loaded[command].output), command
        assert plugins.loaded() is None, command
    # what the cache does not hold is loaded for real: the same error as without it
    unknown = invoke("show", "method", "atx")
    assert unknown.exit_code == 1 and unknown.output.startswith("error: unknown method 'atx'; did you mean")
    assert plugins.loaded() is not None
    tab = invoke("show", "method", "at\tkd")
    assert tab.exit_code == 1 and tab.output.startswith("error: unknown method 'at\\tkd'")
    no_dataset = invoke("show", "model", "cnn1d_4x32", "--dataset", "nope")
    assert no_dataset.exit_code == 1
    assert no_dataset.output.splitlines()[:2] == loaded["show", "model", "cnn1d_4x32"].output.splitlines()[:2]
    assert no_dataset.output.splitlines()[2].startswith("error: unknown dataset 'nope'")
    qualified = invoke("show", "method", "kdbench:at")
    assert qualified.output.splitlines()[1:] == loaded["show", "method", "at"].output.splitlines()[1:]


def test_warm_command_in_a_fresh_process_imports_neither_torch_nor_a_plugin(cache):
    program = ("import atexit, sys\n"
               "atexit.register(lambda: print(sorted(m for m in ('torch', 'kdbench_builtin', 'mlflow', 'pandas', "
               "'numpy') if m in sys.modules), file=sys.stderr))\n"
               "from kdbench.cli import main\nmain()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True, env=env, timeout=120)
            for args in (["list"], ["list"], ["show", "method", "at"], ["plugins"])]
    assert [run.returncode for run in runs] == [0, 0, 0, 0]
    assert runs[0].stderr.strip().splitlines()[-1] == "['kdbench_builtin', 'numpy', 'torch']"  # cold: loaded
    assert [run.stderr.strip() for run in runs[1:]] == ["[]"] * 3
    assert runs[1].stdout == runs[0].stdout and "  at " in runs[1].stdout


def test_an_edited_plugin_or_another_selection_is_not_served_from_the_cache(cache, add_dist, monkeypatch):
    root = add_dist("kdbench-tp", "1.0", {"tp": "kdtest_tp"},
                    {"kdtest_tp": TP.format(name="kdtest_tp", description="first words")})
    assert "first words" in invoke("list", "methods").output
    assert "first words" in invoke("list", "methods").output and plugins.loaded() is None
    # an editable plugin edited in place: its file's size and time change
    (root / "kdtest_tp.py").write_text(TP.format(name="kdtest_tp", description="the second version"))
    sys.modules.pop("kdtest_tp", None)
    edited = invoke("list", "methods")
    assert "the second version" in edited.output and "first words" not in edited.output
    assert plugins.loaded() is not None
    # the environment variables that select plugins are part of the key
    monkeypatch.setenv("KDBENCH_DISABLE", "kdbench-tp")
    assert "kdtest_tp" not in invoke("list", "methods").output and plugins.loaded() is not None
    monkeypatch.setenv("KDBENCH_PLUGINS", "")
    monkeypatch.delenv("KDBENCH_DISABLE")
    assert "kdtest_tp" not in invoke("list", "methods").output and plugins.loaded() is not None
    monkeypatch.delenv("KDBENCH_PLUGINS")
    back = invoke("list", "methods")
    assert "the second version" in back.output and plugins.loaded() is None


def test_warnings_and_failures_are_shown_from_the_cache_too(cache, add_dist):
    add_dist("kdbench-evil", "6.6", {"evil": "kdtest_evil"}, {"kdtest_evil": TP.format(name="kd", description="impostor")})
    add_dist("kdbench-broken", "0.1", {"broken": "kdtest_broken"}, {"kdtest_broken": "import no_such_module_anywhere\n"})
    commands = [("list", "methods"), ("plugins",), ("show", "method", "kd"), ("show", "method", "kdbench-evil:kd")]
    cold = {command: invoke(*command) for command in commands}
    for command in commands:
        warm = invoke(*command)
        assert plugins.loaded() is None, command
        assert (warm.exit_code, warm.output) == (cold[command].exit_code, cold[command].output), command
        assert warm.output.startswith("warning: method 'kd' is registered by kdbench 0.1.0 and kdbench-evil 6.6; "
                                      "'kd' is kdbench's own, the other is `kdbench-evil:kd`")
    listed = cold["list", "methods"].output
    assert "  kdbench-evil:kd  impostor" in listed
    assert listed.split("broken plugins:\n")[1].startswith(
        "  broken (kdbench-broken 0.1): import failed: ModuleNotFoundError: No module named 'no_such_module_anywhere'")
    assert cold["show", "method", "kdbench-evil:kd"].output.splitlines()[1] == \
        "kdbench-evil:kd — impostor  (kdbench-evil 6.6)"


def test_a_damaged_cache_is_ignored_and_rebuilt(cache):
    expected = invoke("list", "datasets").output
    (path,) = cache.glob("*.json")
    for damage in ("{not json", json.dumps({"format": 1, "key": "another", "warnings": [], "blocks": {}}),
                   json.dumps({"format": 1}), "[]"):
        path.write_text(damage)
        again = invoke("list", "datasets")
        assert (again.exit_code, again.output) == (0, expected)
        assert plugins.loaded() is not None  # loaded for real, then stored again
        assert json.loads(path.read_text())["blocks"]['["list", "datasets"]'] == expected.splitlines()
    assert invoke("list", "datasets").output == expected and plugins.loaded() is None


def test_importing_the_cli_and_every_help_imports_no_heavy_package():
    program = """
import sys
from click.testing import CliRunner
from kdbench.cli import main
heavy = ('torch', 'mlflow', 'pandas', 'optuna', 'ray', 'numpy')
assert not [m for m in heavy if m in sys.modules], sys.modules
def commands(group, path):
    for name, command in group.commands.items():
        yield path + [name]
        if hasattr(command, "commands"):
            yield from commands(command, path + [name])
paths = [[]] + list(commands(main, []))
for path in paths:
    result = CliRunner().invoke(main, path + ["--help"])
    assert result.exit_code == 0, (path, result.output)
print(len(paths), sorted(m for m in heavy if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    count, imported = done.stdout.split(" ", 1)
    assert int(count) >= 14 and imported.strip() == "[]"
