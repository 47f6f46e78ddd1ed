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


@pytest.mark.parametrize("old, new, message", [
    ("T = 2.0", "T = -1.0", "methods entry 'kd', params {'T': -1.0}: hyperparameter T=-1.0 must be > 0.0; fix its params"),
    ("T = 2.0", "Tx = 2.0", "methods entry 'kd', params {'Tx': 2.0}: method 'kd' has no hyperparameter 'Tx'"),
    ("params = {T = 2.0}", 'params = "T=2"', "methods entry 'kd': params = 'T=2' must be a table"),
    ("epochs = 1", "epochs = 0", "[recipe] epochs must be a whole number >= 1, got 0; fix epochs"),
    ("epochs = 1", "epoch = 1", "[recipe] (for cnn1d_4x32->cnn1d_2x16): recipe has no field ['epoch']"),
    ("epochs = 1", "epochs = 1\nlr = -1", "[recipe] lr must be a number > 0, got -1; fix lr"),
    ("tune_trials = 7", "tune_trials = -5", "methods entry 'kd': tune_trials = -5 must be a whole number >= 0"),
    ('teacher_sha256 = "', 'teacher_sha256 = "00', "pairs entry cnn1d_4x32->cnn1d_2x16: teacher_sha256 '00"),
    ('teacher_checkpoint = "t.pt"', 'teacher_checkpoint = "nope.pt"', "teacher_checkpoint '"),
    # wrong value types are one line naming the key and the type it needs, not a crash further on
    ("seeds = [0, 1, 2]", "seeds = [0, 1, 2]\nteacher_seed = \"zero\"", "teacher_seed must be an integer, got 'zero'"),
    ("seeds = [0, 1, 2]", 'seeds = ["a", "b", "c"]', "seeds must be a list of integers, got ['a', 'b', 'c']"),
    ("seeds = [0, 1, 2]", "seeds = 3", "seeds must be a list of integers, got 3"),
    ("methods = [", 'methods = "kd"  # [', "methods must be a list of method names or tables, got 'kd'"),
    ("methods = [", "methods = [1, ", "methods entries must be method names or tables"),
    ("epochs = 1", 'epochs = "one"', "[recipe] epochs must be a whole number >= 1, got 'one'"),
    ("epochs = 1", "epochs = 1.5", "[recipe] epochs must be a whole number >= 1, got 1.5"),
    ("epochs = 1", "epochs = 1\nbatch_size = 0", "[recipe] batch_size must be a whole number >= 1, got 0"),
    ("epochs = 1", 'epochs = 1\nlr = "fast"', "[recipe] lr must be a number > 0, got 'fast'"),
    ("epochs = 1", "epochs = 1\nmomentum = -0.5", "[recipe] momentum must be a number >= 0, got -0.5"),
    ("epochs = 1", 'epochs = 1\nschedule = "cosin"', "got 'cosin' (did you mean cosine?)"),
    ("epochs = 1", 'epochs = 1\noptimizer = "adm"', "[recipe] optimizer must be one of sgd, adam, adamw, got 'adm'"),
    ("epochs = 1", "epochs = 1\nname = 3", "[recipe] name must be a recipe name"),
    ('dataset = "mnist1d"', "dataset = 1", "dataset must be a string, got 1"),
    ('teacher = "cnn1d_4x32"', "teacher = 4", "pairs entry: teacher must be a string, got 4"),
    ('dataset = "mnist1d"', 'dataset = "mnist1d"\npublished = 3', "published must be tables"),
])
def test_a_bad_suite_is_refused_as_a_whole_naming_the_key(suite, old, new, message):
    """One line naming the file, the key and the fix, when loaded (so --dry-run too), before any cell."""
    assert old in suite.read_text()
    suite.write_text(suite.read_text().replace(old, new, 1))
    with pytest.raises(KdbenchError) as caught:
        suites.load_suite(str(suite))
    text = str(caught.value)
    assert text.startswith("leaderboard tiny.toml: ") and message in text and "\n" not in text, text
    assert "fix" in text or "must be a table" in text


def test_a_binary_suite_file_is_one_line(env):
    (env / "bin.toml").write_bytes(bytes(range(256)))
    with pytest.raises(KdbenchError, match=r"leaderboard bin.toml is not a text \(UTF-8\) TOML file"):
        suites.load_suite("bin.toml")


def test_a_bad_suite_recipe_through_the_cli_is_one_line_and_records_nothing(suite):
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from kdbench.cli import main

    suite.write_text(suite.read_text().replace("epochs = 1", 'epochs = "one"'))
    result = CliRunner().invoke(main, ["bench", str(suite)])
    out = result.output.strip()
    assert result.exit_code != 0 and "\n" not in out and "Traceback" not in out, out
    assert "tiny.toml" in out and "epochs" in out and "failed" not in out
    client = MlflowClient(f"sqlite:///{suite.parent}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not experiments or client.search_runs(experiments) == []
