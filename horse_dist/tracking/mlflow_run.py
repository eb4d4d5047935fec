"""Experiment tracking (rank 0 only). A tracking failure is logged once and training goes on.

Metrics go through MLflow's own asynchronous logging (`log_batch(..., synchronous=False)`), so a slow
tracking server never blocks a training step. At most `queue_size` metric batches are in flight: past that a
batch is dropped and counted (`tracking/dropped_batches`), which bounds both memory and how long ending the
run waits for a slow or dead server; `finish()` waits at most `flush_timeout_s` for the batches in flight
before ending the run (MLflow then finishes whatever it has already started). Params, tags and artifacts
are logged synchronously (a few calls per run).
"""

from __future__ import annotations

import logging
import os
import re
import resource
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from horse_dist.config import TrackingConfig
from horse_dist.tracking.plots import LOSS_KEYS, plot_histories

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_figure(self, figure: Any, artifact_file: str) -> None: ...
    def register_model(self, save_model: Callable[[str], Path], name: str) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        pass

    def register_model(self, save_model: Callable[[str], Path], name: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def git_commit(start: str | Path | None = None) -> str:
    """The checked-out commit of the git checkout holding `start` (this package by default), read from
    .git without running git; "unknown" outside a checkout."""
    here = Path(start or __file__).resolve()
    for folder in [here, *here.parents]:
        dot_git = folder / ".git"
        if dot_git.is_file():  # a worktree or submodule: "gitdir: PATH"
            text = dot_git.read_text().strip()
            if not text.startswith("gitdir:"):
                return "unknown"
            dot_git = (folder / text.split(":", 1)[1].strip()).resolve()
        if not dot_git.is_dir():
            continue
        try:
            head = (dot_git / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return head
            ref = head.split(":", 1)[1].strip()
            common = dot_git
            if (dot_git / "commondir").exists():
                common = (dot_git / (dot_git / "commondir").read_text().strip()).resolve()
            for base in (dot_git, common):
                if (base / ref).exists():
                    return (base / ref).read_text().strip()
            packed = common / "packed-refs"
            if packed.exists():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
        except OSError:
            pass
        return "unknown"
    return "unknown"


def registered_model_name(model_source: str, method: str) -> str:
    model = Path(model_source.rstrip("/")).name.replace(".gguf", "") or "model"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"horse_dist-{model}-{method}")


def _default_artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store beside its database file (MLflow's default is ./mlruns of the CWD)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri[len(prefix) :]).resolve().parent / "mlruns").as_uri()


def _http_settings(timeout_s: float, retries: int) -> None:
    """MLflow retries HTTP with exponential backoff for minutes by default; the user's env still wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, timeout_s))))


class MLflowTracker:
    """One MLflow run (a child run when `parent_run_id` is given): started with `mlflow.start_run`, logged
    through an MlflowClient bound to `uri`."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        tags: dict[str, str],
        *,
        parent_run_id: str | None = None,
        artifact_location: str = "",
        system_metrics: bool = False,
        system_metrics_interval_s: float = 10.0,
        queue_size: int = 1000,
        flush_timeout_s: float = 30.0,
        http_timeout_s: float = 10.0,
        http_retries: int = 1,
    ) -> None:
        from mlflow import MlflowClient

        if uri.startswith(("http://", "https://")):
            _http_settings(http_timeout_s, http_retries)
        self.uri = uri
        # The registry explicitly too: MlflowClient would otherwise take a process-wide registry URI.
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            location = artifact_location or _default_artifact_location(uri)
            experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        self.experiment_id = experiment_id
        self._fluent = False  # started by mlflow.start_run, so ended by mlflow.end_run
        self.run = self._start_run(
            {"git_commit": git_commit(), **tags},
            run_name,
            parent_run_id,
            system_metrics,
            system_metrics_interval_s,
        )
        self.run_id = self.run.info.run_id
        self._broken = False
        self._finished = False
        self.dropped = 0
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._max_in_flight = max(1, queue_size)
        self._in_flight = 0
        self._settled = threading.Condition()
        self._flush_timeout_s = flush_timeout_s
        # one thread waits on MLflow's RunOperations in order, to count the batches still in flight
        self._watcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics")

    def _start_run(
        self,
        tags: dict[str, str],
        run_name: str,
        parent_run_id: str | None,
        system_metrics: bool,
        system_metrics_interval_s: float,
    ) -> Any:
        """The run as MLflow's docs start one, `mlflow.start_run`: it adds the standard tags (mlflow.source.*,
        mlflow.user, the git commit) and, with system metrics, runs MLflow's own monitor until `end_run`
        (nested under the parent when the parent is this thread's active run). Metrics, params and
        artifacts then go through `self.client`, metrics asynchronously. When another run of
        this thread is active and is not the parent (two jobs in one process), the run is created beside it
        with the client and the same standard tags instead."""
        import mlflow
        from mlflow.tracking.context.registry import resolve_tags

        active = mlflow.active_run()
        if active is None or (parent_run_id and active.info.run_id == parent_run_id):
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_registry_uri(self.uri)
            if system_metrics:
                mlflow.set_system_metrics_sampling_interval(system_metrics_interval_s)
            run = mlflow.start_run(
                experiment_id=self.experiment_id,
                run_name=run_name,
                tags=tags,
                nested=active is not None,
                parent_run_id=parent_run_id or None,
                log_system_metrics=system_metrics,
            )
            self._fluent = True
            return run
        if parent_run_id:
            tags = {**tags, PARENT_TAG: parent_run_id}
        return self.client.create_run(self.experiment_id, run_name=run_name, tags=resolve_tags(tags))

    # -- helpers --------------------------------------------------------------------------------------
    def _safely(self, what: str, fn, *args, **kwargs) -> Any:
        if self._broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # never let tracking stop training
            self._broken = True
            log.warning("MLflow %s failed (%s); tracking disabled for the rest of this run", what, err)
            return None

    def _settle(self, operation: Any) -> None:
        """Wait for one asynchronous batch; a failure disables tracking, as a synchronous one would."""
        try:
            operation.wait()
        except Exception as err:
            if not self._broken:
                self._broken = True
                log.warning("MLflow log_metrics failed (%s); tracking disabled for the rest of this run", err)
        finally:
            self._release()

    def _release(self) -> None:
        """One batch fewer in flight (done, failed or refused)."""
        with self._settled:
            self._in_flight -= 1
            self._settled.notify_all()

    # -- Tracker --------------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        clean = [Param(k, "" if v is None else str(v)[:500]) for k, v in params.items()]
        for start in range(0, len(clean), 100):  # MLflow's per-batch params limit
            self._safely("log_params", self.client.log_batch, self.run_id, params=clean[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        values = {k: float(v) for k, v in metrics.items()}
        for key in values:
            if key in LOSS_KEYS or key.startswith("eval/"):
                self.history.setdefault(key, []).append((step, values[key]))
        if self._broken or self._finished:
            return
        with self._settled:
            if self._in_flight >= self._max_in_flight:
                self.dropped += 1
                return
            self._in_flight += 1
        stamp = int(time.time() * 1000)
        entries = [Metric(k, v, stamp, step) for k, v in values.items()]
        operation = self._safely(
            "log_metrics", self.client.log_batch, self.run_id, metrics=entries, synchronous=False
        )
        if operation is None:  # refused at once (tracking is now off)
            self._release()
            return
        self._watcher.submit(self._settle, operation)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._safely("log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._safely("set_tag", self.client.set_tag, self.run_id, key, str(value))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self._safely("log_figure", self.client.log_figure, self.run_id, figure, artifact_file)

    def register_model(self, save_model: Callable[[str], Path], name: str) -> None:
        """Log the model `save_model(folder)` writes into a temporary folder (the job's pyfunc model:
        training/mlflow_model.py) under `hypernetwork/` and register it as a new version of `name`."""
        if self._broken:
            return
        self._safely("log_model", self._log_model, save_model)
        if self._broken:
            return
        self._safely("register_model", self._register, "hypernetwork", name)

    def _log_model(self, save_model: Callable[[str], Path]) -> None:
        with tempfile.TemporaryDirectory(prefix="horse_dist_pyfunc_") as folder:
            model_dir = save_model(folder)
            self.client.log_artifacts(self.run_id, str(model_dir), "hypernetwork")

    def _register(self, artifact: str, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                name, description="HORSE/MALMEN hypernetwork checkpoints (horse_dist)"
            )
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        source = f"{self.run.info.artifact_uri.rstrip('/')}/{artifact}"
        version = self.client.create_model_version(
            name, source=source, run_id=self.run_id, tags={"checkpoint": artifact}
        )
        self.set_tags({"registered_model": f"{name}/{version.version}"})
        log.info("registered %s version %s (%s)", name, version.version, source)

    def finish(self, status: str = "FINISHED") -> None:
        if self._finished:
            return
        self._finished = True
        with self._settled:
            self._settled.wait_for(lambda: self._in_flight == 0, timeout=self._flush_timeout_s)
            left = self._in_flight
        self._watcher.shutdown(wait=False)
        if left:
            log.warning(
                "MLflow metrics: %d batches still in flight after %.0fs; ending the run finishes them",
                left,
                self._flush_timeout_s,
            )
        if self.dropped:
            log.warning("MLflow tracking dropped %d metric batches (queue full)", self.dropped)
            self._safely(
                "log_metric",
                self.client.log_metric,
                self.run_id,
                "tracking/dropped_batches",
                float(self.dropped),
            )
        if any(k in LOSS_KEYS for k in self.history):  # a training run (not an evaluation or sweep)
            self._log_loss_plot()
        if self._broken and not self._fluent:
            return  # the store failed earlier and this thread holds no active run of ours to release
        try:  # a fluent run is ended even after a failure, so this thread's active-run stack is released
            self._end_run(status)
        except Exception as err:
            log.warning("MLflow end_run failed (%s)", err)

    def _end_run(self, status: str) -> None:
        import mlflow

        active = mlflow.active_run()
        if self._fluent and active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status)  # also stops MLflow's system metrics monitor of this run
        else:
            self.client.set_terminated(self.run_id, status)

    def _log_loss_plot(self) -> None:
        try:
            figure = plot_histories(self.history)
        except Exception as err:  # e.g. no matplotlib: the run itself is fine
            log.warning("could not plot the loss curves (%s)", err)
            return
        if figure is not None:
            self.log_figure(figure, "plots/loss_curves.png")
            import matplotlib.pyplot as plt

            plt.close(figure)


def experiment_name(cfg) -> str:
    """One experiment per (dataset, model) unless tracking.experiment names one."""
    return cfg.tracking.experiment or f"{cfg.data.name}-{Path(cfg.model.source.rstrip('/')).name}"


def run_tags(cfg, world_size: int) -> dict[str, str]:
    return {
        "method": cfg.method.name,
        "model": cfg.model.source,
        "dataset": cfg.data.name,
        "n_edits": str(cfg.data.n_edits),
        "world_size": str(world_size),
        "zero_stage": str(cfg.dist.zero_stage),
        "seed": str(cfg.train.seed),
    }


def make_tracker(
    enabled: bool,
    uri: str,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    settings: Any = None,
    parent_run_id: str | None = None,
) -> Tracker:
    """An MLflowTracker, or a NullTracker when disabled or when the store cannot be reached.
    `settings` is a TrackingConfig (its defaults when None)."""
    if not enabled:
        return NullTracker()
    if settings is None:
        settings = TrackingConfig()
    try:
        return MLflowTracker(
            uri,
            experiment,
            run_name,
            tags,
            parent_run_id=parent_run_id,
            artifact_location=settings.artifact_location,
            system_metrics=settings.system_metrics and parent_run_id is None,
            system_metrics_interval_s=settings.system_metrics_interval_s,
            queue_size=settings.queue_size,
            flush_timeout_s=settings.flush_timeout_s,
            http_timeout_s=settings.http_timeout_s,
            http_retries=settings.http_retries,
        )
    except Exception as err:
        log.warning("could not start MLflow tracking at %s (%s); continuing without tracking", uri, err)
        return NullTracker()
