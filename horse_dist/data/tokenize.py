"""Prompt/answer tokenisation with pre-shifted labels (labels[t] is the token to predict at position t)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from transformers import PreTrainedTokenizerBase

from horse_dist.data.records import EditRecord

IGNORE_INDEX = -100
_WORD_START_MARKERS = ("▁", "Ġ")  # SentencePiece / byte-level BPE spellings of a leading space


@dataclass
class TokenizedExample:
    input_ids: list[int]  # prompt ids + answer ids[:-1]
    labels: list[int]  # IGNORE_INDEX for the first len(prompt)-1 positions, then the answer ids
    # the last label is an end-of-text that ends the answer (data.answer_end=eos): learned, never scored
    ends_with_stop: bool = False

    @property
    def answer_ids(self) -> list[int]:
        """The answer's own ids (without the end-of-text that may follow it)."""
        ids = [label for label in self.labels if label != IGNORE_INDEX]
        return ids[:-1] if self.ends_with_stop else ids


@dataclass
class ContrastViews:
    """The counterparts ROME's contrast scores compare the pool's views with (CounterFact only)."""

    edit_other: list[TokenizedExample]  # (prompt, other_answer)
    equiv_other: list[TokenizedExample]  # (rephrase, other_answer)
    # (loc_prompt, the one of answer / other_answer that is not loc_answer): on a CounterFact neighbour prompt,
    # the counterfactual object whichever way the edit goes
    unrel_other: list[TokenizedExample]

    def select(self, keep: Sequence[int]) -> ContrastViews:
        return ContrastViews(*(take(getattr(self, v), keep) for v in CONTRAST_VIEWS))


def take(view: Sequence[TokenizedExample], keep: Sequence[int]) -> Sequence[TokenizedExample]:
    """The examples `keep` of a view, in that order; a stored view (data/token_store.py) stays on disk."""
    select = getattr(view, "select", None)
    return select(keep) if select is not None else [view[i] for i in keep]


def sequence_lengths(view: Sequence[TokenizedExample]) -> Sequence[int]:
    """The input lengths of a view's examples; a stored view reads them off its offsets."""
    lengths = getattr(view, "lengths", None)
    return lengths() if lengths is not None else [len(e.input_ids) for e in view]


CONTRAST_VIEWS = ("edit_other", "equiv_other", "unrel_other")
VIEWS = ("edit", "equiv", "unrel")


@dataclass
class TokenizedRecords:
    edit: list[TokenizedExample]  # (prompt, answer)
    equiv: list[TokenizedExample]  # (rephrase, answer)
    unrel: list[TokenizedExample]  # (loc_prompt, loc_answer)
    contrast: ContrastViews | None = None  # where every record names the answer it replaces
    # Names this pool in the block-input cache's keys: unlike id(), never reused by a later pool, in this
    # process or another.
    uid: int = field(default_factory=lambda: uuid.uuid4().int, compare=False)

    def all_views(self) -> list[list[TokenizedExample]]:
        contrast = [getattr(self.contrast, v) for v in CONTRAST_VIEWS] if self.contrast else []
        return [self.edit, self.equiv, self.unrel, *contrast]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and backend.truncation is None and backend.padding is None:
        # the ids tokenizer(texts) returns, without building its per-text dicts (half the time at 155k records)
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=special)]
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def _appends_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's post-processor ends every sequence with EOS (which must not reach the labels)."""
    ids = _encode(tokenizer, [""], special=True)[0]
    eos = tokenizer.eos_token_id
    return bool(ids) and eos is not None and ids[-1] == eos and eos != tokenizer.bos_token_id


def _is_space(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    return not tokenizer.decode([token_id]).strip()


def _answer_after_prompt(prompt_ids: list[int], full_ids: list[int]) -> list[int] | None:
    """What the full text adds after the prompt, or None where tokens merge across the boundary."""
    return full_ids[len(prompt_ids) :] if full_ids[: len(prompt_ids)] == prompt_ids else None


def _drop_duplicate_space(tokenizer: PreTrainedTokenizerBase, answer_ids: list[int]) -> list[int]:
    """SentencePiece tokenizers may encode " Paris" alone as ['▁', '▁Paris']: that '▁' is an artefact."""
    if len(answer_ids) > 1 and _is_space(tokenizer, answer_ids[0]):
        if tokenizer.convert_ids_to_tokens(answer_ids[1]).startswith(_WORD_START_MARKERS):
            return answer_ids[1:]
    return answer_ids


def _detach_leading_space(
    space_ids: set[int], prompt_ids: list[int], answer_ids: list[int]
) -> tuple[list[int], list[int]]:
    """A lone space token that is really part of the text (e.g. SmolLM2's 'Ġ' before digits) is read, not
    predicted: it moves to the prompt side, so that no label asks for a bare space."""
    if len(answer_ids) > 1 and answer_ids[0] in space_ids:
        return prompt_ids + answer_ids[:1], answer_ids[1:]
    return prompt_ids, answer_ids


def _example(prompt_ids: list[int], answer_ids: list[int], stop_id: int | None) -> TokenizedExample:
    if stop_id is not None:
        answer_ids = [*answer_ids, stop_id]
    return TokenizedExample(
        input_ids=prompt_ids + answer_ids[:-1],
        labels=[IGNORE_INDEX] * (len(prompt_ids) - 1) + answer_ids,
        ends_with_stop=stop_id is not None,
    )


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    stop_id: int | None = None,
) -> list[TokenizedExample]:
    """Tokenise `prompt + " " + answer` pairs, in batched calls, as the tokenizer tokenises that text.
    With `stop_id` (end-of-text), the answer's labels end with it: the model is taught to stop after the answer.

    The answer ids are what the full text adds after the prompt's ids. Where the prompt's ids are not a
    prefix of the full text's (a merge across the boundary), the answer is tokenised on its own after a
    space instead, minus a duplicated lone-space token. Special tokens (BOS) come from the tokenizer;
    EOS is never part of the answer.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
    prompts = [prompt.rstrip() for prompt in prompts]  # a trailing space would double the separator
    answers = [answer.strip() for answer in answers]
    prompt_ids = _encode(tokenizer, prompts, special=True)
    full_ids = _encode(tokenizer, [f"{p} {a}" for p, a in zip(prompts, answers)], special=True)
    if _appends_eos(tokenizer):
        prompt_ids = [ids[:-1] for ids in prompt_ids]
        full_ids = [ids[:-1] for ids in full_ids]

    answer_ids = [_answer_after_prompt(p, f) for p, f in zip(prompt_ids, full_ids)]
    fallback = [i for i, ids in enumerate(answer_ids) if ids is None]
    alone = _encode(tokenizer, [" " + answers[i] for i in fallback], special=False)
    for i, ids in zip(fallback, alone):
        answer_ids[i] = _drop_duplicate_space(tokenizer, ids)

    # decoded once per distinct first answer token, not once per answer
    space_ids = {t for t in {ids[0] for ids in answer_ids if ids} if _is_space(tokenizer, t)}
    examples = []
    for prompt, answer, prompt_part, answer_part in zip(prompts, answers, prompt_ids, answer_ids):
        if not answer or not answer_part:
            raise ValueError(f"answer {answer!r} (prompt {prompt!r}) tokenises to zero tokens")
        if not prompt_part:
            raise ValueError(f"prompt {prompt!r} tokenises to zero tokens")
        examples.append(_example(*_detach_leading_space(space_ids, prompt_part, answer_part), stop_id))
    return examples


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, stop_id: int | None = None
) -> TokenizedExample:
    return tokenize_examples(tokenizer, [prompt], [answer], stop_id)[0]


def answer_stop_id(tokenizer: PreTrainedTokenizerBase, answer_end: str) -> int | None:
    """The id that ends every edit answer (`data.answer_end`): end-of-text for "eos", none for "none"."""
    if answer_end == "none":
        return None
    if tokenizer.eos_token_id is None:
        raise ValueError("data.answer_end=eos needs a tokenizer with an eos token; use data.answer_end=none")
    return int(tokenizer.eos_token_id)


def tokenize_records(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[EditRecord], stop_id: int | None = None
) -> TokenizedRecords:
    """Tokenise once, up front, the three views (edit, equivalent, unrelated) of every record; the edit and
    equivalent answers end with `stop_id` where given (the unrelated prompts keep their own answers). Where
    every record names the answer it replaces (CounterFact), the contrast views are tokenised too."""
    answers = [r.answer for r in records]
    contrast = None
    if records and all(r.other_answer for r in records):
        others = [r.other_answer for r in records]
        unrel_others = [r.answer if r.answer != r.loc_answer else r.other_answer for r in records]
        contrast = ContrastViews(
            edit_other=tokenize_examples(tokenizer, [r.prompt for r in records], others),
            equiv_other=tokenize_examples(tokenizer, [r.rephrase for r in records], others),
            unrel_other=tokenize_examples(tokenizer, [r.loc_prompt for r in records], unrel_others),
        )
    return TokenizedRecords(
        edit=tokenize_examples(tokenizer, [r.prompt for r in records], answers, stop_id),
        equiv=tokenize_examples(tokenizer, [r.rephrase for r in records], answers, stop_id),
        unrel=tokenize_examples(tokenizer, [r.loc_prompt for r in records], [r.loc_answer for r in records]),
        contrast=contrast,
    )


def overlong(tokenized: TokenizedRecords, max_tokens: int) -> list[int]:
    """Indices of records any of whose sequences is longer than `max_tokens` (the model's positions)."""
    if not len(tokenized.edit):
        return []
    longest = np.max([np.asarray(sequence_lengths(view)) for view in tokenized.all_views()], axis=0)
    return np.flatnonzero(longest > max_tokens).tolist()


def select_records(tokenized: TokenizedRecords, keep: Sequence[int]) -> TokenizedRecords:
    """The records `keep` (in that order), every view."""
    return TokenizedRecords(
        *(take(getattr(tokenized, v), keep) for v in VIEWS),
        contrast=tokenized.contrast.select(keep) if tokenized.contrast else None,
    )


def concat_records(first: TokenizedRecords, second: TokenizedRecords) -> TokenizedRecords:
    """`first`'s records, then `second`'s (contrast views only where both have them)."""
    contrast = None
    if first.contrast and second.contrast:
        contrast = ContrastViews(
            *(getattr(first.contrast, v) + getattr(second.contrast, v) for v in CONTRAST_VIEWS)
        )
    return TokenizedRecords(*(getattr(first, v) + getattr(second, v) for v in VIEWS), contrast=contrast)
