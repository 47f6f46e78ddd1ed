"""Recipes as data: named recipes and recipe files, what of them is hashed and recorded (how a
plan resolves them: tests/core/test_plan.py)."""

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from kdbench.cli import main
from kdbench.contracts import Recipe
from kdbench.errors import KdbenchError
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


GOOD = '[recipe]\nlr = 0.03\nbatch_size = 200\nepochs = 1\noptimizer = "sgd"\nschedule = "constant"\n'


@pytest.mark.parametrize("old, new, message", [
    ("lr = 0.03", 'lr = "fast"', "[recipe] lr must be a number > 0, got 'fast'; fix lr"),
    ("lr = 0.03", "lr = -0.01", "[recipe] lr must be a number > 0, got -0.01; fix lr"),
    ("lr = 0.03", "lr = nan", "[recipe] lr must be a number > 0, got nan; fix lr"),
    ("batch_size = 200", "batch_size = 0", "[recipe] batch_size must be a whole number >= 1, got 0; fix batch_size"),
    ("batch_size = 200", "batch_size = 2.5", "[recipe] batch_size must be a whole number >= 1, got 2.5"),
    ("epochs = 1", 'epochs = "x"', "[recipe] epochs must be a whole number >= 1, got 'x'; fix epochs"),
    ("epochs = 1", "epochs = 0", "[recipe] epochs must be a whole number >= 1, got 0; fix epochs"),
    ('"constant"', '"cosin"', "schedule must be one of multistep, cosine, constant, got 'cosin' (did you mean cosine?)"),
    ('"sgd"', '"adm"', "[recipe] optimizer must be one of sgd, adam, adamw, got 'adm' (did you mean adam or adamw?)"),
    ('"sgd"', "3", "[recipe] optimizer must be one of sgd, adam, adamw, got 3; fix optimizer"),
    ("lr = 0.03", "lr = 0.03\nmomentum = -0.9", "[recipe] momentum must be a number >= 0, got -0.9; fix momentum"),
    ("lr = 0.03", "lr = 0.03\nweight_decay = -1", "[recipe] weight_decay must be a number >= 0, got -1"),
    ("lr = 0.03", "lr = 0.03\nnesterov = 1", "[recipe] nesterov must be true or false, got 1; fix nesterov"),
    ("lr = 0.03", 'lr = 0.03\nmilestones = ["a"]', "[recipe] milestones must be a list of whole numbers >= 0"),
    ("lr = 0.03", "lr = 0.03\ngamma = 0", "[recipe] gamma must be a number > 0, got 0; fix gamma"),
    ("lr = 0.03", "lr = 0.03\nshedule = 'cosine'", "unknown field 'shedule'; did you mean schedule?"),
    ("[recipe]", "[student_lr]\ncnn1d_2x16 = -1\n[recipe]", "[student_lr] cnn1d_2x16 = -1: lr must be a number > 0"),
    ("[recipe]", "student_lr = 3\n[recipe]", "student_lr must be a table of model = lr, got 3"),
    ("[recipe]\n", "recipe = 3\n[other]\n", "'recipe' must be a table"),
])
def test_a_bad_recipe_value_is_refused_when_loaded_naming_the_key(tmp_path, old, new, message):
    """Checked when the file is read, so before any plan or MLflow run exists; one line."""
    assert old in GOOD
    path = tmp_path / "mine.toml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(KdbenchError) as caught:
        load_recipe(str(path))
    text = str(caught.value)
    assert text.startswith(f"recipe {str(path)!r}") and message in text and "\n" not in text, text


def test_a_binary_recipe_file_is_one_line(tmp_path):
    (tmp_path / "bin.toml").write_bytes(bytes(range(256)))
    with pytest.raises(KdbenchError, match=r"bin.toml is not a text \(UTF-8\) TOML file"):
        load_recipe(str(tmp_path / "bin.toml"))


def test_the_shipped_recipes_pass_the_checks():
    from kdbench.recipes import names

    for name in names():
        load_recipe(name)  # raises if a shipped recipe broke its own rules


@pytest.mark.parametrize("key, old, new", [("schedule", '"constant"', '"cosin"'), ("lr", "0.03", '"fast"'),
                                           ("batch_size", "200", "0")])
def test_a_bad_recipe_file_through_the_cli_is_one_line_and_records_no_run(env, key, old, new):
    """The audit's defect: `schedule = "cosin"` failed only inside training, leaving a FAILED run."""
    recipe = env / "mine.toml"
    recipe.write_text(GOOD.replace(f"{key} = {old}", f"{key} = {new}"))
    assert f"{key} = {new}" in recipe.read_text()
    result = CliRunner().invoke(main, ["run", "--method", "kd", "--recipe", str(recipe), "--epochs", "1"])
    out = result.output.strip()
    assert result.exit_code != 0 and "\n" not in out and "Traceback" not in out, out
    assert "mine.toml" in out and key in out and "failed" not in out
    client = MlflowClient(f"sqlite:///{env}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not experiments or client.search_runs(experiments) == []
