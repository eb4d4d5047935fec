"""Accumulate Σ_t k_t k_tᵀ of the edited modules' inputs over the masked tokens of forward passes: every non-pad
token of a list of texts (the key statistics job, the prompt-token prior), or any mask (the answer positions).

k_t is the input of an edited MLP output projection at token t (nn.Linear or GPT-2 Conv1D alike: both take
x of shape (B, T, I)). Pure with respect to the model: forward pre-hooks only read, and are always removed.
Legend: B texts, T tokens, N non-pad tokens, I = d_in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from horse_dist.lm.registry import module_shape

ACCUM_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class KeyStats:
    """Uncentred, unnormalised key statistics of one module: second_moment = Σ_t k_t k_tᵀ = K0 K0ᵀ."""

    second_moment: Tensor  # (I, I)
    key_sum: Tensor  # (I,) Σ_t k_t
    count: int  # tokens

    @property
    def mean(self) -> Tensor:  # (I,)
        return self.key_sum / max(self.count, 1)

    def normalized_second_moment(self) -> Tensor:  # (I, I) E[k kᵀ]
        return self.second_moment / max(self.count, 1)

    def __add__(self, other: KeyStats) -> KeyStats:
        return KeyStats(
            self.second_moment + other.second_moment, self.key_sum + other.key_sum, self.count + other.count
        )

    def to_dict(self) -> dict:
        return {"second_moment": self.second_moment, "key_sum": self.key_sum, "count": self.count}

    @classmethod
    def from_dict(cls, data: dict) -> KeyStats:
        return cls(data["second_moment"], data["key_sum"], int(data["count"]))


def accum_dtype(name: str) -> torch.dtype:
    if name not in ACCUM_DTYPES:
        raise ValueError(f"keystats.dtype must be one of {sorted(ACCUM_DTYPES)}, got {name!r}")
    return ACCUM_DTYPES[name]


def empty_stats(model: nn.Module, module_names: Sequence[str], dtype: torch.dtype) -> dict[str, KeyStats]:

    device = next(model.parameters()).device  # sums live beside the keys (a GPU sums on the GPU)
    stats = {}
    for name in module_names:
        d_in, _ = module_shape(model.get_submodule(name))
        zeros_II = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        stats[name] = KeyStats(zeros_II, torch.zeros(d_in, dtype=dtype, device=device), 0)
    return stats


class _StopForward(Exception):
    """Raised by the hook once every edited module has been seen: the rest of the forward is not needed."""


class _Capture:
    """Per forward: the (B, T) bool mask of the tokens to add, and the modules seen so far in this pass."""

    def __init__(self) -> None:
        self.mask_BT: Tensor | None = None
        self.seen: set[str] = set()

    def start_pass(self, mask_BT: Tensor) -> None:
        self.mask_BT, self.seen = mask_BT, set()


@contextmanager
def key_capture(
    model: nn.Module, module_names: Sequence[str], stats: dict[str, KeyStats], stop_early: bool
) -> Iterator[_Capture]:
    """Inside the block, each forward (after `capture.start_pass(mask_BT)`) adds KᵀK of every named module's
    input at the masked tokens into `stats`. The hooks are removed on exit, exceptions included."""
    capture = _Capture()

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            entry = stats[name]
            keys_NI = inputs[0][capture.mask_BT].to(entry.second_moment.dtype)
            entry.second_moment.addmm_(keys_NI.T, keys_NI)
            entry.key_sum.add_(keys_NI.sum(0))
            entry.count += keys_NI.shape[0]
            capture.seen.add(name)
            if stop_early and len(capture.seen) == len(module_names):
                raise _StopForward

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(make_hook(name)) for name in module_names]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def accumulate_passes(
    model: nn.Module,
    module_names: Sequence[str],
    passes: Iterable[tuple[dict[str, Tensor], Tensor]],
    *,
    dtype: torch.dtype = torch.float64,
    stop_early: bool = True,
) -> dict[str, KeyStats]:
    """Per module, Σ k kᵀ, Σ k and the row count over the tokens each pass masks: `passes` yields the decoder
    stack's keyword arguments and the (B, T) bool mask of the tokens to add."""
    stats = empty_stats(model, module_names, dtype)
    body = getattr(model, "base_model", model)  # the decoder stack: the LM head is never needed
    with torch.inference_mode(), key_capture(model, module_names, stats, stop_early) as capture:
        for inputs, mask_BT in passes:
            capture.start_pass(mask_BT)
            try:
                body(**inputs)
            except _StopForward:
                pass
    return {name: KeyStats(s.second_moment.cpu(), s.key_sum.cpu(), s.count) for name, s in stats.items()}


def text_passes(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
    """Fixed batches of `batch_size` consecutive texts (truncated to max_length), masked at their non-pad
    tokens."""
    device = next(model.parameters()).device
    for begin in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[begin : begin + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        mask_BT = batch["attention_mask"].to(device).bool()
        inputs = {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": mask_BT.long(),
            "use_cache": False,
        }
        yield inputs, mask_BT


def accumulate_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    module_names: Sequence[str],
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int,
    dtype: torch.dtype = torch.float64,
    stop_early: bool = True,
) -> dict[str, KeyStats]:
    """Per module, Σ k kᵀ, Σ k and the token count over the non-pad tokens of `texts` (truncated to max_length),
    in fixed batches of `batch_size` consecutive texts (so the result depends only on the texts)."""
    if batch_size <= 0 or max_length <= 0:
        raise ValueError(f"batch_size and max_length must be positive, got {batch_size}, {max_length}")
    passes = text_passes(model, tokenizer, texts, max_length, batch_size)
    return accumulate_passes(model, module_names, passes, dtype=dtype, stop_early=stop_early)


def token_counts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[int]:
    """Tokens per text after truncation: the rows the accumulation counts (its attention mask)."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [int(sum(mask)) for mask in encoded["attention_mask"]]
