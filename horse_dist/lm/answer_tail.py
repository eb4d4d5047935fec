"""The cache pass with the backward at the answer positions only (above the lowest edited block).

K and G are read at the answer positions: a prompt's last token and the answer tokens, the last positions of
their sequence. The loss reaches a layer's output at such a position only through the positions that see
it, later positions of the same sequence: answer positions too. The prompt's leading tokens (the context)
matter to the loss only as keys and values of the attention. So from the lowest edited block on, a batch runs
twice: its context without a graph, keeping every block's keys and values (a KV cache), then its answer
tail with a graph, attending to that cache and to itself. K, G and the loss are those of the full pass (up
to float rounding), and the backward covers the tail only: on SmolLM2 with 100 zsRE prompts, ~430 slots
(~320 answer positions, padded to the row with the most) of ~1,230.

The loss passes need the graph at every position below the last block (the shifts act everywhere), but in
the last block the context's MLP output is never read: `last_block_tail_logits` splits that block alone.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from horse_dist.data import TokenBatch
from horse_dist.data.tokenize import IGNORE_INDEX
from horse_dist.lm.fast_forward import (
    additive_mask,
    block_count,
    blocks_from,
    hidden_entering_block,
    last_mlp_skipped,
    visibility,
)
from horse_dist.lm.hooks import EditHooks
from horse_dist.lm.passes import model_inputs


@dataclass
class TailLayout:
    """Each row's context and answer positions, as slots padded to the row with the most of each."""

    context_BC: torch.Tensor  # positions of each row's context tokens, in order (pad slots: any position)
    context_real_BC: torch.Tensor  # bool: the slot holds a context token
    tail_BQ: torch.Tensor  # positions of each row's answer tokens, in order
    tail_real_BQ: torch.Tensor
    positions_BT: torch.Tensor  # position id of every token
    context_seen_BCC: torch.Tensor  # bool: context slot i sees context slot j
    tail_seen_BQK: torch.Tensor  # bool, K = C + Q: tail slot i sees context slot j, then tail slot j - C


def _slots(selected_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row the positions where `selected_BT` holds, in order, padded to the largest count (at least 1)."""
    counts_B = selected_BT.sum(1)
    width = max(int(counts_B.max()), 1)
    order_BT = torch.argsort((~selected_BT).to(torch.int8), dim=1, stable=True)  # selected first, in order
    real_BS = torch.arange(width, device=selected_BT.device)[None, :] < counts_B[:, None]
    return order_BT[:, :width], real_BS


def slot_layout(
    context_BT: torch.Tensor,
    tail_BT: torch.Tensor,
    visible_until_BT: torch.Tensor,
    positions_BT: torch.Tensor,
) -> TailLayout:
    """The layout of a batch split into context positions (`context_BT`) and tail positions (`tail_BT`),
    both bool (B, T); what a position sees comes from `visible_until_BT` (see fast_forward.visibility).
    Positions in neither are left out: nothing the tail reads may depend on them."""
    context_BC, context_real_BC = _slots(context_BT)
    tail_BQ, tail_real_BQ = _slots(tail_BT)
    seen_BTT = visibility(visible_until_BT)
    rows_B11 = torch.arange(context_BT.shape[0], device=context_BT.device)[:, None, None]

    def seen(query_BQ: torch.Tensor, key_BK: torch.Tensor, key_real_BK: torch.Tensor) -> torch.Tensor:
        # Pad slots are never seen; what a pad slot sees is never read.
        return seen_BTT[rows_B11, query_BQ[:, :, None], key_BK[:, None, :]] & key_real_BK[:, None, :]

    context_seen = seen(context_BC, context_BC, context_real_BC)
    tail_seen = torch.cat(
        [seen(tail_BQ, context_BC, context_real_BC), seen(tail_BQ, tail_BQ, tail_real_BQ)], dim=2
    )
    return TailLayout(
        context_BC, context_real_BC, tail_BQ, tail_real_BQ, positions_BT, context_seen, tail_seen
    )


def right_padded(real_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """visible_until and position ids of one right-padded sequence per row: its real tokens are seen up to
    its end, a pad by itself."""
    steps_T = torch.arange(real_BT.shape[1], device=real_BT.device)
    visible_until_BT = torch.where(real_BT, real_BT.sum(1, keepdim=True), steps_T + 1)
    return visible_until_BT, steps_T.expand_as(real_BT)


def tail_layout(batch: TokenBatch) -> TailLayout:
    answers_BT = batch.labels != IGNORE_INDEX
    real_BT = batch.attention_mask.bool()
    if batch.packed:
        visible_until_BT, positions_BT = batch.visible_until, batch.position_ids
    else:
        visible_until_BT, positions_BT = right_padded(real_BT)
    return slot_layout(real_BT & ~answers_BT, answers_BT, visible_until_BT, positions_BT)


def gather_slots(hidden_BTH: torch.Tensor, slots_BS: torch.Tensor) -> torch.Tensor:
    """(B, S, H): the states at each row's slots."""
    return hidden_BTH.gather(1, slots_BS[:, :, None].expand(-1, -1, hidden_BTH.shape[-1]))


def _run_slots(
    model: nn.Module, inputs_BSH: torch.Tensor, positions_BS: torch.Tensor, seen_BSK: torch.Tensor, cache
) -> torch.Tensor:
    """The running blocks on slot states (B, S, H) that attend to `cache` and to themselves; the cache grows."""
    return model.base_model(
        inputs_embeds=inputs_BSH,
        attention_mask=additive_mask(seen_BSK, model.get_input_embeddings().weight.dtype),
        position_ids=positions_BS,
        cache=cache,  # transformers 5.23 name (past_key_values is deprecated)
        use_cache=True,
    )[0]


ContextKV = list[tuple[torch.Tensor, torch.Tensor]]  # per running block: the context's attention keys, values


@torch.no_grad()
def frozen_context(model: nn.Module, layout: TailLayout, hidden_BTH: torch.Tensor, block: int) -> ContextKV:
    """The context's keys and values in blocks `block`.. (`hidden_BTH`: the states entering `block`), for
    tails that are run again and again on top of one fixed context (`tail_on_context`)."""
    cache = DynamicCache()  # full layers: a sliding-window one would crop the cache to its own order
    with blocks_from(model, block), last_mlp_skipped(model):
        positions_BC = layout.positions_BT.gather(1, layout.context_BC)
        _run_slots(
            model, gather_slots(hidden_BTH, layout.context_BC), positions_BC, layout.context_seen_BCC, cache
        )
    return [(layer.keys, layer.values) for layer in cache.layers]


def tail_on_context(
    model: nn.Module, layout: TailLayout, tail_BQH: torch.Tensor, block: int, context: ContextKV
) -> torch.Tensor:
    """Blocks `block`.. on the tail slots' entering states (B, Q, H), attending to `context` (left intact:
    a cache grows by concatenation) and to themselves: the final hidden states (B, Q, H), with a graph."""
    with blocks_from(model, block):
        positions_BQ = layout.positions_BT.gather(1, layout.tail_BQ)
        return _run_slots(model, tail_BQH, positions_BQ, layout.tail_seen_BQK, DynamicCache(context))


def _split_run(
    model: nn.Module,
    layout: TailLayout,
    hidden_BTH: torch.Tensor,
    block: int,
    context_graph: bool,
    around_tail: AbstractContextManager,
) -> torch.Tensor:
    """Blocks `block`.. from `hidden_BTH` (the states entering it): the context slots, keeping every block's
    keys and values, with a graph only if `context_graph`; then the tail slots (B, Q, H), inside
    `around_tail`, attending to that cache and to themselves."""
    cache = DynamicCache()  # full layers: a sliding-window one would crop the cache to its own order

    def run(slots_BS: torch.Tensor, seen_BSK: torch.Tensor) -> torch.Tensor:
        positions_BS = layout.positions_BT.gather(1, slots_BS)
        return _run_slots(model, gather_slots(hidden_BTH, slots_BS), positions_BS, seen_BSK, cache)

    with blocks_from(model, block):
        graph = context_graph and torch.is_grad_enabled()
        with torch.set_grad_enabled(graph), last_mlp_skipped(model):  # the tail reads its keys and values
            run(layout.context_BC, layout.context_seen_BCC)
        with around_tail:
            return run(layout.tail_BQ, layout.tail_seen_BQK)


def tail_answer_logits(
    model: nn.Module, hooks: EditHooks, batch: TokenBatch, hidden_BTH: torch.Tensor, block: int
) -> torch.Tensor:
    """Answer logits (P, V) in float32 (rows in `batch.answer_positions()` order), with K and G recorded at
    the answer positions. `hidden_BTH`: the states entering `block`, the lowest edited one."""
    layout = tail_layout(batch)
    recording = hooks.recording(layout.tail_real_BQ)
    tail_BQH = _split_run(model, layout, hidden_BTH, block, context_graph=False, around_tail=recording)
    return model.get_output_embeddings()(tail_BQH[layout.tail_real_BQ]).float()


def last_block_tail_logits(
    model: nn.Module, batch: TokenBatch, hidden_BTH: torch.Tensor, block: int
) -> torch.Tensor:
    """answer_logits from `hidden_BTH`, the states entering `block`, for the loss passes: the blocks up to the
    last run on the whole batch (shifted states reach the answers through every position there), the last
    one on the answer tail and, for the context, up to its keys and values (its MLP output there is never
    read). Exact, with the graph the loss's gradient needs."""
    last = block_count(model) - 1
    layout = tail_layout(batch)
    if block < last:
        with blocks_from(model, block):
            inputs = model_inputs(model, batch, hidden_BTH)
            hidden_BTH = hidden_entering_block(model, inputs, last - block)
    tail_BQH = _split_run(model, layout, hidden_BTH, last, context_graph=True, around_tail=nullcontext())
    return model.get_output_embeddings()(tail_BQH[layout.tail_real_BQ]).float()
