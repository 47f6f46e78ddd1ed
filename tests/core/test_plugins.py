"""Plugin discovery through entry points: built-ins, broken plugins, collisions, env vars."""
import pytest
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


def test_builtin_name_taken_by_another_distribution_stays_kdbench_and_warns(env, add_dist):
    add_dist("kdbench-evil", "9.9", {"evil": "kdtest_evil"},
             {"kdtest_evil": GOOD.replace('name="kdtest_good"', 'name="kd"')})
    reg = plugins.registry()
    assert reg.methods["kd"].dist == "kdbench"  # the built-in is not shadowed
    assert reg.failures == []
    assert reg.entry("methods", "kdbench-evil:kd").dist == "kdbench-evil"
    assert reg.entry("methods", "kdbench:kd").dist == "kdbench"
    (warning,) = reg.warnings
    assert warning == ("method 'kd' is registered by kdbench 0.1.0 and kdbench-evil 9.9; 'kd' is "
                       "kdbench's own, the other is `kdbench-evil:kd` (disable it: "
                       "KDBENCH_DISABLE=kdbench-evil)")
    plugins.reset()
    listed = CliRunner().invoke(main, ["list", "methods"]).output
    assert listed.startswith(f"warning: {warning}\n")
    rows = [line.split()[0] for line in listed.splitlines() if line.strip().split(" ")[0] in ("kd", "kdbench-evil:kd")]
    assert rows == ["kd", "kdbench-evil:kd"]


LSKD = GOOD.replace('name="kdtest_good"', 'name="kdtest_lskd"')


def test_contested_name_is_refused_at_use_naming_both_and_qualified_names_pick_one(env, add_dist):
    add_dist("kdbench-lskd", "1.0", {"kdtest_lskd": "kdtest_real"}, {"kdtest_real": LSKD})
    add_dist("kdbench-aaa-impostor", "6.6", {"lskd2": "kdtest_fake"},
             {"kdtest_fake": LSKD.replace("a third-party method", "an impostor")})
    reg = plugins.registry()
    assert "kdtest_lskd" not in reg.methods and reg.failures == []
    assert [e.dist for e in reg.contested["methods", "kdtest_lskd"]] == ["kdbench-aaa-impostor", "kdbench-lskd"]
    assert reg.entry("methods", "kdbench-lskd:kdtest_lskd").obj.description == "a third-party method"
    assert reg.entry("methods", "kdbench_LSKD:kdtest_lskd").dist == "kdbench-lskd"  # pip's name rules
    assert reg.entry("methods", "kdbench-aaa-impostor:kdtest_lskd").obj.description == "an impostor"
    runner = CliRunner()
    result = runner.invoke(main, ["show", "method", "kdtest_lskd"])
    assert result.exit_code == 1
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert error == ["error: method 'kdtest_lskd' is registered by 2 distributions, kdbench-aaa-impostor "
                     "6.6 and kdbench-lskd 1.0: name the one you mean, `kdbench-aaa-impostor:kdtest_lskd` "
                     "or `kdbench-lskd:kdtest_lskd`, or uninstall or disable the other (e.g. "
                     "KDBENCH_DISABLE=kdbench-lskd)"]
    shown = runner.invoke(main, ["show", "method", "kdbench-lskd:kdtest_lskd"])
    assert shown.exit_code == 0 and "a third-party method  (kdbench-lskd 1.0)" in shown.output
    # the warning on every command that loads the plugins, one line
    plugins.reset()
    listed = runner.invoke(main, ["list", "methods"])
    warnings = [line for line in listed.output.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: method 'kdtest_lskd' is registered by kdbench-aaa-impostor 6.6 and "
                        "kdbench-lskd 1.0; plain 'kdtest_lskd' is refused until one is uninstalled or "
                        "disabled (KDBENCH_DISABLE=DIST) — use `kdbench-aaa-impostor:kdtest_lskd` or "
                        "`kdbench-lskd:kdtest_lskd`"]
    names = [line.split()[0] for line in listed.output.splitlines() if "kdtest_lskd" in line and not line.startswith("warning")]
    assert names == ["kdbench-aaa-impostor:kdtest_lskd", "kdbench-lskd:kdtest_lskd"]
    # the plan (what run, tune and bench use) takes the qualified name; the unknown one is explained
    from kdbench.core.plan import RunConfig, make_plan

    plan = make_plan(RunConfig(method="kdbench-lskd:kdtest_lskd"), plugins.registry())
    assert plan.method.dist == "kdbench-lskd"
    unknown = runner.invoke(main, ["show", "method", "kdbench-lskd:nope"])
    assert "error: unknown method 'kdbench-lskd:nope': kdbench-lskd registers no method 'nope' " \
           "(its methods: kdbench-lskd:kdtest_lskd)" in unknown.output
    # disabling one settles it: the plain name works again and the warning is gone
    disabled = runner.invoke(main, ["plugins", "--disable", "kdbench-aaa-impostor"])
    assert "warning" not in disabled.output


def test_same_name_twice_in_one_distribution_is_refused(env, add_dist):
    add_dist("kdbench-twice", "1.0", {"one": "kdtest_one", "two": "kdtest_two"},
             {"kdtest_one": GOOD, "kdtest_two": GOOD})
    reg = plugins.registry()
    assert reg.methods["kdtest_good"].plugin == "one"
    (failure,) = reg.failures
    assert failure.plugin == "two"
    assert failure.error == ("method 'kdtest_good' is already provided by one of the same distribution "
                             "(kdbench-twice); refused (rename one)")


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


def test_a_selection_naming_no_installed_plugin_is_warned_about(env, add_dist, monkeypatch):
    """A typo in --disable or KDBENCH_DISABLE/KDBENCH_PLUGINS would leave the plugin it meant as it
    was without a word: each unknown name is one warning, a known one (entry point or
    distribution) none."""
    add_dist("kdbench-good", "1.0", {"good": "kdtest_good"}, {"kdtest_good": GOOD})
    monkeypatch.setenv("KDBENCH_DISABLE", "good,kdbench-goood")
    reg = plugins.load(disable=["kdbench-good", "nosuch"])
    assert "kdtest_good" not in reg.methods
    unknown = [w for w in reg.warnings if "which is no installed plugin" in w]
    assert [w.split(" which")[0] for w in unknown] == ["--disable names 'nosuch',",
                                                       "KDBENCH_DISABLE names 'kdbench-goood',"]
    assert "builtin-methods" in unknown[0] and "kdbench-good" in unknown[0]
    monkeypatch.delenv("KDBENCH_DISABLE")
    monkeypatch.setenv("KDBENCH_PLUGINS", "kdbench-good")
    assert not [w for w in plugins.load().warnings if "which is no installed plugin" in w]


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


def test_unknown_name_mentions_the_failed_plugin_that_may_provide_it(env, add_dist):
    add_dist("kdbench-lskd", "1.0", {"lskd": "kdtest_broken"}, {"kdtest_broken": "import no_such_module_anywhere\n"})
    result = CliRunner().invoke(main, ["show", "method", "lskd"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: unknown method 'lskd'; did you mean kd or rkd or dkd? (see `kdbench list methods`); it may come from a plugin that failed "
        "to load: lskd (kdbench-lskd 1.0): import failed: ModuleNotFoundError: No module named "
        "'no_such_module_anywhere'")
    other = CliRunner().invoke(main, ["show", "method", "zzz"])
    assert other.output.strip().endswith(
        "(see `kdbench list methods`); 1 plugin(s) failed to load and may provide it: lskd "
        "(kdbench-lskd 1.0): import failed: ModuleNotFoundError: No module named 'no_such_module_anywhere'")


EMPTY = {
    "nohooks": ("def register_methods(register):\n    pass\n",
                "implements none of kdbench's hooks (register_methods, register_models, register_datasets, register_leaderboards) "
                "— mark them with @kdbench.hookimpl"),
    "registers_nothing": ("from kdbench import hookimpl\n@hookimpl\ndef register_methods(register):\n    pass\n",
                          "register_methods registered nothing — call register(...) once per thing it provides"),
}


@pytest.mark.parametrize("case", sorted(EMPTY))
def test_entry_point_that_registers_nothing_is_shown_empty_with_a_warning(env, add_dist, case):
    src, why = EMPTY[case]
    add_dist("kdbench-empty", "0.1", {"empty": "kdtest_empty"}, {"kdtest_empty": src})
    reg = plugins.registry()
    assert reg.failures == []
    assert reg.warnings == [f"plugin empty (kdbench-empty 0.1, module kdtest_empty) {why}"]
    plugins.reset()
    out = CliRunner().invoke(main, ["plugins"]).output
    (row,) = [line for line in out.splitlines() if line.startswith("empty ")]
    assert row.split()[3] == "empty"
    assert f"warning: plugin empty (kdbench-empty 0.1, module kdtest_empty) {why}" in out


BAD_HOOKS = {
    "argument": ("def register_methods(regster):\n    pass\n",
                 "register_methods(regster): a kdbench hook takes one argument, named `register`"),
    "hook name": ("def register_method(register):\n    pass\n",
                  "register_method is not a kdbench hook (kdbench's hooks: register_methods, "
                  "register_models, register_datasets, register_leaderboards); rename it or drop its @hookimpl"),
}


@pytest.mark.parametrize("case", sorted(BAD_HOOKS))
def test_misdeclared_hook_is_one_line(env, add_dist, case):
    src, error = BAD_HOOKS[case]
    add_dist("kdbench-hooky", "0.1", {"hooky": "kdtest_hooky"},
             {"kdtest_hooky": "from kdbench import hookimpl\n@hookimpl\n" + src})
    (failure,) = plugins.registry().failures
    assert failure.error == error
    listed = CliRunner().invoke(main, ["list", "methods"]).output
    assert f"  hooky (kdbench-hooky 0.1): {error}\n" in listed
