"""Micro-batched passes of the frozen LM: the cache pass, the edited loss passes and the scoring pass.

Losses are sums over edits of each edit's mean token loss, times a fixed weight (1 / the configured
micro-batch size, which keeps the public code's gradient scale). Unlike a per-micro-batch token mean, that makes every token's gradient independent of how
edits are grouped into micro-batches and workers, so W workers reproduce the single-process run.
Logits are computed at the answer positions only (the LM head is a large share of a small model's FLOPs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from horse_dist.data import TokenBatch
from horse_dist.editor.losses import (
    per_example_accuracy,
    per_example_agreement,
    per_example_ce,
    per_example_kl,
)
from horse_dist.lm.fast_forward import blocks_from, packed_attention_mask
from horse_dist.lm.hooks import EditHooks

Logits = Callable[[TokenBatch], torch.Tensor]  # batch -> answer logits (P, V)


def model_inputs(
    model: nn.Module, batch: TokenBatch, inputs_embeds: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Keyword arguments of the HF base model for `batch` (packed rows: 4-D mask + per-sequence positions).
    `inputs_embeds` (B, T, H) replaces the token ids (hidden states fed to the upper blocks)."""
    # use_cache=False: some families (GPT-J) otherwise build a KV cache on every forward.
    inputs = {"attention_mask": batch.attention_mask, "use_cache": False}
    if batch.packed:
        dtype = model.get_input_embeddings().weight.dtype
        inputs["attention_mask"] = packed_attention_mask(batch.visible_until, dtype)
        inputs["position_ids"] = batch.position_ids
    if inputs_embeds is None:
        inputs["input_ids"] = batch.input_ids
    else:
        inputs["inputs_embeds"] = inputs_embeds
    return inputs


def answer_logits(
    model: nn.Module, batch: TokenBatch, inputs_embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits (P, V) in float32 at the positions whose label is an answer token. `inputs_embeds` (B, T, H)
    replaces the token embeddings (lm.block_cache feeds stored hidden states to the upper blocks)."""
    hidden_BTH = model.base_model(**model_inputs(model, batch, inputs_embeds))[0]
    mask_BT = batch.labels != -100
    return model.get_output_embeddings()(hidden_BTH[mask_BT]).float()


def resumed_answer_logits(
    model: nn.Module, batch: TokenBatch, hidden_BTH: torch.Tensor, block: int
) -> torch.Tensor:
    """answer_logits from `hidden_BTH`, the states entering decoder block `block`: only the blocks from
    there run."""
    with blocks_from(model, block):
        return answer_logits(model, batch, hidden_BTH)


def _per_edit_zeros(batches: list[TokenBatch], n_examples: int) -> torch.Tensor:
    """An (E,) accumulator on the batches' device; the passes return their per-edit vectors on the CPU (one
    copy per pass, not one per micro-batch)."""
    device = batches[0].input_ids.device if batches else torch.device("cpu")
    return torch.zeros(n_examples, device=device)


@dataclass
class CacheResult:
    keys: list[torch.Tensor]  # per edited layer (N, I) float32
    grads: list[torch.Tensor]  # per edited layer (N, O) float32
    example_ids: torch.Tensor  # (N,) edit index of each token row
    loss: torch.Tensor  # (E,) per-edit CE of the unedited model


def recording(hooks: EditHooks, logits_fn: Logits) -> Logits:
    """`logits_fn` with K and G recorded at the batch's answer positions."""

    def logits(batch: TokenBatch) -> torch.Tensor:
        with hooks.recording(batch.answer_positions()[0]):
            return logits_fn(batch)

    return logits


def cache_pass(
    model: nn.Module,
    hooks: EditHooks,
    batches: list[TokenBatch],
    n_examples: int,
    loss_scale: float,
    recorded_logits: Logits | None = None,
) -> CacheResult:
    """Forward+backward of the unedited LM on the edit prompts, recording K and G at the answer positions.
    `recorded_logits` (default: `recording(hooks, answer_logits of model)`) computes a batch's answer logits
    and records K and G on the way."""
    recorded_logits = recorded_logits or recording(hooks, partial(answer_logits, model))
    hooks.reset_records()
    example_rows, losses = [], _per_edit_zeros(batches, n_examples)
    for batch in batches:
        _, labels_P, example_ids_P = batch.answer_positions()
        logits_PV = recorded_logits(batch)
        loss_E = per_example_ce(logits_PV, labels_P, example_ids_P, n_examples)
        (loss_E.sum() / loss_scale).backward()
        losses += loss_E.detach()
        example_rows.append(example_ids_P)
    keys, grads = hooks.collect()
    return CacheResult(keys, grads, torch.cat(example_rows), losses.cpu())


@dataclass
class PassResult:
    loss: torch.Tensor  # (E,) per-edit loss (0 where not computed)
    accuracy: torch.Tensor  # (E,) teacher-forced token accuracy
    agreement: torch.Tensor | None = None  # (E,) agreement with the unedited model's argmax
    predictions: list[torch.Tensor] = field(default_factory=list)  # per batch argmax at answer positions


def loss_pass(
    model: nn.Module,
    hooks: EditHooks,
    batches: list[TokenBatch],
    shifts: list[torch.Tensor],
    n_examples: int,
    objective: str,
    weight: float,
    logits_fn: Logits | None = None,
    unscored_label: int | None = None,
) -> PassResult:
    """Forward+backward of `weight` × Σ_edits loss with the shifts applied; S_l.grad accumulates g_S.
    The accuracy leaves out positions labelled `unscored_label`; the loss counts them."""
    logits_fn = logits_fn or partial(answer_logits, model)
    losses, accuracy = _per_edit_zeros(batches, n_examples), _per_edit_zeros(batches, n_examples)
    for batch in batches:
        _, labels_P, example_ids_P = batch.answer_positions()
        if objective == "kl":
            with torch.no_grad():
                ref_logprobs_PV = torch.log_softmax(logits_fn(batch), dim=-1)
        with hooks.shifted(shifts):
            logits_PV = logits_fn(batch)
        if objective == "ce":
            loss_E = per_example_ce(logits_PV, labels_P, example_ids_P, n_examples)
        elif objective == "kl":
            loss_E = per_example_kl(logits_PV, ref_logprobs_PV, example_ids_P, n_examples)
        else:
            raise ValueError(f"unknown objective {objective!r}; expected ce or kl")
        (loss_E.sum() * weight).backward()
        losses += loss_E.detach()
        accuracy += per_example_accuracy(
            logits_PV.detach(), labels_P, example_ids_P, n_examples, unscored_label
        )
    return PassResult(losses.cpu(), accuracy.cpu())


@torch.no_grad()
def score_pass(
    model: nn.Module,
    hooks: EditHooks,
    batches: list[TokenBatch],
    n_examples: int,
    shifts: list[torch.Tensor] | None = None,
    reference_predictions: list[torch.Tensor] | None = None,
    logits_fn: Logits | None = None,
    unscored_label: int | None = None,
) -> PassResult:
    """Teacher-forced token accuracy per edit (ES/GS/LS semantics), optionally with the shifts applied.
    `logits_fn` (default: answer_logits of `model`) computes a batch's answer logits; positions labelled
    `unscored_label` (the end-of-text after an answer) are not scored."""
    logits_fn = logits_fn or partial(answer_logits, model)
    accuracy = _per_edit_zeros(batches, n_examples)
    agreement = _per_edit_zeros(batches, n_examples) if reference_predictions is not None else None
    predictions = []
    for i, batch in enumerate(batches):
        _, labels_P, example_ids_P = batch.answer_positions()
        if shifts is None:
            logits_PV = logits_fn(batch)
        else:
            with hooks.shifted(shifts):
                logits_PV = logits_fn(batch)
        accuracy += per_example_accuracy(logits_PV, labels_P, example_ids_P, n_examples, unscored_label)
        pred_P = logits_PV.argmax(-1)
        predictions.append(pred_P)
        if agreement is not None:
            agreement += per_example_agreement(pred_P, reference_predictions[i], example_ids_P, n_examples)
    agreement = agreement.cpu() if agreement is not None else None
    return PassResult(torch.zeros(n_examples), accuracy.cpu(), agreement, predictions)
