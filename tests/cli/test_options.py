"""The shared options of kdbench.cli are defined once and behave the same in every command; the
command modules stand alone (none imports another) and `kdbench --help` loads no heavy library."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdbench.cli import main
from kdbench.cli.options import data_options, parse_key_values

CLI = Path(__file__).resolve().parents[2] / "kdbench" / "cli"
SHARED = {"root", "options", "__init__"}


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def command(*path):
    cmd = main
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def params(cmd, *names):
    by_name = {p.name: p for p in cmd.params}
    return [by_name[n] for n in names]


DATA_COMMANDS = [("run",), ("tune",), ("plugin", "check")]


@pytest.mark.parametrize("args", [
    ["run", "--data-option", "size"],
    ["tune", "--data-option", "size"],
    ["plugin", "check", "dataset", "mnist1d", "--data-option", "size"],
])
def test_a_bad_data_option_is_the_same_one_line_error_everywhere(env, args):
    result = invoke(*args)
    assert result.exit_code == 1
    assert result.output == "error: --data-option expects key=value, got 'size'\n"


@pytest.mark.parametrize("path", DATA_COMMANDS)
def test_data_options_are_declared_alike(path):
    data_dir, data_option = params(command(*path), "data_dir", "data_opts")
    assert data_dir.opts == ["--data-dir"] and data_dir.default is None and not data_dir.multiple
    assert data_option.opts == ["--data-option"] and data_option.multiple and data_option.metavar == "KEY=VALUE"


@pytest.mark.parametrize("path", [("run",), ("tune",), ("bench",), ("ui",), ("leaderboard",)])
def test_tracking_uri_is_one_option(path):
    (option,) = params(command(*path), "tracking_uri")
    assert option.opts == ["--tracking-uri"] and option.envvar == "MLFLOW_TRACKING_URI"
    assert option.help == "MLflow tracking URI [default: sqlite:///mlflow.db in the working directory]."


def test_key_value_parsing():
    assert parse_key_values(["T = 3", "mode=a=b"]) == {"T": "3", "mode": "a=b"}
    assert data_options("/d", ["size=64"]) == {"size": "64", "data_dir": "/d"}
    assert data_options(None, []) == {}
    with pytest.raises(Exception, match=r"^--set expects key=value, got 'T'$"):
        parse_key_values(["T"])
    assert parse_key_values(["T=3", "T = 3"]) == {"T": "3"}  # the same value twice is no conflict
    with pytest.raises(Exception, match=r"^--set T given twice \('2' and '3'\); keep one$"):
        parse_key_values(["T=2", "T=3"])


@pytest.mark.parametrize("args, line", [
    (["run", "--device", "mps"], "error: --device 'mps' is not usable here (this PyTorch build or machine has no "
                                 "mps backend); use cpu or cuda"),
    (["run", "--save-student", "{tmp}/no/s.pt"], "error: --save-student {tmp}/no/s.pt: folder {tmp}/no does not "
                                                 "exist; create it or pass another path"),
    (["run", "--save-student", "{tmp}"], "error: --save-student {tmp}: is a folder; pass a file path"),
    (["leaderboard", "-o", "{tmp}/no/x.md"], "error: --output {tmp}/no/x.md: folder {tmp}/no does not exist; "
                                             "create it or pass another path"),
    (["run", "--set", "T=2", "--set", "T=3"], "error: --set T given twice ('2' and '3'); keep one"),
    (["data", "download", "cifar10", "--data-dir", "/proc/kdbench-no"],  # a folder that cannot be made
     "error: cannot create /proc/kdbench-no (No such file or directory); pass a --data-dir in a folder that exists"),
])
def test_a_path_or_device_that_cannot_be_used_is_one_line_before_anything_runs(env, args, line):
    """Said before training (a --save-student folder that does not exist failed after it, the run
    already recorded), and in a line that says what to do, not as a plugin failure."""
    import mlflow

    out = CliRunner().invoke(main, [a.replace("{tmp}", str(env)) for a in args])
    assert out.exit_code == 1 and out.output.strip().splitlines() == [line.replace("{tmp}", str(env))]
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []  # nothing recorded


def cli_imports(path: Path) -> set[str]:
    """The kdbench.cli modules ``path`` imports (anywhere in it), by their short names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "kdbench.cli":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdbench.cli."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[2] for alias in node.names if alias.name.startswith("kdbench.cli.")}
    return found


def test_a_command_module_imports_only_the_shared_options():
    commands = sorted(p for p in CLI.glob("*.py") if p.stem not in SHARED)
    assert {p.stem for p in commands} >= {"catalog", "run", "tune", "bench", "ui", "leaderboard", "data", "plugin"}
    wrong = {p.stem: cli_imports(p) - {"options"} for p in commands if cli_imports(p) - {"options"}}
    assert not wrong, wrong
    assert cli_imports(CLI / "options.py") == set()


def test_help_loads_no_heavy_library():
    code = ("import sys; from kdbench.cli import main\n"
            "heavy = ('torch', 'mlflow', 'optuna', 'pandas', 'kdbench.workflows', 'kdbench.core')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("args, line", [
    (["run", "--baseline", "sometimes"], "error: Invalid value for '--baseline': 'sometimes' is not one of 'auto', "
                                         "'always', 'never'. (see `kdbench run --help`)"),
    (["leaderboard", "--format", "xml"], "error: Invalid value for '--format': 'xml' is not one of 'table', "
                                         "'markdown', 'csv', 'html'. (see `kdbench leaderboard --help`)"),
    (["run", "--bogus"], "error: No such option '--bogus'. (see `kdbench run --help`)"),
    (["bench"], "error: Missing argument 'SUITE'. (see `kdbench bench --help`)"),
])
def test_clicks_own_usage_errors_are_one_line_too(env, args, line):
    out = CliRunner().invoke(main, args, prog_name="kdbench")
    assert out.exit_code == 2 and out.output.strip().splitlines() == [line]
