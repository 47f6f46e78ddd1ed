"""Leaderboard suites: the shipped suites load; bad definitions are refused in one line."""
import pytest

from kdbench.errors import KdbenchError
from kdbench.workflows import bench, suites


def test_suite_file_is_read_and_checked(suite):
    s = suites.load_suite(str(suite))
    assert [m.name for m in s.methods] == ["vanilla", "kd"] and s.methods[1].tune_trials == 7
    # bad definitions: fewer than 3 seeds
    suite.write_text(suite.read_text().replace("seeds = [0, 1, 2]", "seeds = [0, 1]"))
    with pytest.raises(KdbenchError, match="at least 3 distinct seeds"):
        suites.load_suite(str(suite))


def test_shipped_suites_load(env):
    # the shipped suites load; the CIFAR one has 13 pairs, every method and published numbers
    emb = suites.load_suite("embedded")
    assert len(bench.plan_cells(emb)) == 3 * len(emb.methods) and "vanilla" in [m.name for m in emb.methods]
    rep = suites.load_suite("cifar100-repdistiller")
    assert len(rep.pairs) == 13 and rep.published["resnet32x4->resnet8x4"]["kd"] == 73.33
    fast = suites.load_suite("cifar100-fast")
    assert fast.recipe_for("resnet8x4")["epochs"] == 60 and fast.recipe_for("shufflenetv2")["lr"] == 0.04
