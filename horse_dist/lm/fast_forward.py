"""Shortcuts through the frozen LM that are exact, enabled only for the architectures where tests show so.

- Packed rows (`data.packing`): several sequences per row, shared prompt prefixes once, a 4-D mask that
  lets a token see its ancestors only, and per-sequence positions. Families that derive anything else
  from a 2-D mask (ALiBi in BLOOM/Falcon) or treat a 4-D mask differently per layer are left out.
  Mistral's sliding window is not applied to the 4-D mask: exact while no sequence is longer than the
  window (4,096 tokens on Mistral-7B).
- Resuming at a block: the blocks below the lowest edited one are frozen and unshifted, so the hidden
  states entering it are a fixed function of the prompt; a pass that has them runs only the blocks above,
  fed as `inputs_embeds`. Valid where the embeddings enter block 0 unchanged (no scaling, no added
  position embeddings: GPT-2 and Gemma are out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from horse_dist.config import ConfigError
from horse_dist.data import TokenBatch
from horse_dist.lm.registry import ARCHITECTURES, model_type

# HF model_type values checked in tests/test_fast_forward.py (packed logits = one-sequence-per-row logits).
PACKABLE = frozenset({"llama", "mistral", "gptj", "gpt2"})
# ... and resuming at a block = the full pass.
RESUMABLE = frozenset({"llama", "mistral", "gptj"})


def visibility(visible_until_BT: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool: position i sees position j iff j <= i < visible_until[j] (its ancestors in the row's
    prefix tree, itself included; a pad sees itself only)."""
    steps = torch.arange(visible_until_BT.shape[1], device=visible_until_BT.device)
    causal_1TT = steps[None, :, None] >= steps[None, None, :]  # [0, i, j]: j <= i
    return causal_1TT & (steps[None, :, None] < visible_until_BT[:, None, :])


def additive_mask(allowed_BQK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, Q, K) additive attention mask of a boolean one. A finite minimum, not -inf, keeps every
    softmax finite (a row that sees nothing stays finite too)."""
    mask = torch.zeros(allowed_BQK.shape, dtype=dtype, device=allowed_BQK.device)
    return mask.masked_fill_(~allowed_BQK, torch.finfo(dtype).min).unsqueeze(1)


def packed_attention_mask(visible_until_BT: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask of a packed batch (see `visibility`)."""
    return additive_mask(visibility(visible_until_BT), dtype)


def _cpu_default(setting: str, forced: str, supported: bool, device: torch.device, refusal: str) -> bool:
    """A shortcut's setting: `forced` takes it (a ConfigError with `refusal` where it is not supported),
    auto takes it on a CPU where it is supported, anything else leaves it off."""
    if setting == forced:
        if not supported:
            raise ConfigError(refusal)
        return True
    return setting == "auto" and supported and device.type == "cpu"


def use_packing(setting: str, model: nn.Module, device: torch.device) -> bool:
    """`data.packing`: auto packs on a CPU (where a pass costs its padded tokens) for PACKABLE models."""
    refusal = (
        f"data.packing=packed: not supported for model_type {model_type(model)!r} "
        f"(tested: {sorted(PACKABLE)}); use data.packing=padded or auto"
    )
    return _cpu_default(setting, "packed", model_type(model) in PACKABLE, device, refusal)


def use_answer_tail(setting: str, model: nn.Module, device: torch.device, zero_stage: int) -> bool:
    """`model.answer_tail`: auto splits on a CPU for RESUMABLE models. ZeRO-3 is left out: its partitioned
    blocks are fetched in the module order traced on the first pass."""
    refusal = (
        f"model.answer_tail=split: not supported for model_type {model_type(model)!r} with "
        f"ZeRO stage {zero_stage} (tested: {sorted(RESUMABLE)}, not under ZeRO-3); use auto or full"
    )
    supported = model_type(model) in RESUMABLE and zero_stage != 3
    return _cpu_default(setting, "split", supported, device, refusal)


def _blocks(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    parent_name, _, attr = ARCHITECTURES[model_type(model)].layers_path.rpartition(".")
    parent = model.get_submodule(parent_name)
    return parent, attr, getattr(parent, attr)


HiddenStates = Callable[[TokenBatch], torch.Tensor]  # batch -> hidden states (B, T, H) entering a block


class _BlockReached(Exception):
    """Raised by the pre-hook of `hidden_entering_block` to stop the forward there."""


def block_count(model: nn.Module) -> int:
    return len(_blocks(model)[2])


def hidden_entering_block(model: nn.Module, inputs: dict, block: int) -> torch.Tensor:
    """The hidden states (B, T, H) entering decoder block `block` (of the blocks the model runs now) for the
    base model's keyword `inputs`: the blocks below run, the ones from `block` on do not (the forward stops
    at its pre-hook). With a graph where grad mode and the inputs call for one."""
    captured: list[torch.Tensor] = []

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        raise _BlockReached

    handle = _blocks(model)[2][block].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model.base_model(**inputs)
    except _BlockReached:
        pass
    finally:
        handle.remove()
    return captured[0]


@contextmanager
def blocks_from(model: nn.Module, block: int) -> Iterator[None]:
    """Within the block the model runs decoder blocks `block`.. only; `inputs_embeds` are what enters it."""
    if model_type(model) not in RESUMABLE:
        raise ValueError(f"resuming at a block is not supported for model_type {model_type(model)!r}")
    parent, attr, blocks = _blocks(model)
    setattr(parent, attr, nn.ModuleList(list(blocks)[block:]))
    try:
        yield
    finally:
        setattr(parent, attr, blocks)


class _Zeros(nn.Module):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden)


@contextmanager
def last_mlp_skipped(model: nn.Module) -> Iterator[None]:
    """Within the block the last decoder block's MLP adds zeros: for a pass whose only use of the last
    block is its attention keys and values (they come before the MLP), three quarters of its matmuls."""
    if model_type(model) not in RESUMABLE:
        raise ValueError(f"skipping the last MLP is not supported for model_type {model_type(model)!r}")
    last = _blocks(model)[2][-1]
    mlp = last.mlp
    last.mlp = _Zeros()
    try:
        yield
    finally:
        last.mlp = mlp
