"""AlphaEdit's null-space constrained update (Fang et al., ICLR 2025; docs/mose.md derives it).

Shape legend: O = d_out, I = d_in (key size), N = edits in the batch. W is (O, I) (HF Linear orientation).

MEMIT's update trades the edits against the preserved keys K0 through λ C0. AlphaEdit removes the trade:
the update is D = Δ P, with P (I, I) the orthogonal projector onto the null space of the preserved keys, so
D K0 = Δ P K0 ≈ 0 and what the model computes for those keys stays as it was, whatever Δ is. Δ minimises

    ‖(W + ΔP) K_E − V_E‖² + l2 ‖ΔP‖² + ‖ΔP K_p‖²

with K_p the keys of earlier edits of a stream (C_p = K_p K_pᵀ; kept, not traded). Setting the gradient in
Δ to zero, with R = V_E − W K_E:

    [ΔP (K_E K_Eᵀ + C_p) + l2 ΔP − R K_Eᵀ] P = 0.

Δ = R K_Eᵀ P ((K_E K_Eᵀ + C_p) P + l2 I)⁻¹ satisfies it: from Δ((K_E K_Eᵀ + C_p) P + l2 I) = R K_Eᵀ P,
Δ = (R K_Eᵀ P − Δ (K_E K_Eᵀ + C_p) P) / l2 ends in P, so ΔP = Δ (P² = P), and substituting gives the
condition. Hence the update is Δ itself (ΔP = Δ), as the paper's code applies it.

The null space: C0 = U Λ Uᵀ (eigenvalues ascending); P = U₀ U₀ᵀ over the smallest eigenvalues whose sum is
at most `energy` · tr(C0). Then ‖P K0‖²_F ≤ energy · ‖K0‖²_F: the preserved keys keep at most that fraction
of their energy where the update can act. (The paper thresholds the eigenvalues of its Wikipedia C0 at 2e-2,
an absolute value tied to that model's key scale; a fraction of the trace carries over between models.)
"""

from __future__ import annotations

import torch
from torch import Tensor


def null_space_projector(c0_II: Tensor, energy: float) -> Tensor:
    """P (I, I): the projector onto C0's eigenvectors with the smallest eigenvalues, together at most
    `energy` of tr(C0). Symmetric, idempotent, in C0's dtype (pass float64)."""
    if not 0.0 <= energy < 1.0:
        raise ValueError(f"null-space energy must be in [0, 1), got {energy}")
    evals_I, evecs_II = torch.linalg.eigh(c0_II)  # ascending
    evals_I = evals_I.clamp_min(0.0)  # round-off of a PSD matrix
    cumulative_I = torch.cumsum(evals_I, 0)
    kept = int((cumulative_I <= energy * cumulative_I[-1]).sum())
    basis_IK = evecs_II[:, :kept]
    return basis_IK @ basis_IK.T


def alphaedit_delta(
    w_OI: Tensor,
    keys_IN: Tensor,
    values_ON: Tensor,
    projector_II: Tensor,
    edited_II: Tensor,
    l2: float,
    dtype: torch.dtype,
) -> Tensor:
    """Δ = R K_Eᵀ P ((K_E K_Eᵀ + C_p) P + l2 I)⁻¹ (O, I), R = V_E − W K_E; `edited_II` is C_p."""
    d_out, d_in = w_OI.shape
    for name, tensor, shape in (("P", projector_II, (d_in, d_in)), ("C_p", edited_II, (d_in, d_in))):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    if keys_IN.ndim != 2 or keys_IN.shape[0] != d_in or tuple(values_ON.shape) != (d_out, keys_IN.shape[1]):
        raise ValueError(
            f"keys {tuple(keys_IN.shape)} and values {tuple(values_ON.shape)} do not fit W {tuple(w_OI.shape)}"
        )
    if not l2 > 0.0:
        raise ValueError(f"AlphaEdit's l2 must be positive, got {l2}")
    w, k, v, p, c = (t.to(dtype) for t in (w_OI, keys_IN, values_ON, projector_II, edited_II))
    resid_ON = v - w @ k
    system_II = (k @ k.T + c) @ p + l2 * torch.eye(d_in, dtype=dtype, device=w.device)
    # Δ S = B  <=>  Sᵀ Δᵀ = Bᵀ (S is not symmetric: P does not commute with K Kᵀ + C_p)
    return torch.linalg.solve(system_II.T, (resid_ON @ k.T @ p).T).T
