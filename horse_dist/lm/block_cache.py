"""Hidden states entering the lowest edited block, kept per training prompt across meta-steps.

Every training record comes back once per epoch with the same three prompts, and the blocks below the
lowest edited one are frozen and never shifted: what enters that block is a fixed function of the prompt.
From the second visit on, a pass feeds the stored states to the blocks above (fast_forward.blocks_from)
and skips the bottom of the model: on SmolLM2 with the last 6 of 30 blocks edited, 80 % of a pass's
forward matmuls. Memory is bounded by a budget (what does not fit is recomputed every time).
`once_per_batch` keeps them per micro-batch instead, for passes over the same batches (an evaluation's
unedited, cache and edited passes; KL locality's reference and shifted passes).
"""

from __future__ import annotations

import torch
from torch import nn

from horse_dist.data import TokenBatch
from horse_dist.lm.fast_forward import HiddenStates, hidden_entering_block
from horse_dist.lm.passes import model_inputs

Record = tuple[int, int]  # (pool uid, index in the pool)
Key = tuple[str, Record]  # (prompt kind, record)
SequenceAt = tuple[int, torch.Tensor, int]  # (row, positions, edit index) of a sequence in a batch


def once_per_batch(hidden_fn: HiddenStates) -> HiddenStates:
    """`hidden_fn`, run once per micro-batch (by identity) and then handed out again, so that several passes
    over the same batches run the frozen blocks below the lowest edited one once. The kept states live as
    long as the returned function (one evaluation, one meta-step)."""
    kept: dict[int, tuple[TokenBatch, torch.Tensor]] = {}  # the batch is held so that its id stays its own

    def hidden(batch: TokenBatch) -> torch.Tensor:
        entry = kept.get(id(batch))
        if entry is None:
            entry = kept[id(batch)] = (batch, hidden_fn(batch))
        return entry[1]

    return hidden


class BlockInputCache:
    def __init__(self, block: int, budget_bytes: int) -> None:
        self.block, self.budget_bytes = block, int(budget_bytes)
        self._states: dict[Key, torch.Tensor] = {}  # (kind, record) -> (T, H), in host memory
        self.bytes = 0
        self.hits = self.misses = 0
        self._epoch_start = (0, 0)  # (hits, misses) when the current epoch began

    def fits(self, n_tokens: int, hidden: int, element_bytes: int) -> bool:
        """Whether the states of `n_tokens` prompt tokens fit the budget."""
        return n_tokens * hidden * element_bytes <= self.budget_bytes

    def start_epoch(self) -> None:
        self._epoch_start = (self.hits, self.misses)

    def __len__(self) -> int:
        return len(self._states)

    @property
    def hit_rate(self) -> float:
        """Share of the passes so far that resumed from stored states."""
        return self.hits / max(self.hits + self.misses, 1)

    @property
    def epoch_hit_rate(self) -> float:
        """Share of this epoch's passes so far that resumed from stored states."""
        hits, misses = self.hits - self._epoch_start[0], self.misses - self._epoch_start[1]
        return hits / max(hits + misses, 1)

    def hidden_fn(self, model: nn.Module, kind: str, records: list[Record]) -> HiddenStates:
        """The states entering the block for batches of `kind` prompts whose edit index e is the record
        records[e]: stored ones where every sequence has them, else computed (and stored)."""

        def hidden(batch: TokenBatch) -> torch.Tensor:
            sequences = batch.sequence_positions()
            keys = [(kind, records[e]) for *_, e in sequences]
            if all(key in self._states for key in keys):
                self.hits += 1
                return self._restore(model, batch, sequences, keys)
            self.misses += 1
            with torch.no_grad():
                hidden_BTH = hidden_entering_block(model, model_inputs(model, batch), self.block)
            self._store(sequences, keys, hidden_BTH)
            return hidden_BTH

        return hidden

    def _restore(
        self, model: nn.Module, batch: TokenBatch, sequences: list[SequenceAt], keys: list[Key]
    ) -> torch.Tensor:
        dtype = model.get_input_embeddings().weight.dtype
        hidden_BTH = torch.zeros(*batch.input_ids.shape, self._states[keys[0]].shape[-1], dtype=dtype)
        for (row, positions, _), key in zip(sequences, keys):
            hidden_BTH[row, positions] = self._states[key]  # a shared prefix is written once per sequence
        return hidden_BTH.to(batch.input_ids.device)

    def _store(self, sequences: list[SequenceAt], keys: list[Key], hidden_BTH: torch.Tensor) -> None:
        hidden_BTH = hidden_BTH.cpu()  # one device-to-host copy per batch, not one per sequence
        for (row, positions, _), key in zip(sequences, keys):
            if key in self._states:
                continue
            state = hidden_BTH[row, positions]  # a copy (advanced indexing): the batch is not kept alive
            size = state.numel() * state.element_size()
            if self.bytes + size > self.budget_bytes:
                return
            self._states[key] = state
            self.bytes += size
