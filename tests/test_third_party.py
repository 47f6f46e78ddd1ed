"""A third-party plugin from idea to leaderboard: scaffold, pip install into a fresh venv, list,
run, tags; and every way a plugin can be broken, seen through the CLI."""
import importlib
import os
import shutil
import site
import subprocess
import sys
import venv
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from helpers import make_dist
from kdbench.core import plugins
from kdbench.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "plugins" / "kdbench-example"

GOOD = """
from kdbench import hookimpl
from kdbench.contracts import Method, HParam
import torch.nn.functional as F

def loss(step):
    return {"ce": F.cross_entropy(step.student.logits, step.y)}

@hookimpl
def register_methods(register):
    register(Method(name="kdtest_tp", loss=loss, description="a third-party method",
                    hparams=(HParam("w", 1.0, low=0.0, space=(0.1, 2.0)),)))
"""


def invoke(*args):
    return CliRunner().invoke(main, list(args))


# --------------------------------------------------------------------------- scaffold


@pytest.fixture
def scaffolded(env, monkeypatch, tmp_path):
    """Scaffold with the CLI, then register the package in-process as pip would."""
    made = []

    def make(name, kind):
        result = invoke("plugin", "new", name, "--kind", kind, "--dir", str(tmp_path / "src"))
        assert result.exit_code == 0, result.output
        root = tmp_path / "src" / f"kdbench-{name}"
        module = f"kdbench_{name}"
        eps = dict(l.split(" = ") for l in (root / "pyproject.toml").read_text().splitlines()
                   if l.startswith(f"{name} = "))
        site_dir = make_dist(tmp_path / f"site-{name}", f"kdbench-{name}", "0.1.0",
                             {k: v.strip('"') for k, v in eps.items()}, {})
        monkeypatch.syspath_prepend(str(site_dir))
        monkeypatch.syspath_prepend(str(root))
        made.append(module)
        plugins.reset()
        return root, result.output

    yield make
    for module in made:
        sys.modules.pop(module, None)
    plugins.reset()


@pytest.mark.parametrize("kind", ["method", "model", "dataset"])
def test_scaffolded_plugin_passes_its_own_test(scaffolded, kind):
    name = f"kdtest{kind}"
    root, output = scaffolded(name, kind)
    assert f"created {root}/" in output and "pip install -e" in output
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["README.md", f"kdbench_{name}.py", "pyproject.toml", f"tests/test_kdbench_{name}.py"]
    assert "KDBENCH_API = 1" in (root / f"kdbench_{name}.py").read_text()
    entry = plugins.registry().entry(kind + "s", name)
    assert entry.source == f"kdbench-{name} 0.1.0"
    listed = invoke("list", kind + "s").output
    assert name in listed and f"kdbench-{name} 0.1.0" in listed
    # the generated test, unchanged
    spec = importlib.util.spec_from_file_location("generated_test", root / "tests" / f"test_kdbench_{name}.py")
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    generated.test_conformance()
    check = invoke("plugin", "check", kind, name)
    assert check.exit_code == 0 and f"ok: {kind} '{name}' conforms" in check.output


def test_plugin_new_refuses_bad_names_taken_names_and_existing_dirs(env, tmp_path):
    result = invoke("plugin", "new", "My Method", "--dir", str(tmp_path))
    assert result.exit_code == 1 and "error: plugin name 'My Method' is not usable" in result.output
    result = invoke("plugin", "new", "kd", "--dir", str(tmp_path))
    assert result.exit_code == 1
    assert "error: a method named 'kd' is already provided by kdbench" in result.output
    assert invoke("plugin", "new", "kdbench-fresh", "--dir", str(tmp_path)).exit_code == 0
    assert (tmp_path / "kdbench-fresh" / "kdbench_fresh.py").is_file()
    result = invoke("plugin", "new", "fresh", "--dir", str(tmp_path))
    assert result.exit_code == 1 and "already exists and is not empty" in result.output


def test_plugin_check_reports_what_to_fix(env, add_dist):
    bad = GOOD.replace('return {"ce": F.cross_entropy(step.student.logits, step.y)}',
                       'return {"ce": F.cross_entropy(step.student.logits, step.y, reduction="none")}')
    add_dist("kdbench-tp", "0.1", {"tp": "kdtest_tp"}, {"kdtest_tp": bad})
    result = invoke("plugin", "check", "method", "kdtest_tp", "--trials", "5")
    assert result.exit_code == 1
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error: does not conform: method 'kdtest_tp': ")
    assert "reduce it to a scalar" in line


# --------------------------------------------------------------------------- broken plugins, via the CLI

BROKEN = {
    "import": ("import no_such_module_anywhere\n", "failed", "import failed: ModuleNotFoundError"),
    "raises": ("from kdbench import hookimpl\n@hookimpl\ndef register_methods(register):\n    raise RuntimeError('boom')\n",
               "failed", "register_methods raised RuntimeError: boom"),
    "space": (GOOD.replace("space=(0.1, 2.0)", "space=(2.0, 0.1)"), "failed",
              "method 'kdtest_tp': w: search space (2.0, 0.1) is empty"),
    "api": ("KDBENCH_API = 2\n" + GOOD, "failed",
            "targets kdbench plugin API 2, this kdbench provides API 1; upgrade the plugin or kdbench"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_plugin_is_one_line_and_the_rest_works(env, add_dist, case):
    src, status, error = BROKEN[case]
    add_dist(f"kdbench-bad-{case}", "0.9", {f"bad{case}": "kdtest_tp"}, {"kdtest_tp": src})
    result = invoke("plugins")
    assert result.exit_code == 0, result.output
    rows = [l for l in result.output.splitlines() if l.startswith(f"bad{case} ")]
    assert len(rows) == 1 and f"kdbench-bad-{case} 0.9" in rows[0] and f" {status} " in rows[0]
    failures = result.output.split("broken plugins:\n")[1].splitlines()
    assert len(failures) == 1
    assert failures[0].strip().startswith(f"bad{case} (kdbench-bad-{case} 0.9): ")
    assert error in failures[0]
    listed = invoke("list", "methods")
    assert listed.exit_code == 0 and "  kd " in listed.output and error in listed.output
    assert "kdtest_tp" not in listed.output.split("broken plugins:")[0]
    assert invoke("show", "method", "kd").exit_code == 0
    # one bad plugin can be switched off, and the failure goes with it
    quiet = invoke("plugins", "--disable", f"kdbench-bad-{case}")
    assert "broken plugins" not in quiet.output and " disabled " in quiet.output


def test_a_hijacked_name_is_visible_refused_and_caught_by_the_kit(env, add_dist):
    """An impostor registering the same name as a real plugin, sorting first: the plain name is
    refused with both distributions named, every command warns, the qualified name runs the one
    meant, and the real plugin's conformance test fails unless it names its distribution."""
    from kdbench.testing import check_method

    real = GOOD.replace('name="kdtest_tp"', 'name="kdtest_lskd", needs_teacher=False')
    add_dist("kdbench-lskd", "1.0", {"kdtest_lskd": "kdtest_real"}, {"kdtest_real": real})
    add_dist("kdbench-aaa", "6.6", {"aaa": "kdtest_fake"}, {"kdtest_fake": real.replace("a third-party method", "impostor")})
    result = invoke("run", "--method", "kdtest_lskd", "--epochs", "1", "--device", "cpu")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 2
    assert lines[0].startswith("warning: method 'kdtest_lskd' is registered by kdbench-aaa 6.6 and kdbench-lskd 1.0")
    assert lines[1].startswith("error: method 'kdtest_lskd' is registered by 2 distributions")
    with pytest.raises(AssertionError, match="registered by 2 distributions, kdbench-aaa 6.6 and kdbench-lskd 1.0"):
        check_method("kdtest_lskd")
    check_method("kdbench-lskd:kdtest_lskd", trials=2, loss_trials=0, run=False)
    ran = invoke("run", "--method", "kdbench-lskd:kdtest_lskd", "--epochs", "1", "--device", "cpu")
    assert ran.exit_code == 0, ran.output
    (student,) = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("kdbench/mnist1d").experiment_id], "tags.role = 'student'")
    assert student.data.tags["plugin.method"] == "kdbench-lskd 1.0"
    # the real plugin broken, the impostor alone: the name resolves, but the kit says whose it is
    (env / "site-kdbench-lskd" / "kdtest_real.py").write_text("import no_such_module_anywhere\n")
    sys.modules.pop("kdtest_real", None)
    importlib.invalidate_caches()
    plugins.reset()
    assert plugins.registry().methods["kdtest_lskd"].dist == "kdbench-aaa"
    with pytest.raises(AssertionError, match=r"method 'kdtest_lskd' resolves to kdbench-aaa 6.6 \(plugin aaa\), "
                       r"not to plugin kdtest_lskd of kdbench-lskd 1.0, which failed to load: import failed"):
        check_method("kdtest_lskd")
    with pytest.raises(AssertionError, match="unknown method 'kdbench-lskd:kdtest_lskd': a plugin of kdbench-lskd "
                       "failed to load: kdtest_lskd"):
        check_method("kdbench-lskd:kdtest_lskd")


def test_plugins_flags_and_env_vars_disable_third_party(env, add_dist, monkeypatch):
    add_dist("kdbench-tp", "1.0", {"tp": "kdtest_tp"}, {"kdtest_tp": GOOD})
    out = invoke("plugins").output
    (row,) = [l for l in out.splitlines() if l.startswith("tp ")]
    assert "kdbench-tp 1.0" in row and "loaded" in row and row.endswith("register_methods")
    assert "builtin-methods" in out and "kdbench 0.1.0" in out
    (row,) = [l for l in invoke("plugins", "--no-third-party").output.splitlines() if l.startswith("tp ")]
    assert "disabled" in row
    (row,) = [l for l in invoke("plugins", "--disable", "tp").output.splitlines() if l.startswith("tp ")]
    assert "disabled" in row
    monkeypatch.setenv("KDBENCH_PLUGINS", "")
    plugins.reset()
    assert "kdtest_tp" not in invoke("list", "methods").output


# --------------------------------------------------------------------------- a real pip install into a fresh venv


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new venv that sees this environment's packages (kdbench, torch, ...) through a .pth, with
    the example plugin pip-installed into it (offline: no deps, no build isolation)."""
    root = tmp_path_factory.mktemp("venv")
    _CACHE[:] = [root / "cache"]
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    (Path(purelib) / "_kdbench_parent_env.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
    # kdbench's console script, as pip writes it, from kdbench's own entry point
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "kdbench"]
    module, func = ep.value.split(":")
    script = env_dir / "bin" / "kdbench"
    script.write_text(f"#!{python}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    script.chmod(0o755)
    src = root / "kdbench-example"  # a copy: building writes egg-info next to the sources
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    pip = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--no-index", "--disable-pip-version-check"]
    done = subprocess.run(pip + [str(src)], capture_output=True, text=True, env=_env(root))
    assert done.returncode == 0, done.stdout + done.stderr
    return env_dir, src, pip


_CACHE: list[Path] = []  # one cache for the venv tests: MNIST-1D is generated once


def _env(work: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KDBENCH_", "MLFLOW_"))}
    env.update(KDBENCH_CACHE_DIR=str(_CACHE[0] if _CACHE else work / "cache"), MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db",
               OMP_NUM_THREADS="1", **extra)  # one thread: far faster on a shared CPU
    return env


def _kdbench(env_dir, work, *args, check=True):
    done = subprocess.run([env_dir / "bin" / "kdbench", *args], cwd=work, capture_output=True,
                          text=True, env=_env(work), timeout=300)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_pip_installed_plugin_is_listed_run_and_tagged(fresh_venv, tmp_path):
    env_dir, src, _ = fresh_venv
    listed = _kdbench(env_dir, tmp_path, "list", "methods").stdout
    (row,) = [l for l in listed.splitlines() if l.strip().startswith("wsld ")]
    assert row.endswith("(kdbench-example 0.1.0)") and "Zhou et al., ICLR 2021" in row
    table = _kdbench(env_dir, tmp_path, "plugins").stdout
    (row,) = [l for l in table.splitlines() if l.startswith("example ")]
    assert "kdbench-example 0.1.0" in row and "loaded" in row and "register_methods" in row
    # the same discovery path serves the built-ins
    assert "kdbench_builtin.methods" in table and "broken plugins" not in table
    # an untrained teacher from a checkpoint: the run's subject is the student side, and this
    # keeps the test from training a 20-epoch teacher
    torch.manual_seed(0)
    from kdbench.core import engine
    from kdbench.core.plan import RunConfig, make_plan

    plan = make_plan(RunConfig(method="kd"), plugins.load())
    torch.save({"model": engine.build_teacher(plan, torch.device("cpu")).state_dict()}, tmp_path / "t.pt")
    out = _kdbench(env_dir, tmp_path, "run", "--method", "wsld", "--epochs", "1", "--device", "cpu",
                   "--teacher-checkpoint", "t.pt").stdout
    assert "method" in out and "wsld" in out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("kdbench/mnist1d")
    # (the run also trained its vanilla baseline: embedded data, no vanilla run yet)
    (student,) = client.search_runs([exp.experiment_id], "tags.role = 'student' AND tags.method = 'wsld'")
    tags = student.data.tags
    assert student.info.status == "FINISHED" and tags["method"] == "wsld"
    assert tags["plugin.method"] == "kdbench-example 0.1.0"
    assert tags["plugin.dataset"].startswith("kdbench ") and tags["plugin.student"].startswith("kdbench ")
    assert tags["plugin.teacher"].startswith("kdbench ")
    assert "loss_wsl" in student.data.metrics and "test_top1" in student.data.metrics
    board = _kdbench(env_dir, tmp_path, "leaderboard").stdout
    assert "wsld" in board


def test_example_and_scaffolded_packages_pass_their_own_tests_after_pip(fresh_venv, tmp_path):
    env_dir, src, pip = fresh_venv
    python = env_dir / "bin" / "python"
    pytest_cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(pytest_cmd + [str(src / "tests")], cwd=tmp_path, capture_output=True,
                          text=True, env=_env(tmp_path), timeout=300)
    assert done.returncode == 0 and "3 passed" in done.stdout, done.stdout + done.stderr
    _kdbench(env_dir, tmp_path, "plugin", "new", "kdtestpip", "--dir", str(tmp_path))
    pkg = tmp_path / "kdbench-kdtestpip"
    done = subprocess.run(pip + ["-e", str(pkg)], capture_output=True, text=True, env=_env(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run(pytest_cmd, cwd=pkg, capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr
    listed = _kdbench(env_dir, tmp_path, "list", "methods").stdout
    assert "(kdbench-kdtestpip 0.1.0)" in listed
