"""The `World`: rank, size, collectives and layer ownership. The only place collectives are called.

Every global quantity of a meta-step is a sum of per-worker terms (DESIGN §2), so the math takes reducers
from here and never imports torch.distributed. `LocalWorld` (one process) makes every collective a no-op;
`TorchWorld` wraps an initialised torch.distributed process group (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

from collections import Counter

import torch


class LocalWorld:
    """Single process: rank 0 of 1, owner of every layer, collectives are identities."""

    rank = 0
    size = 1

    def __init__(self) -> None:
        self.bytes_moved: Counter[str] = Counter()  # per collective kind, reset by the caller each step

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def owner(self, layer_position: int) -> int:
        """Layer l (position in the ascending list of edited layers) is owned by worker l mod W."""
        return layer_position % self.size

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def reduce_sum_to(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return tensor

    def all_reduce_grads(self, parameters) -> None:
        pass

    def barrier(self) -> None:
        pass


class TorchWorld(LocalWorld):
    """Collectives over the default torch.distributed process group (already initialised by the launcher)."""

    def __init__(self) -> None:
        super().__init__()
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("TorchWorld needs an initialised torch.distributed process group")
        self._dist = dist
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        # NCCL moves device tensors only, gloo host tensors: callers pass tensors wherever they live (host-side
        # metric vectors, device-side Gram sums) and the world moves them to the backend's device and back.
        nccl = dist.get_backend() == "nccl"
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def _count(self, kind: str, tensor: torch.Tensor) -> None:
        self.bytes_moved[kind] += tensor.numel() * tensor.element_size()

    def _collective(self, kind: str, tensor: torch.Tensor, op) -> torch.Tensor:
        self._count(kind, tensor)
        if tensor.device == self.comm_device:
            op(tensor)
            return tensor
        moved = tensor.to(self.comm_device)
        op(moved)
        return tensor.copy_(moved)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._collective(
            "all_reduce", tensor, lambda t: self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM)
        )

    def reduce_sum_to(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        return self._collective(
            "reduce", tensor, lambda t: self._dist.reduce(t, dst=dst, op=self._dist.ReduceOp.SUM)
        )

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return self._collective("broadcast", tensor, lambda t: self._dist.broadcast(t, src=src))

    def all_reduce_grads(self, parameters) -> None:
        """Sum gradients over workers in one flat buffer (each worker's grads cover its own token rows)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.all_reduce_sum(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        self._dist.barrier()
