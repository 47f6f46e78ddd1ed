"""MLflow tracking: one experiment per dataset, a run per trained network, metrics per epoch.

Everything goes through ``MlflowClient`` with explicit run ids (no global active run), so a
run can be finished as FAILED with its reason whatever happened in between.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

EXPERIMENT_PREFIX = "kdbench/"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def _quiet() -> None:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow  # noqa: F401  (configures its loggers on import; quieten them after)

    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


@dataclass
class Tracker:
    uri: str

    def __post_init__(self):
        _quiet()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)

    def experiment_id(self, dataset: str) -> str:
        name = EXPERIMENT_PREFIX + dataset
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # created concurrently by another process
            return self.client.get_experiment_by_name(name).experiment_id

    def start(self, dataset: str, run_name: str, tags: dict, params: dict) -> str:
        from mlflow.entities import Param, RunTag

        run = self.client.create_run(self.experiment_id(dataset), run_name=run_name)
        run_id = run.info.run_id
        self.client.log_batch(
            run_id,
            params=[Param(k, _param(v)) for k, v in params.items()],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )
        return run_id

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(batch), 900):
            self.client.log_batch(run_id, metrics=batch[i : i + 900])

    def epoch_logger(self, run_id: str, then: Callable) -> Callable:
        """An ``on_epoch`` that logs the epoch's metrics on ``run_id`` (step = epoch), then calls ``then``."""

        def log(epoch_log) -> None:
            self.log_metrics(run_id, epoch_log.metrics, step=epoch_log.epoch)
            then(epoch_log)

        return log

    def set_tags(self, run_id: str, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
        if reason:
            self.set_tags(run_id, {"failure_reason": reason[:4000]})
        self.client.set_terminated(run_id, status=status)

    def search(self, dataset: str | None, filter_string: str = "", max_results: int = 5000):
        """Runs of one dataset's experiment (or all kdbench experiments) as MLflow Run objects."""
        if dataset is None:
            exps = [e.experiment_id for e in self.client.search_experiments()
                    if e.name.startswith(EXPERIMENT_PREFIX)]
        else:
            exp = self.client.get_experiment_by_name(EXPERIMENT_PREFIX + dataset)
            exps = [exp.experiment_id] if exp else []
        if not exps:
            return []
        return self.client.search_runs(exps, filter_string=filter_string, max_results=max_results)

    def run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:
            return False


def failure_reason(exc: BaseException) -> str:
    """How a failed run's ``failure_reason`` names the exception that ended it."""
    return f"{type(exc).__name__}: {exc}"


def _param(value) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
