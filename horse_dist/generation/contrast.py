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
from dataclasses import replace

import torch
from torch import nn

from horse_dist.data.tokenize import CONTRAST_VIEWS, IGNORE_INDEX, TokenizedExample, TokenizedRecords

CONTRAST_METRICS = (
    "cf_efficacy",
    "cf_efficacy_mag",
    "cf_paraphrase",
    "cf_paraphrase_mag",
    "cf_neighbourhood",
    "cf_neighbourhood_mag",
)


def without_stop(example: TokenizedExample) -> TokenizedExample:
    """The example with the end-of-text after its answer (if any) left unscored."""
    if not example.ends_with_stop:
        return example
    return replace(example, labels=[*example.labels[:-1], IGNORE_INDEX], ends_with_stop=False)


# (score, view with the preferred answer, view with the other one)
CONTRAST_PAIRS = (
    ("efficacy", "edit", "edit_other"),
    ("paraphrase", "equiv", "equiv_other"),
    ("neighbourhood", "unrel", "unrel_other"),
)


def contrast_views(pool: TokenizedRecords, indices: Sequence[int]) -> dict[str, list[TokenizedExample]]:
    """The six (prompt, answer) views the scores compare, for the records `indices`, no end-of-text scored."""
    if pool.contrast is None:
        raise ValueError("contrast scores need records that name the answer an edit replaces (CounterFact)")
    sources = {"edit": pool.edit, "equiv": pool.equiv, "unrel": pool.unrel}
    sources.update({view: getattr(pool.contrast, view) for view in CONTRAST_VIEWS})
    return {view: [without_stop(examples[i]) for i in indices] for view, examples in sources.items()}


@torch.no_grad()
def answer_nll(
    model: nn.Module, examples: Sequence[TokenizedExample], pad_id: int, chunk: int = 64
) -> torch.Tensor:
    """(N,) float64 mean NLL of each example's scored answer tokens under `model` (with whatever hooks are
    active), right-padded batches of `chunk` sequences."""
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
            labels_BT[row, :n] = torch.as_tensor(example.labels)
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


def scores_from_nll(nll: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CONTRAST_METRICS per edit from the mean answer NLL of every view of contrast_views."""
    out = {}
    for name, preferred, other in CONTRAST_PAIRS:
        out.update(contrast_scores(nll[preferred], nll[other], name))
    return out


def counterfact_scores(
    model: nn.Module, pool: TokenizedRecords, indices: Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """Per-edit CONTRAST_METRICS of `model` as it is now (hooks active) on the records `indices` of `pool`,
    which must carry contrast views: one plain forward per view (EditEngine.answer_nll shares the blocks
    below the edited ones across model states)."""
    views = contrast_views(pool, indices)
    return scores_from_nll({view: answer_nll(model, examples, pad_id) for view, examples in views.items()})
