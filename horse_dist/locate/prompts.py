"""Prompts of the locate-then-edit methods: random prefixes, the subject's last token, padded batches.

Rows of a rewrite batch are edit-major: row i * P + p is edit i under prefix p (prefix 0 is empty, so
row i * P is the plain prompt). Legend: B rows, T positions, N edits, P prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from horse_dist.data.records import EditRecord
from horse_dist.data.tokenize import IGNORE_INDEX, tokenize_examples

# Sentence starts for the sampled prefixes (a fixed list keeps prefixes varied yet deterministic).
PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You", "It", "In", "A", "When", "She")


@dataclass
class LocateBatch:
    input_ids_BT: Tensor
    attention_mask_BT: Tensor
    labels_BT: Tensor  # pre-shifted answer targets (IGNORE_INDEX elsewhere); all IGNORE for essence rows
    subject_pos_B: Tensor  # position of the subject's last token in each row
    edit_of_row_B: Tensor  # which edit (0..N-1) each row belongs to
    n_edits: int


class SubjectNotFoundError(ValueError):
    """A record's subject does not occur in its prompt."""


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    # Some tokenizers end every sequence with EOS; it is not part of the text.
    if len(ids) > 1 and eos is not None and ids[-1] == eos and eos != tokenizer.bos_token_id:
        ids = ids[:-1]
    return ids


def _subject_end(text: str, subject: str, start: int, where: str) -> int:
    if not subject:
        raise SubjectNotFoundError(f"{where}: the record has no subject (locate-then-edit needs one)")
    found = text.find(subject, start)
    if found < 0:
        raise SubjectNotFoundError(f"{where}: subject {subject!r} not found in prompt {text[start:]!r}")
    return found + len(subject)


def subject_last_index(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    subject: str,
    input_ids: Sequence[int],
    start: int,
    where: str,
) -> int:
    """Index in `input_ids` (the tokens of `text`, possibly followed by more) of the subject's last token.

    `text` is tokenised up to and including the first occurrence of the subject at or after character `start`
    (the prompt after its prefix). If that piece's last token merges with what follows (subject "Paris" in
    "Parisian"), the merged token, the first that differs, holds the subject's end.
    """
    piece = _encode(tokenizer, text[: _subject_end(text, subject, start, where)])
    common = 0
    for a, b in zip(piece, input_ids):
        if a != b:
            break
        common += 1
    return len(piece) - 1 if common == len(piece) else common


def _pad(rows: list[list[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _batch(rows_ids, rows_labels, subject_pos, edit_of_row, n_edits, pad_id) -> LocateBatch:
    return LocateBatch(
        input_ids_BT=_pad(rows_ids, pad_id),
        attention_mask_BT=_pad([[1] * len(r) for r in rows_ids], 0),
        labels_BT=_pad(rows_labels, IGNORE_INDEX),
        subject_pos_B=torch.tensor(subject_pos, dtype=torch.long),
        edit_of_row_B=torch.tensor(edit_of_row, dtype=torch.long),
        n_edits=n_edits,
    )


def rows_of(batch: LocateBatch, rows_R: Tensor) -> LocateBatch:
    """The rows `rows_R` of `batch` (same edits, same width)."""
    return LocateBatch(
        input_ids_BT=batch.input_ids_BT[rows_R],
        attention_mask_BT=batch.attention_mask_BT[rows_R],
        labels_BT=batch.labels_BT[rows_R],
        subject_pos_B=batch.subject_pos_B[rows_R],
        edit_of_row_B=batch.edit_of_row_B[rows_R],
        n_edits=batch.n_edits,
    )


def stacked(first: LocateBatch, second: LocateBatch) -> LocateBatch:
    """The rows of `first`, then those of `second` (same edits), right-padded to the wider batch."""
    if first.n_edits != second.n_edits:
        raise ValueError(f"stacked batches edit {first.n_edits} and {second.n_edits} records")
    width = max(first.input_ids_BT.shape[1], second.input_ids_BT.shape[1])

    def both(field: str, pad: int) -> Tensor:
        parts = [getattr(b, field) for b in (first, second)]
        return torch.cat([F.pad(t, (0, width - t.shape[1]), value=pad) for t in parts])

    return LocateBatch(
        input_ids_BT=both("input_ids_BT", 0),  # a pad's id is never read: its mask is 0
        attention_mask_BT=both("attention_mask_BT", 0),
        labels_BT=both("labels_BT", IGNORE_INDEX),
        subject_pos_B=torch.cat([first.subject_pos_B, second.subject_pos_B]),
        edit_of_row_B=torch.cat([first.edit_of_row_B, second.edit_of_row_B]),
        n_edits=first.n_edits,
    )


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


def rewrite_batch(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[EditRecord],
    prefixes: Sequence[str],
    names: Sequence[str],
    stop_id: int | None = None,
) -> LocateBatch:
    """Every (prefix + prompt, answer) pair, teacher-forced; `names` label the records in errors. With
    `stop_id` (end-of-text, data.answer_end=eos) each answer's labels end with it, so the value target also
    makes the model stop after the answer instead of running on."""
    texts, answers, starts, owners = [], [], [], []
    for i, record in enumerate(records):
        for prefix in prefixes:
            texts.append(prefix + record.prompt)
            answers.append(record.answer)
            starts.append(len(prefix))
            owners.append(i)
    examples = tokenize_examples(tokenizer, texts, answers, stop_id)
    positions = [
        subject_last_index(tokenizer, text, records[i].subject, ex.input_ids, start, names[i])
        for text, ex, start, i in zip(texts, examples, starts, owners)
    ]
    return _batch(
        [ex.input_ids for ex in examples],
        [ex.labels for ex in examples],
        positions,
        owners,
        len(records),
        _pad_id(tokenizer),
    )


def essence_batch(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[EditRecord], template: str, names: Sequence[str]
) -> LocateBatch:
    """One "{subject} is a" row per edit: its next-token distribution at the subject's last token is kept."""
    if "{}" not in template:
        raise ValueError(f"locate.essence_template {template!r} needs a '{{}}' placeholder for the subject")
    rows, positions = [], []
    for record, name in zip(records, names):
        text = template.replace("{}", record.subject)
        ids = _encode(tokenizer, text)
        rows.append(ids)
        positions.append(subject_last_index(tokenizer, text, record.subject, ids, template.index("{}"), name))
    n = len(records)
    return _batch(
        rows, [[IGNORE_INDEX] * len(r) for r in rows], positions, list(range(n)), n, _pad_id(tokenizer)
    )


@torch.no_grad()
def sample_prefixes(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    n_prefixes: int,
    length: int,
    seed: int,
    top_k: int = 5,
) -> list[str]:
    """ "" plus `n_prefixes` short texts sampled from the model (top-k, seeded), each ending in ". ".

    As in MEMIT, keys and values are averaged over random contexts so that they hold for the subject in
    general rather than only right after the start of a text.
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    prefixes = [""]
    for i in range(n_prefixes):
        ids = _encode(tokenizer, PREFIX_STARTS[i % len(PREFIX_STARTS)])
        for _ in range(length):
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
            top_v, top_i = torch.topk(logits, k=min(top_k, logits.shape[0]))
            choice = torch.multinomial(torch.softmax(top_v, -1), 1, generator=generator)
            ids.append(int(top_i[choice]))
        # Braces would upset templates downstream; whitespace is normalised so prefixes read as one line.
        text = tokenizer.decode(ids, skip_special_tokens=True)
        text = " ".join(text.replace("{", " ").replace("}", " ").split())
        prefixes.append(f"{text}. ")
    return prefixes
