"""Residual spread across the edited layers (DESIGN §1 step 4) and its backward.

Shape legend: N = token rows (this worker's shard), O = d_out, L = edited layers (list order = ascending
layers).

Each worker holds only its own token rows of every D_l, so every Frobenius inner product is a sum of
per-worker partial sums: the functions compute local partials and pass them through the injected
`reduce` (an all-reduce sum across workers; the identity in one process). All workers must call
spread_forward / spread_backward with the same layers in the same order (the reduces are collectives).

Modes (p_l is one scalar per adjacent pair; layer 0 is never changed):
  orthogonal (paper Eq. 6): D̂_l = D_l − p_l D̂_{l−1},  p_l = ⟨D_l, D̂_{l−1}⟩ / ‖D̂_{l−1}‖²
  reference (public HORSE code): D̂_l = D_l − p_l G_{l−1},  p_l = ⟨D_l, D_{l−1}⟩ / ‖D_{l−1}‖²
      (coefficient against the UN-spread previous residual, subtracted direction = previous raw gradient)
  none (MALMEN): D̂_l = D_l
Backward treats the previous layer's tensors as constants (as the reference does), so layer l's map is
linear in D_l: D̂_l = D_l − (⟨D_l, b⟩/‖b‖²) d with basis b and direction d; its transpose is
∂L/∂D_l = g − (⟨g, d⟩/‖b‖²) b.  (orthogonal: b = d = D̂_{l−1}; reference: b = D_{l−1}, d = G_{l−1}.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

Reducer = Callable[[Tensor], Tensor]
SPREAD_MODES = ("orthogonal", "reference", "none")


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class SpreadState:
    """What spread_backward needs, per layer l (entries for l = 0, and all entries in mode none, are None).

    basis[l]: b_l, the tensor p_l was measured against (detached, local rows).
    direction[l]: d_l, the tensor that was subtracted (detached, local rows).
    norm_sq[l]: ‖b_l‖², global (reduced), float64 0-d.
    coef[l]: p_l, global, float64 0-d (kept for logging/diagnostics).
    """

    mode: str
    basis: list[Tensor | None] = field(default_factory=list)
    direction: list[Tensor | None] = field(default_factory=list)
    norm_sq: list[Tensor | None] = field(default_factory=list)
    coef: list[Tensor | None] = field(default_factory=list)


def _local_dot(a: Tensor, b: Tensor) -> Tensor:
    """Local partial Σ_ij a_ij b_ij as float64 0-d (vdot: no n×d temporary; fp32 inputs accumulate in fp32)."""
    if a.dtype == torch.float64 and b.dtype == torch.float64:
        return torch.vdot(a.reshape(-1), b.reshape(-1))
    return torch.vdot(a.reshape(-1).float(), b.reshape(-1).float()).to(torch.float64)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, 0 where den == 0 (an all-zero previous residual removes nothing); NaN-free under autograd."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _label(names: list[str] | None, i: int) -> str:
    return repr(names[i]) if names is not None else f"#{i}"


def _check_shapes(deltas: list[Tensor], raw_grads: list[Tensor] | None, names: list[str] | None) -> None:
    for i in range(1, len(deltas)):
        prev = deltas[i - 1] if raw_grads is None else raw_grads[i - 1]
        what = "residual" if raw_grads is None else "raw gradient"
        if deltas[i].shape != deltas[i - 1].shape or deltas[i].shape != prev.shape:
            bad = deltas[i - 1] if deltas[i].shape != deltas[i - 1].shape else prev
            raise ValueError(
                f"residual spread needs adjacent edited layers of one shape, but layer {_label(names, i - 1)} "
                f"has {what} shape {tuple(bad.shape)} and layer {_label(names, i)} has residual shape "
                f"{tuple(deltas[i].shape)}; use spread=none or edit layers of one shape"
            )


def spread_forward(
    deltas: list[Tensor],
    mode: str,
    raw_grads: list[Tensor] | None = None,
    reduce: Reducer = _identity,
    names: list[str] | None = None,
) -> tuple[list[Tensor], SpreadState]:
    """Spread the residuals D_l (N, O) of the edited layers (ascending order); returns ([D̂_l], state).

    The previous layer's tensors enter detached, so autograd through this function gives exactly
    spread_backward (with a differentiable `reduce`, e.g. the identity).
    """
    if mode not in SPREAD_MODES:
        raise ValueError(f"unknown spread mode {mode!r}; expected one of {SPREAD_MODES}")
    if names is not None and len(names) != len(deltas):
        raise ValueError(f"names has {len(names)} entries for {len(deltas)} layers")
    n_layers = len(deltas)
    state = SpreadState(mode=mode, basis=[None] * n_layers, direction=[None] * n_layers)
    state.norm_sq, state.coef = [None] * n_layers, [None] * n_layers
    if mode == "none" or n_layers < 2:
        return list(deltas), state

    if mode == "reference":
        if raw_grads is None:
            raise ValueError("spread mode 'reference' needs raw_grads (each layer's cached output gradient)")
        if len(raw_grads) != n_layers:
            raise ValueError(f"raw_grads has {len(raw_grads)} entries for {n_layers} layers")
        _check_shapes(deltas, raw_grads, names)
        # All coefficients use un-spread residuals only: one reduce for every layer pair.
        partials = []
        for i in range(1, n_layers):
            prev = deltas[i - 1].detach()
            partials += [_local_dot(deltas[i], prev), _local_dot(prev, prev)]
        sums_2L = reduce(torch.stack(partials)).reshape(-1, 2)
        out = [deltas[0]]
        for i in range(1, n_layers):
            coef = _ratio(sums_2L[i - 1, 0], sums_2L[i - 1, 1])
            direction = raw_grads[i - 1].detach()
            out.append(deltas[i] - coef.to(deltas[i].dtype) * direction.to(deltas[i].dtype))
            state.basis[i], state.direction[i] = deltas[i - 1].detach(), direction
            state.norm_sq[i], state.coef[i] = sums_2L[i - 1, 1].detach(), coef.detach()
        return out, state

    _check_shapes(deltas, None, names)
    out = [deltas[0]]
    for i in range(1, n_layers):
        prev = out[i - 1].detach()
        sums_2 = reduce(torch.stack([_local_dot(deltas[i], prev), _local_dot(prev, prev)]))
        coef = _ratio(sums_2[0], sums_2[1])
        out.append(deltas[i] - coef.to(deltas[i].dtype) * prev)
        state.basis[i] = state.direction[i] = prev
        state.norm_sq[i], state.coef[i] = sums_2[1].detach(), coef.detach()
    return out, state


def spread_backward(
    grads_of_spread: list[Tensor], state: SpreadState, reduce: Reducer = _identity
) -> list[Tensor]:
    """Map ∂L/∂D̂_l to ∂L/∂D_l: g_l − (⟨g_l, d_l⟩ / ‖b_l‖²) b_l (identity for layer 0 and mode none).

    Layers are independent here (previous tensors are constants), so one reduce carries all L−1 scalars.
    """
    if len(grads_of_spread) != len(state.basis):
        raise ValueError(f"got {len(grads_of_spread)} gradients for a spread of {len(state.basis)} layers")
    layers = [i for i, d in enumerate(state.direction) if d is not None]
    if state.mode == "none" or not layers:
        return list(grads_of_spread)
    sums_K = reduce(torch.stack([_local_dot(grads_of_spread[i], state.direction[i]) for i in layers]))
    out = list(grads_of_spread)
    for k, i in enumerate(layers):
        g = grads_of_spread[i]
        coef = _ratio(sums_K[k], state.norm_sq[i])
        out[i] = g - coef.to(g.dtype) * state.basis[i].to(g.dtype)
    return out
