"""Recipes as data: named recipes and recipe files, what of them is hashed and recorded (how a
plan resolves them: tests/core/test_plan.py)."""

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from kdbench.cli import main
from kdbench.contracts import Recipe
from kdbench.recipes import load_recipe


def test_recipe_without_model_lr_hashes_as_before():
    # adding the model_lr field must not change the hash of recipes that lack it (resumable suites)
    r = Recipe(epochs=20, batch_size=64, lr=0.01)
    assert "model_lr" not in r.as_dict() and r.for_model("anything") == r
    table = load_recipe("cifar100-standard")
    assert dict(table.model_lr) == {"mobilenetv2": 0.01, "shufflenetv1": 0.01, "shufflenetv2": 0.01}
    assert table.for_model("shufflenetv1").lr == 0.01 and table.for_model("resnet56").lr == 0.05


def test_run_with_a_recipe_file_is_recorded_in_mlflow(env):
    recipe = env / "mine.toml"
    recipe.write_text('description = "test"\n[recipe]\nlr = 0.03\nbatch_size = 200\nepochs = 1\n'
                      'optimizer = "sgd"\nschedule = "constant"\n[student_lr]\ncnn1d_2x16 = 0.02\n')
    result = CliRunner().invoke(main, ["run", "--method", "vanilla", "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{env}/mlflow.db")
    exp = client.get_experiment_by_name("kdbench/mnist1d")
    (run,) = client.search_runs([exp.experiment_id], "tags.role = 'student'")
    p = run.data.params
    assert (p["recipe.lr"], p["recipe.batch_size"], p["recipe.epochs"], p["recipe.schedule"]) == ("0.02", "200", "1", "constant")
    # 3600 training samples at batch 200: 18 full steps, so throughput counts 3600 samples
    assert run.data.metrics["throughput"] == pytest.approx(3600 / run.data.metrics["train_seconds"])
    bad = CliRunner().invoke(main, ["run", "--recipe", str(env / "missing.toml")])
    assert bad.exit_code == 1 and bad.output.strip().count("\n") == 0 and "does not exist" in bad.output


def test_embedded_recipe_is_data_and_unchanged():
    # the embedded leaderboard resumes by config hash: the recipe moved to a file, its values did not
    from kdbench_builtin.datasets.mnist1d import DATASETS

    literal = Recipe(epochs=20, batch_size=64, lr=0.01, optimizer="adam", weight_decay=0.0, schedule="cosine")
    assert load_recipe("mnist1d-embedded") == literal and DATASETS[0].recipe == literal
    assert load_recipe("mnist1d-embedded").as_dict() == literal.as_dict()


def test_list_recipes_shows_each_with_its_per_model_lr(env):
    out = CliRunner().invoke(main, ["list", "recipes"]).output
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(lines) == {"cifar100-fast", "cifar100-standard", "mnist1d-embedded"}
    assert "mobilenetv2 0.01" in lines["cifar100-standard"] and "mobilenetv2 0.04" in lines["cifar100-fast"]
