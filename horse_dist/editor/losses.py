"""Per-example losses and metrics over logits gathered at the selected (answer) positions only.

Shape legend: P = selected positions over the batch, V = vocabulary, E = n_examples.
example_ids_P[p] is the example that position p belongs to (0 ≤ id < E). Every function averages over an
example's own positions (index_add / bincount, no Python loops); an example with no position gets 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _per_example_mean(values_P: Tensor, example_ids_P: Tensor, n_examples: int) -> Tensor:
    """(E,) mean of values over each example's positions; 0 for examples without positions."""
    ids_P = example_ids_P.to(device=values_P.device, dtype=torch.long)
    counts_E = torch.bincount(ids_P, minlength=n_examples)
    if counts_E.numel() != n_examples:
        raise ValueError(f"example ids must lie in [0, {n_examples}); max id is {int(ids_P.max())}")
    sums_E = torch.zeros(n_examples, dtype=values_P.dtype, device=values_P.device).index_add(
        0, ids_P, values_P
    )
    return sums_E / counts_E.clamp_min(1).to(values_P.dtype)


def per_example_ce(logits_PV: Tensor, labels_P: Tensor, example_ids_P: Tensor, n_examples: int) -> Tensor:
    """(E,) mean token cross-entropy −log p(y_p) of each example, fp32 math (differentiable)."""
    ce_P = F.cross_entropy(logits_PV.float(), labels_P.long(), reduction="none")
    return _per_example_mean(ce_P, example_ids_P, n_examples)


def per_example_kl(
    logits_PV: Tensor, ref_logprobs_PV: Tensor, example_ids_P: Tensor, n_examples: int
) -> Tensor:
    """(E,) mean over the example's positions of KL(p_ref ‖ p_edit) = Σ_v p_ref (log p_ref − log p_edit).

    ref_logprobs are the unedited model's (normalised) log-probabilities; logits are the edited model's.
    """
    logp_edit_PV = F.log_softmax(logits_PV.float(), dim=-1)
    kl_P = F.kl_div(logp_edit_PV, ref_logprobs_PV.float(), reduction="none", log_target=True).sum(-1)
    return _per_example_mean(kl_P, example_ids_P, n_examples)


def per_example_accuracy(
    logits_PV: Tensor,
    labels_P: Tensor,
    example_ids_P: Tensor,
    n_examples: int,
    unscored_label: int | None = None,
) -> Tensor:
    """(E,) teacher-forced top-1 token accuracy: fraction of positions with argmax logits == label.

    MALMEN/HORSE ES/GS/LS semantics (per-example token accuracy, then the caller averages examples).
    Positions whose label is `unscored_label` (an end-of-text taught after the answer) are left out.
    """
    labels_P = labels_P.to(logits_PV.device)
    hit_P = (logits_PV.argmax(-1) == labels_P).float()
    if unscored_label is None:
        return _per_example_mean(hit_P, example_ids_P, n_examples)
    scored_P = labels_P != unscored_label
    return _per_example_mean(hit_P[scored_P], example_ids_P.to(labels_P.device)[scored_P], n_examples)


def per_example_agreement(
    pred_P: Tensor, ref_pred_P: Tensor, example_ids_P: Tensor, n_examples: int
) -> Tensor:
    """(E,) fraction of positions where the edited argmax equals the unedited model's (EasyEdit locality)."""
    same_P = (pred_P == ref_pred_P.to(pred_P.device)).float()
    return _per_example_mean(same_P, example_ids_P, n_examples)
