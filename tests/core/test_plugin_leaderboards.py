"""Plugins ship leaderboards: `pip install kdbench-foo && kdbench bench foo` finds the suite the
package registers, "installed" in a suite means every registered method (built-in and third-party),
and a suite run by path is rendered by path."""
from click.testing import CliRunner

from kdbench.cli import main
from kdbench.core import plugins
from kdbench.workflows import suites

MODULE = '''
from pathlib import Path

import torch.nn.functional as F

from kdbench import hookimpl
from kdbench.contracts import HParam, Leaderboard, Method

KDBENCH_API = 1


def loss(step):
    return {"ce": F.cross_entropy(step.student.logits, step.y),
            "l2": step.hp.w * F.mse_loss(step.student.logits, step.teacher.logits.float())}


@hookimpl
def register_methods(register):
    register(Method(name="logit_l2", loss=loss, description="logit L2",
                    hparams=(HParam("w", 1.0, low=0.0, space=(0.01, 10.0), log=True),)))


@hookimpl
def register_leaderboards(register):
    register(Leaderboard(name="digits", path=Path(__file__).parent / "digits.toml", description="ours"))
'''

SUITE = '''
name = "digits"
dataset = "mnist1d"
seeds = [0, 1, 2]
methods = {methods}
[recipe]
epochs = 1
[[pairs]]
teacher = "cnn1d_4x32"
student = "cnn1d_2x16"
'''


def _install(add_dist, methods='["vanilla", "logit_l2"]'):
    root = add_dist("kdbench-digits", "0.3.0", {"digits": "kdtest_digits"}, {"kdtest_digits": MODULE})
    (root / "digits.toml").write_text(SUITE.format(methods=methods))
    return root


def test_a_plugin_suite_is_found_by_name_and_listed(env, add_dist):
    root = _install(add_dist)
    entry = plugins.registry().leaderboards["digits"]
    assert entry.dist == "kdbench-digits" and entry.obj.description == "ours"
    assert suites.find_suite("digits") == root / "digits.toml"
    result = CliRunner().invoke(main, ["bench", "digits", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "digits: 1 pairs × 2 methods × 3 seeds = 6 cells" in result.output
    assert "logit_l2/s2" in result.output
    unknown = CliRunner().invoke(main, ["bench", "nope", "--dry-run"])
    assert unknown.exit_code == 1 and "digits" in unknown.output and "embedded" in unknown.output


def test_installed_means_every_registered_method_all_means_builtins(env, add_dist):
    _install(add_dist, methods='["installed"]')
    installed = {spec.name for spec in suites.load_suite("digits").methods}
    builtins = {name for name, entry in plugins.registry().methods.items() if entry.dist == "kdbench"}
    assert installed == builtins | {"logit_l2"}
    (suites.find_suite("digits")).write_text(SUITE.format(methods='["all"]'))
    assert {spec.name for spec in suites.load_suite("digits").methods} == builtins


def test_a_missing_suite_file_is_a_plugin_failure_not_a_crash(env, add_dist):
    add_dist("kdbench-digits", "0.3.0", {"digits": "kdtest_digits"}, {"kdtest_digits": MODULE})  # no TOML
    reg = plugins.registry()
    assert "digits" not in reg.leaderboards
    (failure,) = [f for f in reg.failures if f.dist == "kdbench-digits"]
    assert "leaderboard 'digits': no suite file at" in failure.error


def test_a_suite_benched_by_path_is_rendered_by_path(env, add_dist):
    root = _install(add_dist, methods='["vanilla"]')
    path = str(root / "digits.toml")
    result = CliRunner().invoke(main, ["bench", path])
    assert result.exit_code == 0, result.output
    assert f"render: kdbench leaderboard {path}" in result.output
