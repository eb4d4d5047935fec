"""MOSE's orthogonal update, its layer selection, and MEMIT's additive update (docs/mose.md derives them).

Shape legend: O = d_out (the edited module's output size, HF Linear orientation W: (O, I)), I = d_in (key size),
N = edits in the batch, L = candidate layers.

MOSE (paper Eq. 17): min_{R ∈ O(O)} λ‖R W0 K0 − W0 K0‖² + ‖R W0 K_E − V_E‖² = ‖RA − B‖² with
A = [√λ W0K0, W0K_E], B = [√λ W0K0, V_E]. ‖RA − B‖² = ‖A‖² + ‖B‖² − 2⟨R, BAᵀ⟩, so R maximises
⟨R, M⟩ with M = BAᵀ = λ W0 C0 W0ᵀ + V_E (W0 K_E)ᵀ, C0 = K0 K0ᵀ: the keys' second moment is all we need.
With M = UΣVᵀ, R = UVᵀ (orthogonal Procrustes, Schönemann 1966), and W ← R W0.

MEMIT: min_W λ‖W K0 − W0 K0‖² + ‖W K_E − V_E‖² has normal equations
ΔW (λ C0 + K_E K_Eᵀ) = (V_E − W0 K_E) K_Eᵀ for W = W0 + ΔW.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_shapes(w_OI: Tensor, c0_II: Tensor, keys_IN: Tensor, values_ON: Tensor) -> None:
    d_out, d_in = w_OI.shape
    if tuple(c0_II.shape) != (d_in, d_in):
        raise ValueError(f"C0 has shape {tuple(c0_II.shape)}, expected (d_in, d_in) = ({d_in}, {d_in})")
    if keys_IN.ndim != 2 or keys_IN.shape[0] != d_in:
        raise ValueError(f"keys K_E have shape {tuple(keys_IN.shape)}, expected (d_in={d_in}, n)")
    if tuple(values_ON.shape) != (d_out, keys_IN.shape[1]):
        raise ValueError(
            f"values V_E have shape {tuple(values_ON.shape)}, expected (d_out, n) = ({d_out}, {keys_IN.shape[1]})"
        )


def procrustes_cross_moment(
    w_OI: Tensor, c0_II: Tensor, keys_IN: Tensor, values_ON: Tensor, lam: float
) -> Tensor:
    """M = λ W0 C0 W0ᵀ + V_E (W0 K_E)ᵀ, shape (O, O), in the inputs' dtype (pass float64 for the solve)."""
    _check_shapes(w_OI, c0_II, keys_IN, values_ON)
    if not lam >= 0.0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    wk_ON = w_OI @ keys_IN
    return lam * (w_OI @ c0_II @ w_OI.T) + values_ON @ wk_ON.T


def procrustes_rotation(cross_OO: Tensor) -> Tensor:
    """R = U Vᵀ from M = U Σ Vᵀ: the orthogonal matrix maximising ⟨R, M⟩ (O, O)."""
    if not bool(torch.isfinite(cross_OO).all()):
        raise ValueError("MOSE cross moment M has non-finite entries (check C0, keys and values)")
    u_OO, _, vh_OO = torch.linalg.svd(cross_OO)
    return u_OO @ vh_OO


def mose_rotation(
    w_OI: Tensor, c0_II: Tensor, keys_IN: Tensor, values_ON: Tensor, lam: float, dtype: torch.dtype
) -> Tensor:
    """The MOSE rotation R (O, O) in `dtype` (float64 keeps RᵀR = I to ~1e-15 before the cast back)."""
    tensors = (t.to(dtype) for t in (w_OI, c0_II, keys_IN, values_ON))
    return procrustes_rotation(procrustes_cross_moment(*tensors, lam))


def procrustes_objective(rot_OO: Tensor, cross_OO: Tensor) -> Tensor:
    """⟨R, M⟩: the part of ‖RA − B‖² that depends on R, negated and halved (larger is better)."""
    return (rot_OO * cross_OO).sum()


def memit_delta(
    w_OI: Tensor, c0_II: Tensor, keys_IN: Tensor, values_ON: Tensor, lam: float, dtype: torch.dtype
) -> Tensor:
    """ΔW = (V_E − W0 K_E) K_Eᵀ (λ C0 + K_E K_Eᵀ)⁻¹, shape (O, I), by Cholesky of the SPD system."""
    _check_shapes(w_OI, c0_II, keys_IN, values_ON)
    w, c0, k, v = (t.to(dtype) for t in (w_OI, c0_II, keys_IN, values_ON))
    resid_ON = v - w @ k
    a_II = lam * c0 + k @ k.T
    chol, info = torch.linalg.cholesky_ex(a_II)
    if int(info) != 0:
        raise ValueError(
            f"MEMIT system λC0 + K_E K_Eᵀ (λ={lam}) is not positive definite (failed at minor {int(info)}): "
            "C0 is (numerically) singular; compute it from more, more varied tokens, or in float64"
        )
    # ΔWᵀ = A⁻¹ K_E R_resᵀ (A symmetric)
    return torch.cholesky_solve(k @ resid_ON.T, chol).T


def unreached_share(w_old_OI: Tensor, w_new_OI: Tensor, keys_IN: Tensor, values_ON: Tensor) -> float:
    """‖W_new K_E − V_E‖ / ‖W_old K_E − V_E‖ (Frobenius): the share of the change the edit asked of the layer
    that the update did not make; 0 where it reaches every value, 1 where it left the outputs as they were.
    A rotation keeps ‖W k‖, so MOSE cannot reach values longer or shorter than W k (docs/mose.md)."""
    if w_new_OI.shape != w_old_OI.shape:
        raise ValueError(
            f"weights before {tuple(w_old_OI.shape)} and after {tuple(w_new_OI.shape)} differ in shape"
        )
    k, v = keys_IN.double(), values_ON.double()
    asked = torch.linalg.matrix_norm(w_old_OI.double() @ k - v)
    left = torch.linalg.matrix_norm(w_new_OI.double() @ k - v)
    return float(left / asked.clamp_min(torch.finfo(torch.float64).tiny))


def layer_scores(resid_LON: list[Tensor], spectral_L: Tensor, key_norms_LN: Tensor) -> Tensor:
    """Paper Eq. 22 per candidate layer: ‖(V_E − W0 K_E) / (‖W0‖₂ · ‖σ(x W_fc)‖)‖_F, shape (L,).

    The activation σ(x W_fc) is the edited module's input (the key) at the subject's last token, so Eq. 21's
    norm is ‖k_i‖; each edit's residual column is divided by its own ‖W0‖₂ ‖k_i‖.
    """
    if len(resid_LON) != spectral_L.shape[0] or key_norms_LN.shape[0] != spectral_L.shape[0]:
        raise ValueError(
            f"got {len(resid_LON)} residuals, {spectral_L.shape[0]} norms, {key_norms_LN.shape[0]} key-norm rows"
        )
    scores = []
    for resid_ON, spectral, key_norms_N in zip(resid_LON, spectral_L, key_norms_LN):
        scale_N = spectral * key_norms_N.clamp_min(torch.finfo(key_norms_N.dtype).tiny)
        scores.append(torch.linalg.vector_norm(resid_ON / scale_N, dim=None))
    return torch.stack(scores)


def select_layer(layers: list[int], scores_L: Tensor) -> int:
    """l* = argmin of Eq. 22 among the candidate layers (first on ties)."""
    if len(layers) != scores_L.shape[0] or not layers:
        raise ValueError(f"got {len(layers)} candidate layers and {scores_L.shape[0]} scores")
    return layers[int(torch.argmin(scores_L))]


def with_neighbours(layer: int, n_layers: int, neighbours: int) -> list[int]:
    """The selected layer and `neighbours` layers on each side that exist, ascending."""
    return [i for i in range(layer - neighbours, layer + neighbours + 1) if 0 <= i < n_layers]


def frobenius_and_condition(w_OI: Tensor) -> tuple[float, float]:
    """‖W‖_F and κ₂(W) = σ_max / σ_min (pseudo-inverse convention: smallest singular value of a full-rank W)."""
    sv = torch.linalg.svdvals(w_OI.to(torch.float64))
    return float(torch.linalg.vector_norm(sv)), float(sv[0] / sv[-1])
