"""Meta-gradient without backprop through the LM (DESIGN §1 step 7).

Shape legend: N = token rows, I = d_in (key size), O = d_out.

With S = A⁻¹ KᵀD̂, A = KᵀK + e^λ I symmetric, and g_S = ∂L/∂S (I, O):
  M = A⁻¹ g_S;  ∂L/∂D̂ = K M;  ∂L/∂λ = −e^λ ⟨M, S⟩_F   (dA/dλ = e^λ I, d(A⁻¹) = −A⁻¹ dA A⁻¹).
Then ∂L/∂D goes back through the spread (spread_backward) and into the hypernet (hypernet_vjp).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .hypernet import HyperNet
from .residual import residual
from .solve import DualRidge, PrimalRidge


def ridge_meta_direction(ridge: PrimalRidge | DualRidge, grad_shift_IO: Tensor) -> Tensor:
    """M = A⁻¹ g_S (I, O), reusing the factor of the forward solve."""
    return ridge.solve(grad_shift_IO)


def residual_grad(keys_NI: Tensor, meta_direction_IO: Tensor) -> Tensor:
    """∂L/∂D̂ = K M (N, O) for this worker's key rows."""
    return keys_NI.to(meta_direction_IO.dtype) @ meta_direction_IO


def log_lambda_grad(log_lambda: Tensor, meta_direction_IO: Tensor, shift_IO: Tensor) -> Tensor:
    """∂L/∂λ = −e^λ ⟨M, S⟩ (0-d, log_lambda's dtype/device; no graph). ⟨M, S⟩ accumulated in float64."""
    lam = torch.exp(log_lambda.detach().to(torch.float64))
    inner = torch.vdot(
        meta_direction_IO.reshape(-1).to(torch.float64), shift_IO.reshape(-1).to(torch.float64)
    )
    return (-lam * inner.to(lam.device)).to(dtype=log_lambda.dtype, device=log_lambda.device)


def hypernet_vjp(
    net: HyperNet,
    keys_NI: Tensor,
    grads_NO: Tensor,
    layer: int,
    grad_delta_NO: Tensor,
    chunk_rows: int = 1024,
) -> None:
    """Accumulate Σ_c ∂/∂φ ⟨∂L/∂D[c], D_c(φ)⟩ into the .grad of the net's parameters.

    D_c = residual(K_c, *net(K_c, G_c, layer), η_layer) is recomputed with grad one chunk of rows at a time,
    so only one chunk's graph is alive (memory bounded by chunk_rows, not N). The normaliser is not updated.
    """
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    n = keys_NI.shape[0]
    if grads_NO.shape[0] != n or grad_delta_NO.shape[0] != n:
        raise ValueError(
            f"row counts differ: keys {n}, grads {grads_NO.shape[0]}, grad_delta {grad_delta_NO.shape[0]}"
        )
    for start in range(0, n, chunk_rows):
        rows = slice(start, start + chunk_rows)
        with torch.enable_grad():
            pseudo_keys, pseudo_grads = net(keys_NI[rows], grads_NO[rows], layer)
            delta_c = residual(keys_NI[rows], pseudo_keys, pseudo_grads, net.step_size(layer))
            (grad_delta_NO[rows].to(delta_c.dtype) * delta_c).sum().backward()
