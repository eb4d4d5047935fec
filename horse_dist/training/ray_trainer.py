"""The training loop on a Ray cluster: a Ray Train `TorchTrainer` whose workers run `train_worker` (DESIGN §2).

    python -m horse_dist.train dist.backend=ray dist.num_workers=2 [dist.zero_stage=3] ...

The driver attaches to the cluster in RAY_ADDRESS (as inside `ray job submit`), else to one started on this
machine with `ray start`, else starts a local Ray. Ray
Train creates the process group (gloo on CPU, NCCL on GPU); each worker wraps it in a `TorchWorld`, loads the
frozen LM under DeepSpeed (horse_dist.dist.deepspeed_lm) and runs the same loop as local mode on its slice
of every meta-batch. Rank 0 writes checkpoints (to the run folder and as a Ray checkpoint); every rank
reports them through `ray.train.report`. A worker group restarted after a failure (`dist.max_failures`)
resumes automatically from the newer of `ray.train.get_checkpoint()` and the run folder's checkpoint.pt
(see RayCheckpointStore). Only rank 0 tracks to MLflow.

Environment knobs: HORSE_DIST_CPUS_PER_WORKER (CPUs Ray reserves per worker, default 1);
HORSE_DIST_FAULT_STEP / HORSE_DIST_FAULT_MARKER / HORSE_DIST_FAULT_DELAY_S (tests: a rank other than 0
exits hard at that step, after the delay and before it reports the step's checkpoint, on the first attempt
only, i.e. while the marker file does not exist). Rank 0 appends one line per attempt (where it resumed
from) to <run_dir>/ray_attempts.jsonl.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from horse_dist.config import config_from_yaml, to_yaml, with_changes
from horse_dist.dist.ray_cluster import ensure_ray
from horse_dist.dist.world import TorchWorld
from horse_dist.process import setup_logging
from horse_dist.training.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    load_run_checkpoint,
    save_run_checkpoint,
)
from horse_dist.training.loop import named_run, owned_run_dir, run_tracked

log = logging.getLogger(__name__)

FAULT_STEP_ENV = "HORSE_DIST_FAULT_STEP"
FAULT_MARKER_ENV = "HORSE_DIST_FAULT_MARKER"
FAULT_DELAY_ENV = "HORSE_DIST_FAULT_DELAY_S"
CPUS_ENV = "HORSE_DIST_CPUS_PER_WORKER"
ATTEMPTS_LOG = "ray_attempts.jsonl"


class RayCheckpointStore:
    """The CheckpointStore of a Ray Train worker.

    save: rank 0 writes <run_dir>/checkpoint.pt (what evaluate/edit read) and hands a copy to Ray; every rank
    calls ray.train.report (a collective in Ray Train).

    load_latest: the newer (by step) of this Ray run's latest checkpoint, `ray.train.get_checkpoint()` (a
    worker group restarted after a failure), and <run_dir>/checkpoint.pt. The run folder only holds a
    checkpoint of this run (owned_run_dir refuses a used folder unless train.resume=true, i.e. a resubmitted
    job continuing a fixed run name). It is also the safety net for a failure within Ray Train's polling
    interval (2 s) after a report, when the controller has not registered the newest checkpoint yet. Every
    rank's state after a step is identical (gradients are all-reduced), so rank 0's copy serves all.
    """

    def __init__(self, run_dir: str | Path, rank: int, keep: int = 1) -> None:
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.keep = keep
        self._latest: tuple[dict[str, Any] | None, dict[str, Any]] | None = None

    def _find_latest(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        import ray.train

        if self._latest is not None:
            return self._latest
        candidates: list[tuple[str, dict[str, Any]]] = []
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                candidates.append(("ray", load_checkpoint(Path(folder) / CHECKPOINT_NAME)))
        local = load_run_checkpoint(self.run_dir)
        if local is not None:
            candidates.append(("run_dir", local))
        steps = {source: state["step"] for source, state in candidates}
        source, state = max(candidates, key=lambda c: c[1]["step"], default=("none", None))
        info = {"source": source, "step": state["step"] if state else 0, "candidates": steps}
        self._latest = (state, info)
        return self._latest

    def has_checkpoint(self) -> bool:
        return self._find_latest()[0] is not None

    def describe(self) -> dict[str, Any]:
        return self._find_latest()[1]

    def load_latest(self) -> dict[str, Any] | None:
        return self._find_latest()[0]

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        import ray.train

        _maybe_inject_fault(state["step"], self.rank)
        metrics = {**metrics, "step": float(state["step"])}
        if self.rank != 0:
            ray.train.report(metrics)
            return
        save_run_checkpoint({**state, "metrics": metrics}, self.run_dir, self.keep)
        with tempfile.TemporaryDirectory(prefix="horse_dist_ckpt_") as folder:
            torch.save({**state, "metrics": metrics}, Path(folder) / CHECKPOINT_NAME)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _maybe_inject_fault(step: int, rank: int) -> None:
    """Test hook: the last rank dies hard at HORSE_DIST_FAULT_STEP on the first attempt only."""
    fault_step, marker = os.environ.get(FAULT_STEP_ENV), os.environ.get(FAULT_MARKER_ENV)
    if not fault_step or not marker or step != int(fault_step) or rank == 0:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only the first attempt gets here
    except FileExistsError:
        return
    os.close(fd)
    time.sleep(float(os.environ.get(FAULT_DELAY_ENV, "0")))  # let Ray's controller register earlier reports
    log.error("fault injection: rank %d exits at step %d", rank, step)
    os._exit(17)


def absolute_tracking_uri(uri: str) -> str:
    """Workers do not share the driver's working directory: make a relative sqlite path absolute."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    if "://" not in uri and uri:  # a plain folder (file store)
        return str(Path(uri).resolve())
    return uri


def worker_entry(loop_config: dict[str, Any]) -> None:
    """The per-worker function Ray Train runs (module level so it pickles by reference)."""
    import ray.train

    setup_logging()
    os.environ.update(loop_config.get("env") or {})
    cfg = config_from_yaml(loop_config["config_yaml"], [])
    run_dir = Path(loop_config["run_dir"])
    world = TorchWorld()
    if cfg.dist.use_gpu and torch.cuda.is_available():
        torch.cuda.set_device(ray.train.torch.get_device())
    store = RayCheckpointStore(run_dir, world.rank, cfg.train.keep_checkpoints)
    # A restarted worker group (or a resubmitted run with resume=true) continues from the last checkpoint.
    cfg = with_changes(cfg, {"train.resume": store.has_checkpoint()})
    if world.rank == 0:
        with (run_dir / ATTEMPTS_LOG).open("a") as handle:
            handle.write(json.dumps({"time": time.time(), **store.describe()}) + "\n")
    run_tracked(cfg, run_dir, world, store)


def run_ray(cfg, env: dict[str, str] | None = None) -> dict[str, float]:
    """Launch `train_worker` on cfg.dist.num_workers Ray Train workers; returns rank 0's results."""
    cfg = named_run(with_changes(cfg, {"tracking.uri": absolute_tracking_uri(cfg.tracking.uri)}))
    with owned_run_dir(cfg) as run_dir:  # the driver holds the folder's lock while the workers run
        return _fit(cfg, run_dir.resolve(), env)


def _fit(cfg, run_dir: Path, env: dict[str, str] | None) -> dict[str, float]:
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray()
    resources = {"CPU": float(os.environ.get(CPUS_ENV, "1"))}
    if cfg.dist.use_gpu:
        resources["GPU"] = 1.0
    # Unique per launch: Ray Train silently resumes a reused name (a resubmission resumes through
    # train.resume=true and the run folder's checkpoint instead).
    ray_name = f"{cfg.train.run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    trainer = TorchTrainer(
        worker_entry,
        train_loop_config={
            "config_yaml": to_yaml(cfg),
            "run_dir": str(run_dir),
            "env": dict(env or {}),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.dist.num_workers, use_gpu=cfg.dist.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.dist.use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=ray_name,
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    log.info("Ray Train run %s: %d workers, ZeRO-%d", ray_name, cfg.dist.num_workers, cfg.dist.zero_stage)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return json.loads((run_dir / "results.json").read_text())
