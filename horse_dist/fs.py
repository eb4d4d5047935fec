"""File-system helpers shared by every layer (imports nothing from the package)."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def user_cache(name: str) -> Path:
    """~/.cache/horse_dist/<name>: what the package builds once per machine (converted models, tokenised
    pools), beside the ecosystem's caches (~/.cache/huggingface) and never in a checkout or a run folder."""
    return Path.home() / ".cache" / "horse_dist" / name


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing), held for the block: processes starting together
    build a shared file once; the others wait and then read it."""
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
