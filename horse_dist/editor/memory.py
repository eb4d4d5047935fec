"""Ridge memory: a hypernetwork editor's stream solved as one batch of all its edits so far (issue 16 item 3).

Shape legend: N = token rows of one step, I = d_in (key size), O = d_out. S and T are (I, O): the layer's
output on keys K changes by K S.

One step's solve is S_t = (K_tᵀK_t + λI)⁻¹ K_tᵀD̂_t (solve.py), so its right-hand side is recovered from the
shift it returned: K_tᵀD̂_t = (K_tᵀK_t + λI) S_t. The editor computes every step's K_t and D̂_t on the
unedited weights W_0 (lifelong/editors.py), so each D̂_t is the output change wanted from W_0, and the solve over
steps 1..t is

    T_t = (Σ_s K_sᵀK_s + λI)⁻¹ Σ_s K_sᵀD̂_s

of which the step applies T_t − T_{t−1}. Earlier edits stay in the system as rows of the least-squares
problem instead of being overwritten by later shifts; with one step it is the plain solve (T_1 = S_1). After
t steps the weights are those one batch of all t steps' edits gives where D̂ is per edit (MALMEN); HORSE's
orthogonal spread measures its coefficients over the step's own rows, so its D̂ differ a little.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RidgeMemory:
    """Running sums of one layer, float64: gram_II = Σ KᵀK, rhs_IO = Σ KᵀD̂, total_IO = T."""

    gram_II: Tensor
    rhs_IO: Tensor
    total_IO: Tensor

    @classmethod
    def empty(cls, d_in: int, d_out: int, device: torch.device | str = "cpu") -> RidgeMemory:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        return cls(zeros(d_in, d_in), zeros(d_in, d_out), zeros(d_in, d_out))


def remembered_step(
    memory: RidgeMemory, keys_NI: Tensor, shift_IO: Tensor, ridge: float
) -> tuple[RidgeMemory, Tensor]:
    """The memory after one step whose own solve (ridge e^λ = `ridge`) gave `shift_IO` on `keys_NI`, and the
    increment T_t − T_{t−1} (I, O) to apply, in shift_IO's dtype."""
    d_in, d_out = memory.rhs_IO.shape
    if keys_NI.ndim != 2 or keys_NI.shape[1] != d_in or tuple(shift_IO.shape) != (d_in, d_out):
        raise ValueError(
            f"keys {tuple(keys_NI.shape)} and shift {tuple(shift_IO.shape)} do not fit a memory of "
            f"(d_in, d_out) = ({d_in}, {d_out})"
        )
    if not ridge > 0.0:
        raise ValueError(f"ridge strength must be positive, got {ridge}")
    keys, shift = keys_NI.to(torch.float64), shift_IO.to(torch.float64)
    step_gram_II = keys.T @ keys
    own_rhs_IO = step_gram_II @ shift + ridge * shift  # K_tᵀD̂_t
    gram_II = memory.gram_II + step_gram_II
    rhs_IO = memory.rhs_IO + own_rhs_IO
    system_II = gram_II.clone()
    system_II.diagonal().add_(ridge)
    total_IO = torch.cholesky_solve(rhs_IO, torch.linalg.cholesky(system_II))
    increment_IO = (total_IO - memory.total_IO).to(shift_IO.dtype)
    return RidgeMemory(gram_II, rhs_IO, total_IO), increment_IO
