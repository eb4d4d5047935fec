"""Padding-free micro-batches: several sequences per row, each attending only to itself.

On a CPU a pass costs its padded token count. Rectangular batches of zsRE prompts (7 to 60 tokens) carry
20-30 % padding even sorted by length; rows of 64 tokens packed first-fit-decreasing carry a few percent,
and attention over 64 positions costs ~2 % of a SmolLM2 block's matmuls.
Which sequence a token belongs to travels as `segment_ids`; `lm.passes.model_inputs` turns it into a
block-diagonal causal mask and per-sequence positions, so every sequence sees exactly what it would alone.
"""

from __future__ import annotations

import torch

from horse_dist.data.batching import TokenBatch, check_min_batches
from horse_dist.data.tokenize import IGNORE_INDEX, TokenizedExample

Plan = list[list[list[int]]]  # micro-batches -> rows -> example indices


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing: example indices per row, each row at most `row_tokens` long (a longer
    sequence gets a row of its own). Deterministic: ties keep index order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_tokens - lengths[i])
    return rows


def packed_plan(
    examples: list[TokenizedExample],
    max_rows: int,
    max_tokens: int = 0,
    min_batches: int = 0,
    row_tokens: int = 64,
) -> Plan:
    """Rows of `row_tokens` (the longest sequence, if longer) packed first-fit decreasing, grouped into
    micro-batches of at most `max_rows` rows and `max_tokens` padded tokens (0: no limit). `min_batches`
    splits the largest micro-batches (by rows, then a lone row by its sequences) until there are that many:
    ZeRO-3 workers must run equal numbers of passes."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    check_min_batches(len(examples), min_batches)
    if not examples:
        return []
    lengths = [len(example.input_ids) for example in examples]
    row_tokens = max(row_tokens, max(lengths))
    plan: Plan = []
    for row in pack_rows(lengths, row_tokens):
        if plan:
            batch = plan[-1]
            fits_tokens = max_tokens <= 0 or row_tokens * (len(batch) + 1) <= max_tokens
            if fits_tokens and len(batch) < max_rows:
                batch.append(row)
                continue
        plan.append([row])
    while len(plan) < min_batches:
        largest = max(range(len(plan)), key=lambda b: (len(plan[b]), sum(map(len, plan[b]))))
        batch = plan.pop(largest)
        if len(batch) == 1:  # one row: split its sequences into two rows
            row = batch[0]
            halves = [[row[: len(row) // 2]], [row[len(row) // 2 :]]]
        else:
            halves = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
        plan[largest:largest] = halves
    return plan


def collate_packed(examples: list[TokenizedExample], rows: list[list[int]], pad_id: int) -> TokenBatch:
    """One packed micro-batch; `rows` holds indices into `examples`, which are also the edit indices."""
    if not rows or not all(rows):
        raise ValueError("a packed micro-batch needs at least one row and no empty rows")
    length = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    example_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for segment, i in enumerate(row):
            example = examples[i]
            end = start + len(example.input_ids)
            input_ids[r, start:end] = torch.tensor(example.input_ids)
            labels[r, start:end] = torch.tensor(example.labels)
            attention_mask[r, start:end] = 1
            example_ids[r, start:end] = i
            segment_ids[r, start:end] = segment
            position_ids[r, start:end] = torch.arange(end - start)
            start = end
    return TokenBatch(input_ids, attention_mask, labels, example_ids, segment_ids, position_ids)


def packed_micro_batches(
    examples: list[TokenizedExample],
    max_rows: int,
    pad_id: int,
    max_tokens: int = 0,
    min_batches: int = 0,
    row_tokens: int = 64,
) -> list[TokenBatch]:
    plan = packed_plan(examples, max_rows, max_tokens, min_batches, row_tokens)
    return [collate_packed(examples, rows, pad_id) for rows in plan]
