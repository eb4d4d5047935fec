"""CounterFact's contrast scores (ROME/MEMIT): does the model prefer the edit's answer to the one it replaces?

Per edit, with P(a | p) = exp(-mean token NLL of answer a after prompt p) as ROME computes it, o* the edit's
answer and o the answer it replaces (CounterFact, data.target=new: the new and the true object):
  cf_efficacy        P(o* | edit prompt) > P(o | edit prompt)           (ROME's ES)
  cf_efficacy_mag    P(o* | edit prompt) - P(o | edit prompt)           (EM)
  cf_paraphrase      the same on the rephrased prompt                   (PS)
  cf_paraphrase_mag                                                     (PM)
  cf_neighbourhood   P(true | neighbour prompt) > P(new | neighbour)    (NS: neighbours keep their object)
  cf_neighbourhood_mag P(true | neighbour) - P(new | neighbour)         (NM)
ROME averages over all paraphrase and neighbourhood prompts of a record; a record here carries the first of
each. The end-of-text that may follow an edit answer (data.answer_end=eos) is not scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from horse_dist.data.tokenize import IGNORE_INDEX, TokenizedExample, TokenizedRecords

CONTRAST_METRICS = (
    "cf_efficacy",
    "cf_efficacy_mag",
    "cf_paraphrase",
    "cf_paraphrase_mag",
    "cf_neighbourhood",
    "cf_neighbourhood_mag",
)


def scored_labels(example: TokenizedExample) -> list[int]:
    """The example's labels with the end-of-text after the answer (if any) masked out."""
    labels = list(example.labels)
    if example.ends_with_stop:
        labels[-1] = IGNORE_INDEX
    return labels


@torch.no_grad()
def answer_nll(
    model: nn.Module, examples: Sequence[TokenizedExample], pad_id: int, chunk: int = 64
) -> torch.Tensor:
    """(N,) float64 mean NLL of each example's answer tokens under `model` (with whatever hooks are active),
    right-padded batches of `chunk` sequences."""
    device = model.get_input_embeddings().weight.device
    out = []
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        width = max(len(e.input_ids) for e in part)
        ids_BT = torch.full((len(part), width), pad_id, dtype=torch.long)
        labels_BT = torch.full((len(part), width), IGNORE_INDEX, dtype=torch.long)
        mask_BT = torch.zeros((len(part), width), dtype=torch.long)
        for row, example in enumerate(part):
            n = len(example.input_ids)
            ids_BT[row, :n] = torch.as_tensor(example.input_ids)
            labels_BT[row, :n] = torch.as_tensor(scored_labels(example))
            mask_BT[row, :n] = 1
        ids_BT, labels_BT, mask_BT = ids_BT.to(device), labels_BT.to(device), mask_BT.to(device)
        hidden_BTH = model.base_model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)[0]
        scored_BT = labels_BT != IGNORE_INDEX
        logprobs_PV = torch.log_softmax(model.get_output_embeddings()(hidden_BTH[scored_BT]).double(), -1)
        nll_P = -logprobs_PV.gather(-1, labels_BT[scored_BT][:, None])[:, 0]
        rows_P = torch.arange(len(part), device=device)[:, None].expand_as(scored_BT)[scored_BT]
        sums = torch.zeros(len(part), dtype=torch.float64, device=device).index_add_(0, rows_P, nll_P)
        out.append((sums / scored_BT.sum(-1).double()).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def contrast_scores(
    nll_prefer_N: torch.Tensor, nll_other_N: torch.Tensor, name: str
) -> dict[str, torch.Tensor]:
    """`cf_<name>` = P(preferred) > P(other) and `cf_<name>_mag` = P(preferred) - P(other), per row."""
    p_prefer_N, p_other_N = torch.exp(-nll_prefer_N), torch.exp(-nll_other_N)
    return {f"cf_{name}": (nll_prefer_N < nll_other_N).double(), f"cf_{name}_mag": p_prefer_N - p_other_N}


def counterfact_scores(
    model: nn.Module, pool: TokenizedRecords, indices: Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """Per-edit CONTRAST_METRICS of `model` as it is now (hooks active) on the records `indices` of `pool`,
    which must carry contrast views."""
    if pool.contrast is None:
        raise ValueError("contrast scores need records that name the answer an edit replaces (CounterFact)")
    views = {
        "edit": pool.edit,
        "equiv": pool.equiv,
        "unrel": pool.unrel,
        "edit_other": pool.contrast.edit_other,
        "equiv_other": pool.contrast.equiv_other,
        "unrel_other": pool.contrast.unrel_other,
    }
    examples = [views[v][i] for v in views for i in indices]
    nll = answer_nll(model, examples, pad_id).view(len(views), len(indices))
    nll_of = dict(zip(views, nll))
    return {
        **contrast_scores(nll_of["edit"], nll_of["edit_other"], "efficacy"),
        **contrast_scores(nll_of["equiv"], nll_of["equiv_other"], "paraphrase"),
        **contrast_scores(nll_of["unrel"], nll_of["unrel_other"], "neighbourhood"),
    }
