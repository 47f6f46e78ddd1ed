"""Every registered method runs end to end through the CLI on the embedded default and is recorded."""
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from kdbench.core import plugins
from kdbench.cli import main

METHODS = sorted(plugins.load().methods)


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_one_epoch_through_the_cli(env, method):
    result = CliRunner().invoke(main, ["run", "--method", method, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{env}/mlflow.db")
    exp = client.get_experiment_by_name("kdbench/mnist1d")
    (run,) = client.search_runs([exp.experiment_id], f"tags.method = '{method}'")
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert 0.0 <= m["test_top1"] <= 1.0 and m["best_val_epoch"] == 1
    assert m["params_extra"] >= 0 and m["params_student"] == 3034
