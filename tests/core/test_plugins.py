"""Plugin discovery through entry points: built-ins, broken plugins, collisions, env vars."""
from click.testing import CliRunner

from kdbench.core import plugins
from kdbench.cli import main

GOOD = """
from kdbench import hookimpl
from kdbench.contracts import Method, HParam
import torch.nn.functional as F

def loss(step):
    return {"ce": F.cross_entropy(step.student.logits, step.y)}

@hookimpl
def register_methods(register):
    register(Method(name="kdtest_good", loss=loss, description="a third-party method",
                    hparams=(HParam("w", 1.0, low=0.0, space=(0.1, 2.0)),)))
"""


def test_builtins_register_through_entry_points(env):
    reg = plugins.registry()
    assert {"vanilla", "kd", "at"} <= set(reg.methods)
    assert "mnist1d" in reg.datasets and "cnn1d_4x32" in reg.models
    assert reg.methods["kd"].dist == "kdbench"
    assert reg.failures == []


def test_third_party_plugin_loads_with_its_distribution(env, add_dist):
    add_dist("kdbench-good", "1.2.3", {"good": "kdtest_good"}, {"kdtest_good": GOOD})
    reg = plugins.registry()
    entry = reg.methods["kdtest_good"]
    assert (entry.dist, entry.version, entry.plugin) == ("kdbench-good", "1.2.3", "good")
    out = CliRunner().invoke(main, ["list", "methods"]).output
    assert "kdtest_good" in out and "kdbench-good 1.2.3" in out


def test_broken_entry_point_is_reported_and_the_rest_load(env, add_dist):
    add_dist("kdbench-broken", "0.1", {"broken": "kdtest_broken"},
             {"kdtest_broken": "import no_such_module_anywhere\n"})
    add_dist("kdbench-good", "1.0", {"good": "kdtest_good"}, {"kdtest_good": GOOD})
    reg = plugins.registry()
    assert "kdtest_good" in reg.methods and "kd" in reg.methods
    (failure,) = reg.failures
    assert (failure.plugin, failure.dist) == ("broken", "kdbench-broken")
    assert "No module named 'no_such_module_anywhere'" in failure.error
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0
    assert "broken (kdbench-broken 0.1): import failed" in result.output


def test_hook_that_raises_is_reported(env, add_dist):
    src = "from kdbench import hookimpl\n@hookimpl\ndef register_methods(register):\n    raise RuntimeError('boom')\n"
    add_dist("kdbench-raiser", "0.2", {"raiser": "kdtest_raiser"}, {"kdtest_raiser": src})
    reg = plugins.registry()
    assert reg.failures[0].error == "register_methods raised RuntimeError: boom"
    assert "kd" in reg.methods


def test_name_collision_names_both_distributions_and_refuses(env, add_dist):
    add_dist("kdbench-evil", "9.9", {"evil": "kdtest_evil"},
             {"kdtest_evil": GOOD.replace('name="kdtest_good"', 'name="kd"')})
    reg = plugins.registry()
    assert reg.methods["kd"].dist == "kdbench"  # the built-in is not shadowed
    (failure,) = reg.failures
    assert failure.dist == "kdbench-evil"
    assert "method 'kd' is already provided by kdbench" in failure.error


def test_env_var_restricts_to_builtins(env, add_dist, monkeypatch):
    add_dist("kdbench-good", "1.0", {"good": "kdtest_good"}, {"kdtest_good": GOOD})
    monkeypatch.setenv("KDBENCH_PLUGINS", "")
    plugins.reset()
    reg = plugins.registry()
    assert "kdtest_good" not in reg.methods and "kd" in reg.methods
    monkeypatch.setenv("KDBENCH_PLUGINS", "kdbench-good")
    plugins.reset()
    assert "kdtest_good" in plugins.registry().methods
    monkeypatch.delenv("KDBENCH_PLUGINS")
    monkeypatch.setenv("KDBENCH_DISABLE", "good")
    plugins.reset()
    reg = plugins.registry()
    assert "kdtest_good" not in reg.methods
    assert [p.status for p in reg.plugins if p.plugin == "good"] == ["disabled"]


def test_incompatible_api_and_bad_search_space_are_refused(env, add_dist):
    add_dist("kdbench-future", "3.0", {"future": "kdtest_future"},
             {"kdtest_future": "KDBENCH_API = 99\n" + GOOD.replace("kdtest_good", "kdtest_future")})
    bad_space = GOOD.replace("kdtest_good", "kdtest_badspace").replace("space=(0.1, 2.0)", "space=(2.0, 0.1)")
    add_dist("kdbench-badspace", "1.0", {"badspace": "kdtest_badspace"}, {"kdtest_badspace": bad_space})
    reg = plugins.registry()
    errors = {f.dist: f.error for f in reg.failures}
    assert "targets kdbench plugin API 99" in errors["kdbench-future"]
    assert "method 'kdtest_badspace': w: search space (2.0, 0.1) is empty" in errors["kdbench-badspace"]
    assert "kdtest_future" not in reg.methods and "kdtest_badspace" not in reg.methods


def test_unknown_name_suggests_the_closest(env):
    result = CliRunner().invoke(main, ["show", "method", "kdd"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: unknown method 'kdd'; did you mean kd")
    assert result.output.strip().endswith("? (see `kdbench list methods`)")
