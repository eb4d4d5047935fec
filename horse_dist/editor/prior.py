"""A key prior for the ridge solve (method.key_prior=c0): S = (KᵀK + e^λ C0)⁻¹ KᵀD̂, by whitening the keys.

Shape legend: N = token rows, I = d_in (key size), O = d_out.

MALMEN/HORSE regularise the shift with e^λ I, which charges every key direction alike, so the shift moves the
directions that unrelated text uses as freely as any other (our measured leak into unrelated prompts). MEMIT's
prior charges a direction by how much unrelated text uses it: C0 = E[k kᵀ] over text the edit should leave
alone. With C0 = L Lᵀ (Cholesky) and W = L⁻ᵀ, the whitened keys K' = K W satisfy

    W (K'ᵀK' + e^λ I)⁻¹ K'ᵀ D̂ = (KᵀK + e^λ C0)⁻¹ KᵀD̂,

so the whole pipeline (hypernetwork, spread, identity ridge solve, its meta-gradients) runs unchanged on K';
its shift S' maps back to the layer as S = W S' (a key k sees k S = (k W) S'), and a loss gradient G_S reaches
S' as Wᵀ G_S. C0 is damped by `damping` x its mean eigenvalue so that W stays well conditioned.
"""

from __future__ import annotations

import torch
from torch import Tensor


def prior_whitening(second_moment_II: Tensor, count: int, damping: float) -> Tensor:
    """W_II = L⁻ᵀ for C0 = Σ k kᵀ / count + damping · tr(C0)/I · I = L Lᵀ (float64 inside, float32 out)."""
    if count <= 0:
        raise ValueError(f"key prior needs at least one key, got count={count}")
    c0_II = second_moment_II.detach().to(torch.float64) / count
    d_in = c0_II.shape[0]
    c0_II = c0_II + damping * (c0_II.trace() / d_in) * torch.eye(
        d_in, dtype=torch.float64, device=c0_II.device
    )
    chol_II = torch.linalg.cholesky(c0_II)
    eye_II = torch.eye(d_in, dtype=torch.float64, device=c0_II.device)
    inv_chol_II = torch.linalg.solve_triangular(chol_II, eye_II, upper=False)  # L⁻¹
    return inv_chol_II.T.contiguous().to(torch.float32)


def whiten_keys(keys_NI: Tensor, whitening_II: Tensor) -> Tensor:
    """K' = K W: the keys the pipeline edits in."""
    return keys_NI @ whitening_II


def layer_shift(shift_IO: Tensor, whitening_II: Tensor) -> Tensor:
    """S = W S': the whitened solve's shift as the layer applies it to raw keys."""
    return whitening_II @ shift_IO


def whitened_shift_grad(grad_IO: Tensor, whitening_II: Tensor) -> Tensor:
    """∂L/∂S' = Wᵀ ∂L/∂S."""
    return whitening_II.T @ grad_IO
