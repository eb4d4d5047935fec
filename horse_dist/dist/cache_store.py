"""Spill of a worker's per-layer cache (K, G) to local disk above `dist.cache_budget_gb` (DESIGN §2).

The layers are kept in memory in order while they fit the budget; the rest are copied into memory-mapped
files on local disk (``torch.from_file(shared=True)``; the files are unlinked at once, so they vanish with the
tensors). The mapped tensors are ordinary CPU tensors to the pipeline, and the kernel pages them out to the
file under memory pressure. On a GPU worker the spilled layers leave device memory the same way and the cache's
layer lists become `PagedLayers`, which copy a spilled layer back onto the device each time the pipeline reads it
(a layer is read a few times per step: normaliser moments, hypernet forward, solve, meta-gradient, hypernet backward).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from horse_dist.lm.passes import CacheResult

log = logging.getLogger(__name__)

SPILL_DIR_ENV = "HORSE_DIST_SPILL_DIR"  # local disk folder for spilled layers (default: the temp dir)


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def to_disk(tensor: torch.Tensor, folder: str | Path) -> torch.Tensor:
    """A copy of `tensor` backed by a memory-mapped file in `folder` (unlinked: freed with the tensor)."""
    fd, path = tempfile.mkstemp(prefix="layer_", suffix=".bin", dir=folder)
    os.close(fd)
    try:
        mapped = torch.from_file(path, shared=True, size=tensor.numel(), dtype=tensor.dtype)
    finally:
        os.unlink(path)
    mapped.copy_(tensor.reshape(-1))
    return mapped.view(tensor.shape)


class PagedLayers(Sequence[torch.Tensor]):
    """Per-layer tensors of which some live on the device and some in host files; indexing or iterating
    returns every layer on `device` (spilled ones as a fresh device copy, freed after use)."""

    def __init__(self, layers: list[torch.Tensor], device: torch.device) -> None:
        self.layers, self.device = list(layers), device

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        tensor = self.layers[index]
        return tensor if tensor.device == self.device else tensor.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def resident_bytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.layers if t.device == self.device)


def spill_over_budget(cache: CacheResult, budget_gb: float, folder: str | Path | None = None) -> CacheResult:
    """Keep layers (K and G together) in memory while their total fits `budget_gb`; spill the rest.
    A budget of 0 means unlimited; a cache within budget is returned unchanged."""
    if budget_gb <= 0:
        return cache
    budget = budget_gb * 2**30
    sizes = [tensor_bytes(k) + tensor_bytes(g) for k, g in zip(cache.keys, cache.grads)]
    if sum(sizes) <= budget:
        return cache
    device = cache.keys[0].device
    folder = folder or os.environ.get(SPILL_DIR_ENV) or tempfile.gettempdir()
    keys, grads, used, spilled = [], [], 0, []
    for layer, (k, g, size) in enumerate(zip(cache.keys, cache.grads, sizes)):
        if used + size <= budget:
            used += size
            keys.append(k)
            grads.append(g)
        else:
            keys.append(to_disk(k, folder))
            grads.append(to_disk(g, folder))
            spilled.append(layer)
    log.info(
        "cache %.3f GiB over budget %.3f GiB: layers %s spilled to %s",
        sum(sizes) / 2**30,
        budget_gb,
        spilled,
        folder,
    )
    if device.type != "cpu":  # host-file tensors are read back onto the device layer by layer
        return replace(cache, keys=PagedLayers(keys, device), grads=PagedLayers(grads, device))
    return replace(cache, keys=keys, grads=grads)
