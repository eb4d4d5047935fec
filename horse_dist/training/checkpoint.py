"""Atomic checkpoints: hypernetworks (with their normalisers), optimizer, step, RNG state, resolved config.

A checkpoint is written to a temporary file in the same folder, fsynced, then os.replace'd over the old one
(and the folder fsynced), so a crash at any point leaves the last good checkpoint intact. A tensor that is not
finite is never written. The run folder keeps the newest `keep` checkpoints (checkpoints/step-NNNNNN.pt,
checkpoint.pt a hard link to the newest) and is locked while a run owns it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import torch

from horse_dist.process import sigterm_deferred

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_DIR = "checkpoints"
LOCK_NAME = ".lock"
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
_ORPHAN = re.compile(r"^\.(checkpoint\.pt|step-\d+\.pt|config\.yaml|results\.json)\..*\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, foreign, or would hold non-finite values."""


class RunFolderError(RuntimeError):
    """A run folder that another process owns, or that does not hold the run asked for."""


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: the directory entry lives in the folder's own inode)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write through a temp file in the same folder, fsync, then rename over `path`: a reader (or a crash)
    sees the old file or the new one, never half of one. An OSError names `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with sigterm_deferred():  # a SIGTERM now exits after the rename, with the new file complete
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if err.filename is None:  # a failed write on an open file names no path; name the one we write
            raise OSError(err.errno, err.strerror or os.strerror(err.errno or 0), str(path)) from err
        raise
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | Path) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def _tensors(value: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{name}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{name}[{index}]")


def first_non_finite(state: dict[str, Any]) -> str | None:
    """The name of the first floating tensor of the hypernetwork or optimizer in `state` holding a NaN or an infinity, else None."""
    for key in ("hypernet", "optimizer"):
        for name, tensor in _tensors(state.get(key), key):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return name
    return None


def check_finite(state: dict[str, Any], path: str | Path) -> None:
    bad = first_non_finite(state)
    if bad is not None:
        raise CheckpointError(f"{path}: refusing to save a checkpoint whose {bad} is not finite")


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
    data_fingerprint: str = "",
) -> dict[str, Any]:
    """Everything needed to resume exactly or to edit with the trained hypernetwork; `data_fingerprint`
    (data.records_fingerprint of the training pool) lets a resume refuse a changed pool."""
    return {
        "data_fingerprint": data_fingerprint,
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
        raise CheckpointError(f"{path}: not a readable horse_dist checkpoint ({err})") from err
    if not isinstance(state, dict) or state.get("format") != "horse_dist.checkpoint.v1":
        raise CheckpointError(f"{path}: not a horse_dist checkpoint (missing format tag)")
    return state


def history(run_dir: Path) -> list[Path]:
    """The run folder's kept checkpoints, oldest first."""
    folder = run_dir / HISTORY_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_run_checkpoint(state: dict[str, Any], run_dir: Path, keep: int) -> Path:
    """Write `state` as the run's newest checkpoint and keep the newest `keep` (>= 1); refuses non-finite
    values. keep=1 writes checkpoint.pt only; more write checkpoints/step-NNNNNN.pt and make checkpoint.pt a
    hard link to it (no second copy on disk), then delete the step files beyond `keep`, all written here."""
    target = run_dir / CHECKPOINT_NAME
    check_finite(state, target)
    if keep <= 1:
        return atomic_torch_save(state, target)
    step_file = atomic_torch_save(state, run_dir / HISTORY_DIR / f"step-{state['step']:06d}.pt")
    link = run_dir / f".{CHECKPOINT_NAME}.{os.getpid()}.link.tmp"
    link.unlink(missing_ok=True)
    try:
        os.link(step_file, link)
        os.replace(link, target)
        fsync_dir(run_dir)
    except OSError as err:
        link.unlink(missing_ok=True)
        if err.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
            raise
        atomic_torch_save(state, target)  # a file system without hard links: a second copy
    for old in history(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return target


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run folder holds a checkpoint (read or not)."""
    return (run_dir / CHECKPOINT_NAME).exists() or bool(history(run_dir))


def load_run_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint of a run folder (checkpoint.pt, else the kept step files newest
    first, each failure logged), or None if the folder holds none."""
    candidates = [run_dir / CHECKPOINT_NAME, *reversed(history(run_dir))]
    existing = [p for p in candidates if p.is_file()]
    for path in existing:
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping an unreadable checkpoint: %s", err)
    if existing:
        raise CheckpointError(f"{run_dir}: no readable checkpoint among {[str(p) for p in existing]}")
    return None


def remove_orphans(run_dir: Path) -> list[str]:
    """Delete temporary files an interrupted write of ours left in the run folder (the folder is locked,
    so no live writer owns them)."""
    removed = []
    for folder in (run_dir, run_dir / HISTORY_DIR):
        if folder.is_dir():
            for path in folder.iterdir():
                if _ORPHAN.match(path.name):  # ours only: .checkpoint.pt.<pid>.link.tmp included
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted write in %s", len(removed), run_dir)
    return removed


class RunFolderLock:
    """An exclusive lock on a run folder (flock on <run>/.lock, released when the process ends)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self.handle = None

    def acquire(self) -> RunFolderLock:
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise RunFolderError(
                f"{self.path.parent} is in use by another run (pid {owner}); wait for it or choose another "
                "train.run_name"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


class CheckpointStore(Protocol):
    """Where a run's checkpoints live: a run folder, or Ray Train's checkpoint storage."""

    def load_latest(self) -> dict[str, Any] | None: ...
    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None: ...


class LocalCheckpointStore:
    """Checkpoints in a run folder; rank 0 writes, every rank may read the latest."""

    def __init__(self, run_dir: str | Path, rank: int = 0, keep: int = 1) -> None:
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.keep = keep

    def load_latest(self) -> dict[str, Any] | None:
        return load_run_checkpoint(self.run_dir)

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.rank == 0:
            save_run_checkpoint({**state, "metrics": metrics}, self.run_dir, self.keep)
