"""Leaderboard rendering: one table per recipe, no spread for a single seed, suite runs made by
hand get the suite's tag, and the figures carry their reference lines."""
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from kdbench.cli import main
from kdbench.workflows.leaderboard import (aggregate, display_frame, paired_differences, paired_p, pareto_front,
                                           plots, recipe_label, to_text)


def _rows(recipe_hash, recipe, acc):
    rows = []
    for method, values in acc.items():
        for seed, v in enumerate(values):
            rows.append({"run_id": f"{recipe_hash}{method}{seed}", "dataset": "d",
                         "teacher": "" if method == "vanilla" else "T", "student": "S", "method": method,
                         "seed": seed, "recipe_hash": recipe_hash, "recipe": recipe,
                         "config_hash": f"{recipe_hash}{method}{seed}", "start_time": seed, "test_top1": v,
                         "test_top1_bestval": v, "teacher_test_top1": 0.9, "flops_student": 1000.0,
                         "train_seconds": 2.0 + seed})
    return rows


def test_recipes_are_never_ranked_together_and_one_seed_shows_no_spread():
    long = _rows("r20", "20 epochs, adam", {"vanilla": [0.70, 0.72, 0.71], "kd": [0.80, 0.81, 0.79]})
    short = _rows("r5", "5 epochs, adam", {"kd": [0.799]})  # e.g. a tuning retrain
    tables = aggregate(pd.DataFrame(long + short))
    assert sorted(tables) == [("d", "T", "S", "r20"), ("d", "T", "S", "r5")]
    assert list(tables[("d", "T", "S", "r20")].method) == ["kd", "vanilla"]
    assert list(tables[("d", "T", "S", "r5")].method) == ["kd"]
    text = to_text(tables)
    assert "d: T → S · recipe 20 epochs, adam [r20]" in text and "d: T → S · recipe 5 epochs, adam [r5]" in text
    one_seed = display_frame(tables[("d", "T", "S", "r5")])
    assert one_seed["test top-1 % (last)"].iloc[0] == "79.90"  # not "79.90 ± 0.00" or "± nan"
    three = display_frame(tables[("d", "T", "S", "r20")])
    assert three["test top-1 % (last)"].iloc[0] == "80.00 ± 1.00"


def test_recipe_label_from_run_params():
    params = {"recipe.epochs": "20", "recipe.optimizer": "adam", "recipe.lr": "0.01", "recipe.batch_size": "64",
              "recipe.schedule": "cosine", "hp.T": "4"}
    assert recipe_label(params) == "20 epochs, adam, lr 0.01, batch 64, cosine"
    assert recipe_label({}) == ""


def test_pareto_front_keeps_only_undominated_points():
    points = [(1, 80, "a"), (2, 79, "b"), (2, 85, "c"), (3, 85, "d"), (4, 90, "e")]
    assert [p[2] for p in pareto_front(points)] == ["a", "c", "e"]


def test_bar_chart_draws_vanilla_and_teacher_lines(monkeypatch):
    import matplotlib.axes

    lines = []
    real = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline",
                        lambda self, y=0, *a, **kw: lines.append((round(y, 6), kw.get("label"))) or real(self, y, *a, **kw))
    tables = aggregate(pd.DataFrame(_rows("r", "", {"vanilla": [0.70, 0.72, 0.71], "kd": [0.80, 0.81, 0.79]})))
    images = plots(tables)
    assert sorted(images) == ["bars_d_T_S_r.png", "curves_d_T_S_r.png", "pareto.png"]
    assert (71.0, "vanilla 71.00 %") in lines and (90.0, "teacher 90.00 %") in lines


def test_leaderboard_tags_hand_made_suite_runs(suite, env):
    runner = CliRunner()
    # two of the suite's cells, made by hand: same config hashes as the cells, no suite tag
    for args in (["--method", "vanilla"], ["--method", "kd", "--set", "T=2", "--teacher-checkpoint", "t.pt"]):
        made = runner.invoke(main, ["run", *args, "--epochs", "1", "--seed", "0"])
        assert made.exit_code == 0, made.output
    client = MlflowClient(f"sqlite:///{env}/mlflow.db")
    (exp,) = [e for e in client.search_experiments() if e.name == "kdbench/mnist1d"]
    runs = client.search_runs([exp.experiment_id], "tags.role = 'student'")
    assert len(runs) == 2 and not any("leaderboard" in r.data.tags for r in runs)
    shown = runner.invoke(main, ["leaderboard", str(suite), "--no-summary"])
    assert shown.exit_code == 0, shown.output
    assert "vanilla" in shown.output and "kd" in shown.output
    found = client.search_runs([exp.experiment_id], "tags.leaderboard = 'tiny'")
    assert sorted(r.info.run_id for r in found) == sorted(r.info.run_id for r in runs)


def test_pairing_by_seed_and_its_fallbacks():
    from scipy import stats

    a, b = {0: 0.80, 1: 0.81, 2: 0.79, 3: 0.5}, {0: 0.70, 1: 0.72, 2: 0.71}
    assert paired_differences(a, b) == pytest.approx([0.10, 0.09, 0.08])  # seed 3 has no partner
    p, test = paired_p(a, b)
    assert test == "paired" and p == pytest.approx(stats.ttest_rel([0.80, 0.81, 0.79], [0.70, 0.72, 0.71]).pvalue)
    assert paired_p({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6}) == (1.0, "paired")  # identical: tied
    assert paired_p({0: 0.6, 1: 0.7}, {0: 0.5, 1: 0.6}) == (0.0, "paired")  # a constant shift: not tied
    p, test = paired_p({0: 0.80, 1: 0.82}, {5: 0.70, 6: 0.73})  # no common seed: Welch
    assert test == "Welch" and p == pytest.approx(stats.ttest_ind([0.80, 0.82], [0.70, 0.73], equal_var=False).pvalue)
    # Δ vs vanilla without a common seed: the difference of the means, no std
    rows = _rows("r", "", {"vanilla": [0.70, 0.72]}) + [
        {**row, "seed": row["seed"] + 10} for row in _rows("r", "", {"kd": [0.80, 0.82]})]
    (table,) = aggregate(pd.DataFrame(rows)).values()
    by_method = table.set_index("method")
    assert by_method.loc["kd", "delta_vs_vanilla"] == pytest.approx(0.10) and pd.isna(by_method.loc["kd", "delta_std"])
    assert by_method.loc["vanilla", "test"] == "Welch"  # compared with the best (kd) without a common seed
