"""Padding into batches, and the deterministic index plans: train/eval split, meta-batches, worker shards."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch

from horse_dist.data.tokenize import IGNORE_INDEX, TokenizedExample


@dataclass
class TokenBatch:
    """Right-padded rows of token ids. A row holds one sequence, or when packed (`visible_until` set) a prefix
    tree of several (data/packing.py): then a token sees only its ancestors, positions are depths."""

    input_ids: torch.Tensor  # (B, T) long, right-padded with the pad id
    attention_mask: torch.Tensor  # (B, T) long: 1 at real tokens
    labels: torch.Tensor  # (B, T) long, IGNORE_INDEX at prompt and pad positions
    example_ids: torch.Tensor  # (B,) each row's edit index; packed: (B, T) each token's (shared: the first's)
    visible_until: torch.Tensor | None = None  # packed only: (B, T) positions t..until-1 see token t
    position_ids: torch.Tensor | None = None  # packed only: (B, T) position within the token's sequence

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(*(None if t is None else t.to(device) for t in vars(self).values()))

    @property
    def packed(self) -> bool:
        return self.visible_until is not None

    @property
    def num_answer_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def answer_positions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mask_BT of the answer positions, their labels (P,) and each one's edit index (P,)."""
        mask_BT = self.labels != IGNORE_INDEX
        ids_BT = self.example_ids if self.packed else self.example_ids.unsqueeze(1).expand_as(mask_BT)
        return mask_BT, self.labels[mask_BT], ids_BT[mask_BT]

    def sequence_positions(self) -> list[tuple[int, torch.Tensor, int]]:
        """(row, positions (n,) of its tokens in order, edit index) of every sequence, in row order."""
        if not self.packed:
            lengths = self.attention_mask.sum(1).tolist()
            return [
                (r, torch.arange(int(n)), int(e))
                for r, (n, e) in enumerate(zip(lengths, self.example_ids.tolist()))
            ]
        sequences = []
        steps = torch.arange(self.input_ids.shape[1])
        real_BT = self.attention_mask.bool().cpu()
        for r, (ids, until, real) in enumerate(
            zip(self.example_ids.cpu(), self.visible_until.cpu(), real_BT)
        ):
            last_of = {}  # a sequence's last token is its own (an answer position): the leaf of its path
            for t, e in enumerate(ids[real].tolist()):
                last_of[e] = t
            for e, last in sorted(last_of.items(), key=lambda item: item[1]):
                on_path = (steps <= last) & (until > last) & real
                sequences.append((r, steps[on_path], e))
        return sequences

    def sequence_shapes(self) -> list[tuple[int, int]]:
        """(tokens it adds to its row, answer tokens) of every sequence, in row order: the sequence's own
        length unless it shares a prefix added by an earlier one."""
        answers_BT = (self.labels != IGNORE_INDEX).cpu()
        ids_BT = self.example_ids.cpu()
        shapes = []
        for r, positions, e in self.sequence_positions():
            own = positions[ids_BT[r, positions] == e] if self.packed else positions
            shapes.append((len(own), int(answers_BT[r, own].sum())))
        return shapes


def collate(examples: list[TokenizedExample], example_ids: list[int], pad_id: int) -> TokenBatch:
    if not examples or len(examples) != len(example_ids):
        raise ValueError(f"need one id per example, got {len(examples)} examples and {len(example_ids)} ids")
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return TokenBatch(input_ids, attention_mask, labels, torch.tensor(example_ids, dtype=torch.long))


def check_min_batches(n_examples: int, min_batches: int) -> None:
    """Every micro-batch needs an example: a worker can split its slice into at most one pass per edit."""
    if min_batches > n_examples:
        raise ValueError(
            f"cannot make {min_batches} micro-batches of {n_examples} examples: another worker needs "
            f"{min_batches} passes; raise data.max_batch_tokens or give each worker more edits"
        )


def micro_batch_plan(
    examples: list[TokenizedExample], batch_size: int, max_tokens: int = 0, min_batches: int = 0
) -> list[list[int]]:
    """Which examples go in which micro-batch (indices into `examples`), without building any tensor.

    Longest first (stable sort), so rows of similar length share a batch. A batch holds at most `batch_size`
    rows and, if `max_tokens` > 0, at most `max_tokens` padded tokens (rows × longest row; a single longer row
    still gets its own batch). On CPU a pass costs about its padded token count, so the token budget keeps
    long outliers from inflating a whole batch of short rows. `min_batches` splits the largest batches until
    there are at least that many (ZeRO-3 workers must run the same number of passes: each pass all-gathers
    the weights from every worker).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    chunks: list[list[int]] = []
    for i in order:
        if chunks:
            chunk = chunks[-1]
            longest = len(examples[chunk[0]].input_ids)  # sorted: the first row is the longest
            if len(chunk) < batch_size and (max_tokens <= 0 or longest * (len(chunk) + 1) <= max_tokens):
                chunk.append(i)
                continue
        chunks.append([i])
    check_min_batches(len(examples), min_batches)
    while len(chunks) < min_batches:
        largest = max(range(len(chunks)), key=lambda c: len(chunks[c]))
        chunk = chunks.pop(largest)
        chunks[largest:largest] = [chunk[: len(chunk) // 2], chunk[len(chunk) // 2 :]]
    return chunks


def micro_batches(
    examples: list[TokenizedExample], batch_size: int, pad_id: int, max_tokens: int = 0, min_batches: int = 0
) -> list[TokenBatch]:
    """The padded batches of `micro_batch_plan`; example id = position in `examples`."""
    plan = micro_batch_plan(examples, batch_size, max_tokens, min_batches)
    return [collate([examples[i] for i in chunk], chunk, pad_id) for chunk in plan]


def train_eval_split(n_records: int, eval_size: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random `eval_size` of the records for evaluation, the rest for training; both in record order."""
    if not 0 <= eval_size <= n_records:
        raise ValueError(f"eval_size must be in [0, {n_records}], got {eval_size}")
    eval_set = set(random.Random(f"split:{seed}").sample(range(n_records), eval_size))
    train = [i for i in range(n_records) if i not in eval_set]
    return train, sorted(eval_set)


def split_sizes(total: int, parts: int) -> list[int]:
    """`total` items in `parts` near-equal blocks, the first `total % parts` one larger (shard_slice's rule)."""
    base, extra = divmod(total, parts)
    return [base + (p < extra) for p in range(parts)]


def _check_plan(pool_size: int, n_edits: int, parts: int) -> None:
    if not 1 <= n_edits <= pool_size:
        raise ValueError(f"n_edits must be in [1, pool_size={pool_size}], got {n_edits}")
    if not 1 <= parts <= n_edits:
        raise ValueError(f"partitions must be in [1, n_edits={n_edits}], got {parts}")


def steps_per_epoch(pool_size: int, n_edits: int, parts: int = 1) -> int:
    """Meta-steps per pass over the pool; the remainder of each epoch's permutation is skipped (drop_last).
    With several partitions, the partition that runs out first ends the epoch."""
    _check_plan(pool_size, n_edits, parts)
    return min(
        size // share for size, share in zip(split_sizes(pool_size, parts), split_sizes(n_edits, parts))
    )


@lru_cache(maxsize=4)
def _partitions(pool_size: int, seed: int, parts: int) -> tuple[tuple[int, ...], ...]:
    """Fixed blocks of a seeded permutation of the pool: a record stays in its partition for the whole run."""
    if parts == 1:
        return (tuple(range(pool_size)),)
    order = list(range(pool_size))
    random.Random(f"partition:{seed}").shuffle(order)
    bounds = [0]
    for size in split_sizes(pool_size, parts):
        bounds.append(bounds[-1] + size)
    return tuple(tuple(order[a:b]) for a, b in zip(bounds, bounds[1:]))


def partition(pool_size: int, seed: int, parts: int, part: int) -> list[int]:
    """The record indices of one of meta_batch_indices' partitions."""
    if not 0 <= part < parts:
        raise ValueError(f"part must be in [0, {parts}), got {part}")
    return list(_partitions(pool_size, seed, parts)[part])


@lru_cache(maxsize=8)
def _epoch_permutation(
    pool_size: int, seed: int, epoch: int, parts: int = 1, part: int = 0
) -> tuple[int, ...]:
    order = list(_partitions(pool_size, seed, parts)[part])
    # string seeds hash stably across runs; one partition keeps the seeds of runs before partitions
    label = f"epoch:{seed}:{epoch}" if parts == 1 else f"epoch:{seed}:{epoch}:{part}/{parts}"
    random.Random(label).shuffle(order)
    return tuple(order)


def meta_batch_indices(pool_size: int, n_edits: int, seed: int, step: int, parts: int = 1) -> list[int]:
    """The record indices of meta-step `step`: a pure function of (seed, step, parts), so a resumed run
    repeats it.

    The pool is cut into `parts` fixed partitions; each epoch shuffles every partition and each meta-batch
    takes its next share of every one, in partition order, cut whole so that no meta-batch straddles two
    epochs (which could repeat a record within it). With parts = the number of workers, shard_slice hands
    worker r exactly partition r's share: a record meets the same worker every epoch (and its block-input
    cache); a one-process run with the same parts draws the same meta-batches.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch, position = divmod(step, steps_per_epoch(pool_size, n_edits, parts))
    indices: list[int] = []
    for part, share in enumerate(split_sizes(n_edits, parts)):
        order = _epoch_permutation(pool_size, seed, epoch, parts, part)
        indices.extend(order[position * share : (position + 1) * share])
    return indices


def shard_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Worker `rank`'s contiguous block of a meta-batch; the first `len % world_size` blocks get one extra."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    sizes = split_sizes(len(indices), world_size)
    start = sum(sizes[:rank])
    return indices[start : start + sizes[rank]]
