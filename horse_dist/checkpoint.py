"""Atomic checkpoints: hypernetworks (with their normalisers), optimizer, step, RNG state, resolved config.

A checkpoint is written to a temporary file in the same folder, fsynced, then os.replace'd over the old one,
so a crash at any point leaves the last good checkpoint intact.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import torch

from horse_dist.signals import sigterm_deferred

CHECKPOINT_NAME = "checkpoint.pt"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write through a temp file in the same folder, fsync, then rename over `path`: a reader (or a crash)
    sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with sigterm_deferred():  # a SIGTERM now exits after the rename, with the new file complete
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | Path) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def checkpoint_state(
    *,
    hypernet: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    config_yaml: str,
    edit_modules: list[str],
) -> dict[str, Any]:
    """Everything needed to resume exactly or to edit with the trained hypernetwork."""
    return {
        "format": "horse_dist.checkpoint.v1",
        "hypernet": hypernet.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": step,
        "rng": rng_state(),
        "config": config_yaml,
        "edit_modules": edit_modules,
    }


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept a checkpoint file or a run folder holding checkpoint.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint_path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{path}: not a readable horse_dist checkpoint ({err})") from err
    if not isinstance(state, dict) or state.get("format") != "horse_dist.checkpoint.v1":
        raise ValueError(f"{path}: not a horse_dist checkpoint (missing format tag)")
    return state


class CheckpointStore(Protocol):
    """Where a run's checkpoints live: a run folder, or Ray Train's checkpoint storage."""

    def load_latest(self) -> dict[str, Any] | None: ...
    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None: ...


class LocalCheckpointStore:
    """Checkpoints in a run folder; rank 0 writes, every rank may read the latest."""

    def __init__(self, run_dir: str | Path, rank: int = 0) -> None:
        self.path = Path(run_dir) / CHECKPOINT_NAME
        self.rank = rank

    def load_latest(self) -> dict[str, Any] | None:
        return load_checkpoint(self.path) if self.path.exists() else None

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.rank == 0:
            atomic_torch_save({**state, "metrics": metrics}, self.path)
