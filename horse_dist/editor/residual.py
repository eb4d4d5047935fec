"""Per-token coefficient and residual of DESIGN §1 step 3.

Shape legend: N = token rows, I = d_in (key size), O = d_out.
"""

from __future__ import annotations

from torch import Tensor


def residual(keys_NI: Tensor, pseudo_keys_NI: Tensor, pseudo_grads_NO: Tensor, eta: Tensor) -> Tensor:
    """D_NO = c ⊙ G̃ (row-wise) with c_i = −η Σ_j K_ij K̃_ij.

    K are the raw cached keys, K̃ and G̃ the hypernet outputs (normalised units), η the layer's learnable
    step size (0-d tensor; differentiable). Math in the pseudo tensors' dtype (float32 from HyperNet).
    """
    coef_N1 = -eta * (keys_NI.to(pseudo_keys_NI.dtype) * pseudo_keys_NI).sum(-1, keepdim=True)
    return coef_N1 * pseudo_grads_NO
