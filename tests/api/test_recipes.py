"""Recipes as data: per-model learning rates reach the run, --recipe replaces the student's recipe
(never the teacher's), and the resolved recipe is what is hashed and recorded."""

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from kdbench.core import plugins
from kdbench.cli import main
from kdbench.contracts import Recipe
from kdbench.errors import KdbenchError
from kdbench.core.plan import RunConfig, make_plan
from kdbench.recipes import load_recipe


def plan_for(**config):
    return make_plan(RunConfig(**config), plugins.registry())


def test_per_model_lr_reaches_the_plan_like_the_reference(env):
    # RepDistiller trains MobileNetV2/ShuffleNet at 0.01, everything else at 0.05 (batch 64)
    mobile = plan_for(method="kd", dataset="cifar100", teacher="resnet32x4", student="mobilenetv2")
    assert (mobile.recipe.lr, mobile.teacher_recipe.lr) == (0.01, 0.05)
    wide = plan_for(method="kd", dataset="cifar100", teacher="resnet32x4", student="resnet8x4")
    assert (wide.recipe.lr, wide.teacher_recipe.lr) == (0.05, 0.05)
    shuffle = plan_for(method="vanilla", dataset="cifar100", student="shufflenetv2")
    assert shuffle.recipe.lr == 0.01
    # the table is for students: a MobileNetV2 *teacher* trains at 0.05, as in RepDistiller's train_teacher.py
    mobile_teacher = plan_for(method="kd", dataset="cifar100", teacher="mobilenetv2", student="resnet8")
    assert (mobile_teacher.teacher_recipe.lr, mobile_teacher.recipe.lr) == (0.05, 0.05)
    assert mobile_teacher.teacher_key() == plan_for(method="kd", dataset="cifar100", teacher="mobilenetv2",
                                                    student="wrn_16_2").teacher_key()
    # what is recorded and hashed is the lr used, not the table
    assert mobile.params()["recipe.lr"] == 0.01 and "recipe.model_lr" not in mobile.params()
    assert mobile.recipe.model_lr == () and "model_lr" not in mobile.recipe.as_dict()
    # an extra teacher is trained like the main one
    extra = plan_for(method="multi_teacher", dataset="cifar100", teacher="resnet32x4", student="resnet8x4",
                     teachers=("mobilenetv2",))
    assert extra.for_teacher(extra.extra_teachers[0]).teacher_recipe == extra.teacher_recipe


def test_a_datasets_teacher_recipe_gets_its_own_per_model_lr(env):
    from dataclasses import replace

    from kdbench.core.plan import teacher_recipe_of

    ds = plugins.registry().dataset("cifar100")
    teacher_table = Recipe(epochs=3, batch_size=32, lr=0.1, model_lr=(("vgg13", 0.02),))
    with_teacher = replace(ds, teacher_recipe=teacher_table)
    assert teacher_recipe_of(with_teacher, "vgg13").lr == 0.02 and teacher_recipe_of(with_teacher, "resnet56").lr == 0.1
    assert teacher_recipe_of(ds, "mobilenetv2").lr == 0.05 and teacher_recipe_of(ds, "mobilenetv2").model_lr == ()


def test_named_recipe_replaces_the_students_only(env):
    std = plan_for(method="kd", dataset="cifar100", teacher="resnet32x4", student="mobilenetv2")
    fast = plan_for(method="kd", dataset="cifar100", teacher="resnet32x4", student="mobilenetv2",
                    recipe_name="cifar100-fast")
    assert (fast.recipe.lr, fast.recipe.batch_size, fast.recipe.epochs, fast.recipe.schedule) == (0.04, 256, 60, "cosine")
    assert fast.teacher_recipe == std.teacher_recipe and fast.teacher_key() == std.teacher_key()
    assert fast.config_hash("t") != std.config_hash("t")
    assert plan_for(method="kd", dataset="cifar100", student="resnet8x4", recipe_name="cifar100-fast",
                    recipe={"epochs": 6}).recipe.epochs == 6
    with pytest.raises(KdbenchError, match="unknown recipe 'cifar100-fats'.*cifar100-fast"):
        plan_for(method="kd", recipe_name="cifar100-fats")


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
