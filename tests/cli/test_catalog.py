"""`kdbench list`, `show`, `plugins` and `plugin check`: what they print, and how they end when
the reader of their output goes away."""
import os
import subprocess
import sys

from click.testing import CliRunner

from kdbench.cli import main


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_show_model_lists_taps_with_modules_and_shapes(env):
    result = invoke("show", "model", "cnn1d_4x32")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[2] == "taps (built for mnist1d, input (1, 40); name them in Method.taps):"
    taps = {line.split()[0]: line for line in lines[3:]}
    assert list(taps) == ["stage1", "stage2", "stage1_pre", "stage2_pre", "pool"]
    assert taps["stage1"].split()[1:] == ["stage1", "(32,", "20)"]
    assert taps["pool"].split()[1:] == ["input", "of", "fc", "(320,)"]
    # a CIFAR network refuses the 1-D data and is shown on the first dataset it builds for
    wrn = invoke("show", "model", "wrn_16_2").output.splitlines()
    assert wrn[2].startswith("taps (built for cifar100, input (3, 32, 32)")
    assert any(line.split()[:2] == ["stage3", "block3"] and line.endswith("(128, 8, 8)") for line in wrn)
    small = invoke("show", "model", "cnn1d_2x16", "--dataset", "mnist1d").output
    assert "taps (built for mnist1d" in small
    assert "fused as a frozen teacher" not in small  # cnn1d has no Model.fuse; the CIFAR ResNets do
    assert invoke("show", "model", "resnet32x4").output.splitlines()[2].startswith("fused as a frozen teacher at bf16")


def test_plugin_check_method_takes_the_pair_like_the_python_kit(env):
    result = invoke("plugin", "check", "method", "kd", "--trials", "2", "--set", "T=2",
                    "--teacher", "cnn1d_2x16", "--student", "cnn1d_2x8", "--dataset", "mnist1d")
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("ok: method 'kd' conforms to the kdbench plugin contract")
    bad_set = invoke("plugin", "check", "method", "kd", "--trials", "2", "--set", "T=-1")
    assert bad_set.exit_code == 1 and "T" in bad_set.output and bad_set.output.startswith("error: does not conform: method 'kd': ")
    result = invoke("plugin", "check", "method", "vanilla", "--trials", "2",
                    "--teacher", "cnn1d_2x16", "--student", "cnn1d_2x8", "--dataset", "mnist1d")
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("ok: method 'vanilla' conforms to the kdbench plugin contract")
    bad = invoke("plugin", "check", "method", "vanilla", "--trials", "2", "--student", "resnet8")
    assert bad.exit_code == 1 and bad.output.startswith("error: does not conform: method 'vanilla': cannot ")
    wrong = invoke("plugin", "check", "model", "cnn1d_2x8", "--student", "cnn1d_2x8")
    assert wrong.output == "error: --student apply to `kdbench plugin check method`, not to a model\n"


def test_a_closed_pipe_ends_quietly(env):
    """`kdbench list | head -1`: the reader is gone before kdbench writes; no `error:` line."""
    proc = subprocess.Popen([sys.executable, "-m", "kdbench", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert stderr == ""


def test_show_method_shows_a_combination_as_run_builds_it(env):
    out = invoke("show", "method", "at+kd")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("defaults for"))
    names = [line.split()[0] for line in lines[:header] if line.startswith("  ")]
    assert names == ["at.p", "at.beta", "at.mapping", "at.ce_weight", "kd.T", "kd.alpha"]
    # at's per-dataset defaults, namespaced as a run of at+kd applies them (kd declares none)
    assert lines[header + 1:] == ["  mnist1d * -> *                       at.p=1.0, at.beta=11.5  "
                                  "(kdbench tune on the mnist1d validation split (20 trials))"]
    bad = invoke("show", "method", "at+nosuch")
    assert bad.exit_code != 0 and bad.output.strip().splitlines() == [
        "error: unknown method 'nosuch' (see `kdbench list methods`)"]


def test_show_method_lists_its_defaults_per_dataset_and_pair_in_match_order(env):
    """dkd's defaults_for (mdistiller's per-pair beta): one line each, in the order a run matches
    them; a method without any shows no such block."""
    from kdbench.core import plugins

    out = invoke("show", "method", "dkd")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("defaults for"))
    declared = plugins.registry().methods["dkd"].obj.defaults_for
    shown = lines[header + 1:]
    assert len(shown) == len(declared) >= 2
    for line, entry in zip(shown, declared):
        assert line.split()[:4] == [entry.dataset, entry.teacher, "->", entry.student]
        assert f"({entry.source})" in line
    assert "cifar100 resnet56 -> resnet20" in shown[1] and "beta=2.0" in shown[1]
    assert not any(line.startswith("defaults for") for line in invoke("show", "method", "kd").output.splitlines())
