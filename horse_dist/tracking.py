"""Experiment tracking (rank 0 only). A tracking failure is logged once and training goes on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MLflowTracker:
    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> None:
        import mlflow

        self._mlflow = mlflow
        self._broken = False
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run_name, tags=tags)
        self.run_id = self.run.info.run_id

    def _safely(self, what: str, fn, *args, **kwargs) -> None:
        if self._broken:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # never let tracking stop training
            self._broken = True
            log.warning("MLflow %s failed (%s); tracking disabled for the rest of this run", what, err)

    def log_params(self, params: dict[str, Any]) -> None:
        clean = {k: ("" if v is None else str(v)[:500]) for k, v in params.items()}
        self._safely("log_params", self._mlflow.log_params, clean)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._safely(
            "log_metrics", self._mlflow.log_metrics, {k: float(v) for k, v in metrics.items()}, step=step
        )

    def log_artifact(self, path: str | Path) -> None:
        self._safely("log_artifact", self._mlflow.log_artifact, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self._safely("end_run", self._mlflow.end_run, status=status)


def make_tracker(enabled: bool, uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> Tracker:
    if not enabled:
        return NullTracker()
    try:
        return MLflowTracker(uri, experiment, run_name, tags)
    except Exception as err:
        log.warning("could not start MLflow tracking at %s (%s); continuing without tracking", uri, err)
        return NullTracker()
