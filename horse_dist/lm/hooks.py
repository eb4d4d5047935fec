"""Forward hooks on the edited modules of a frozen LM (DESIGN §1 steps 1, 5, 6).

Two modes, one active at a time:
- record: store each edited module's input K (N, I) and the gradient of the loss w.r.t. its output G (N, O)
  at the answer positions (rows in row-major (batch, time) order, the order of `labels[mask]`);
- shift: add x @ S_l to the module's output, the exact, reversible form of W_l' = W_l + S_lᵀ that also works
  on ZeRO-3 partitioned weights. With S_l a float32 leaf, autograd leaves g_S = Σ_t x_t (∂L/∂y_t)ᵀ over
  every position in S_l.grad, accumulated in float32 from the hook activations.
Legend: N token rows, I = d_in, O = d_out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EditHooks:
    def __init__(self, model: nn.Module, module_names: list[str]) -> None:
        self.module_names = list(module_names)
        self.modules = [model.get_submodule(name) for name in self.module_names]
        self._mode: str | None = None
        self._mask: torch.Tensor | None = None
        self._shifts: list[torch.Tensor] = []
        self.keys: list[list[torch.Tensor]] = []
        self.grads: list[list[torch.Tensor]] = []
        self._handles = [m.register_forward_hook(self._make_hook(i)) for i, m in enumerate(self.modules)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, position: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
            if self._mode == "record":
                return self._record(position, inputs[0], output)
            if self._mode == "shift":
                shift_IO = self._shifts[position]
                return output + (inputs[0].to(shift_IO.dtype) @ shift_IO).to(output.dtype)
            return None

        return hook

    def _record(self, position: int, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        self.keys[position].append(x[mask].detach().float())
        if not output.requires_grad:
            # Lowest edited layer: nothing below needs a gradient, so start the graph here.
            output = output.detach().requires_grad_(True)
        grads = self.grads[position]
        output.register_hook(lambda g: grads.append(g[mask].detach().float()))
        return output

    @contextmanager
    def recording(self, mask_BT: torch.Tensor) -> Iterator[None]:
        """Record K and G at `mask_BT` (the answer positions) for the passes run inside the block."""
        self._mode, self._mask = "record", mask_BT
        try:
            yield
        finally:
            self._mode, self._mask = None, None

    def reset_records(self) -> None:
        self.keys = [[] for _ in self.modules]
        self.grads = [[] for _ in self.modules]

    def collect(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Concatenate what was recorded since the last reset: per layer K (N, I) and G (N, O)."""
        keys = [torch.cat(chunks) for chunks in self.keys]
        grads = [torch.cat(chunks) for chunks in self.grads]
        return keys, grads

    @contextmanager
    def shifted(self, shifts_IO: list[torch.Tensor]) -> Iterator[None]:
        """Apply y <- y + x S_l on every edited module inside the block."""
        if len(shifts_IO) != len(self.modules):
            raise ValueError(f"got {len(shifts_IO)} shifts for {len(self.modules)} edited modules")
        self._mode, self._shifts = "shift", list(shifts_IO)
        try:
            yield
        finally:
            self._mode, self._shifts = None, []
