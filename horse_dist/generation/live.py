"""Scores of an edit as a user sees it, from greedy generations of the edit, rephrase and unrelated prompts.

Per edit (values in [0, 1] unless said otherwise), for one state of the model (unedited, or with shifts):
  live_ES / live_GS            the target answer starts the plain greedy continuation (normalised text)
  live_ES_tokens / _GS_tokens  fraction of the target's tokens that continuation reproduces from its start
  loc_gen_same                 the unrelated prompt's first `loc_tokens` generated ids equal the unedited
                               model's (end-of-text kept out of them: an instruct model may end at once)
  loops_edit / loops_unrel     a 3-gram repeated in the first `loop_window` ids of the plain continuation
                               (what a user reads)
  entropy_edit / entropy_unrel ROME's generation entropy (bits) of the free generation
The free generation is `new_tokens` long with end-of-text kept out; the plain one is its prefix up to
where end-of-text would have been chosen (generation.decode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from horse_dist.data.tokenize import IGNORE_INDEX, TokenizedExample, TokenizedRecords
from horse_dist.generation import metrics
from horse_dist.generation.decode import Continuations, greedy_continuations

LIVE_METRICS = (
    "live_ES",
    "live_GS",
    "live_ES_tokens",
    "live_GS_tokens",
    "loc_gen_same",
    "loops_edit",
    "loops_unrel",
    "entropy_edit",
    "entropy_unrel",
)


def prompt_ids(example: TokenizedExample) -> list[int]:
    """The ids a user's prompt gives the model: everything before the first answer token."""
    n_context = sum(1 for label in example.labels if label == IGNORE_INDEX) + 1
    return example.input_ids[:n_context]


@dataclass
class LiveRequests:
    """The three prompt kinds of a batch of edits, with each edit's target answer."""

    edit: list[list[int]]
    equiv: list[list[int]]
    unrel: list[list[int]]
    target_ids: list[list[int]]

    @classmethod
    def from_pool(cls, pool: TokenizedRecords, indices: Sequence[int]) -> LiveRequests:
        return cls(
            [prompt_ids(pool.edit[i]) for i in indices],
            [prompt_ids(pool.equiv[i]) for i in indices],
            [prompt_ids(pool.unrel[i]) for i in indices],
            [pool.edit[i].answer_ids for i in indices],
        )

    def __len__(self) -> int:
        return len(self.edit)


@dataclass
class LiveEval:
    tokenizer: object
    new_tokens: int = 12
    loc_tokens: int = 8
    loop_window: int = 12

    @property
    def eos_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_ids[0]

    def generate(self, model: nn.Module, requests: LiveRequests) -> dict[str, Continuations]:
        """One batched decode over the three prompt kinds."""
        prompts = requests.edit + requests.equiv + requests.unrel
        out = greedy_continuations(model, prompts, self.new_tokens, self.pad_id, self.eos_ids)
        n = len(requests)
        return {
            kind: Continuations(out.ids[i * n : (i + 1) * n], out.live[i * n : (i + 1) * n])
            for i, kind in enumerate(("edit", "equiv", "unrel"))
        }

    def scores(
        self, requests: LiveRequests, generated: dict[str, Continuations], reference: Continuations
    ) -> dict[str, torch.Tensor]:
        """Per-edit live scores (LIVE_METRICS) of `generated` against the unedited model's unrelated ones."""
        decode = self.tokenizer.batch_decode
        targets = decode(requests.target_ids, skip_special_tokens=True)
        out: dict[str, list[float]] = {}
        for kind, name in (("edit", "ES"), ("equiv", "GS")):
            live = generated[kind].live
            texts = decode(live, skip_special_tokens=True)
            out[f"live_{name}"] = [float(metrics.target_is_prefix(t, a)) for t, a in zip(texts, targets)]
            out[f"live_{name}_tokens"] = [
                metrics.token_prefix_fraction(g, a) for g, a in zip(live, requests.target_ids)
            ]
        unrel = generated["unrel"].ids
        out["loc_gen_same"] = [
            float(metrics.same_first_tokens(g, r, self.loc_tokens)) for g, r in zip(unrel, reference.ids)
        ]
        for kind in ("edit", "unrel"):
            live, free = generated[kind].live, generated[kind].ids
            out[f"loops_{kind}"] = [float(metrics.has_repeated_ngram(g, 3, self.loop_window)) for g in live]
            out[f"entropy_{kind}"] = [
                metrics.ngram_entropy(t) for t in decode(free, skip_special_tokens=True)
            ]
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}
