"""Spectral health of edited weights: Frobenius norm and condition number, in float64.

Sequential editing degrades a model through the edited weights' spectrum (MOSE §2): additive edits
inflate the norm and the condition number, an orthogonal left-multiplication leaves both unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def norm_and_condition(weight_OI: torch.Tensor) -> tuple[float, float]:
    """(‖W‖_F, σ_max / σ_min) of one weight matrix, computed in float64 (inf when W is singular)."""
    if weight_OI.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(weight_OI.shape)}")
    weight = weight_OI.detach().to(torch.float64)
    singular_values = torch.linalg.svdvals(weight)  # descending
    smallest = float(singular_values[-1])
    condition = float(singular_values[0]) / smallest if smallest > 0 else float("inf")
    return float(torch.linalg.norm(weight)), condition


def module_weight_stats(model: nn.Module, module_names: list[str]) -> dict[str, tuple[float, float]]:
    """module name -> (Frobenius norm, condition number) of its weight."""
    return {name: norm_and_condition(model.get_submodule(name).weight) for name in module_names}


def relative_change(value: float, initial: float) -> float:
    return abs(value - initial) / abs(initial) if initial else float("inf")
