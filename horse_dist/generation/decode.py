"""Batched greedy decoding with a KV cache over left-padded prompts.

Whatever hooks are active on the model (an edit's shifts) act at every prompt and generated position, as
they do in the exported edited model. One run serves two readings of the same greedy continuation:
end-of-text is kept out of the first `new_tokens` tokens (a free generation of fixed length, as fluency
measures need), and the step at which it would have been chosen is recorded, so `live` is exactly what
plain greedy decoding (stopping at end-of-text) returns: greedy choices agree until that step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache


@dataclass
class Continuations:
    ids: list[list[int]]  # per prompt: `new_tokens` greedy ids, end-of-text kept out
    live: list[list[int]]  # per prompt: the plain greedy continuation, up to its end-of-text


def left_padded(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask with every prompt flush right, so generation starts at column T."""
    width = max(len(p) for p in prompts)
    ids_BT = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids_BT[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask_BT[row, width - len(prompt) :] = 1
    return ids_BT.to(device), mask_BT.to(device)


@torch.no_grad()
def _decode_chunk(
    model: nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int, pad_id: int, eos_B: torch.Tensor
) -> Continuations:
    device = model.get_input_embeddings().weight.device
    ids_BT, mask_BT = left_padded(prompts, pad_id, device)
    positions_BT = (mask_BT.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()

    def last_logits(ids: torch.Tensor) -> torch.Tensor:
        """(B, V) logits at the last position; the cache grows by `ids`' columns."""
        out = model(
            input_ids=ids,
            attention_mask=mask_BT,
            position_ids=positions_BT,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    logits_BV = last_logits(ids_BT)
    rows = len(prompts)
    ended_at = torch.full((rows,), new_tokens, dtype=torch.long)
    chosen = []
    for step in range(new_tokens):
        would_end_B = logits_BV.argmax(-1).unsqueeze(-1).eq(eos_B).any(-1).cpu()
        ended_at = torch.where(would_end_B & (ended_at == new_tokens), step, ended_at)
        logits_BV[:, eos_B] = float("-inf")
        next_B = logits_BV.argmax(-1)
        chosen.append(next_B)
        if step + 1 == new_tokens:
            break
        mask_BT = torch.cat([mask_BT, mask_BT.new_ones(rows, 1)], dim=1)
        positions_BT = positions_BT[:, -1:] + 1
        logits_BV = last_logits(next_B[:, None])
    ids = torch.stack(chosen, dim=1).tolist() if chosen else [[] for _ in prompts]
    return Continuations(ids, [row[: int(end)] for row, end in zip(ids, ended_at)])


def greedy_continuations(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    pad_id: int,
    eos_ids: Sequence[int],
    batch_size: int = 96,
) -> Continuations:
    """Greedy continuations of every prompt (see the module docstring), in the prompts' order. Prompts run
    in chunks of `batch_size` of similar length, so left padding wastes little of the prefill."""
    if not prompts:
        return Continuations([], [])
    device = model.get_input_embeddings().weight.device
    eos_B = torch.as_tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    ids: list[list[int]] = [[] for _ in prompts]
    live: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        part = _decode_chunk(model, [prompts[i] for i in chunk], new_tokens, pad_id, eos_B)
        for i, row_ids, row_live in zip(chunk, part.ids, part.live):
            ids[i], live[i] = row_ids, row_live
    return Continuations(ids, live)
