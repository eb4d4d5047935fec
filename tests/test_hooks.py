"""The edit hooks against autograd on an unhooked copy of the model."""

import copy

import pytest
import torch
from tiny_models import build_tiny_model

from horse_dist.data import TokenBatch, collate, tokenize_example
from horse_dist.editor.losses import per_example_ce
from horse_dist.lm.hooks import EditHooks
from horse_dist.lm.passes import answer_logits, cache_pass, loss_pass
from horse_dist.lm.registry import default_edit_modules, module_shape, weight_delta
from horse_dist.lm.tiny_tokenizers import build_bpe_tokenizer, build_sentencepiece_tokenizer

PAIRS = [("The capital of France is", "Paris"), ("Who wrote Hamlet?", "William Shakespeare"), ("x", "y z")]


def _setup(arch: str):
    tokenizer = build_bpe_tokenizer() if arch == "gpt2" else build_sentencepiece_tokenizer()
    model = build_tiny_model(arch, tokenizer, seed=0).eval().requires_grad_(False)
    names = default_edit_modules(model, n_last=2)
    return tokenizer, model, names


def _batch(tokenizer, pairs) -> TokenBatch:
    examples = [tokenize_example(tokenizer, p, a) for p, a in pairs]
    return collate(examples, list(range(len(examples))), tokenizer.pad_token_id or 0)


def _loss(model, batch: TokenBatch) -> torch.Tensor:
    mask = batch.labels != -100
    ids = batch.example_ids.unsqueeze(1).expand_as(mask)[mask]
    return per_example_ce(answer_logits(model, batch), batch.labels[mask], ids, len(batch.example_ids)).sum()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shift_hook_gives_autograd_g_s_of_edited_weights(arch):
    tokenizer, model, names = _setup(arch)
    batch = _batch(tokenizer, PAIRS)
    gen = torch.Generator().manual_seed(1)
    shifts = [
        (0.05 * torch.randn(*module_shape(model.get_submodule(n)), generator=gen)).requires_grad_(True)
        for n in names
    ]
    hooks = EditHooks(model, names)
    loss_pass(model, hooks, [batch], shifts, len(PAIRS), "ce", weight=1.0)
    hooks.remove()

    edited = copy.deepcopy(model)
    weights = []
    for name, shift in zip(names, shifts):
        module = edited.get_submodule(name)
        module.weight.data += weight_delta(module, shift.detach())
        module.weight.requires_grad_(True)
        weights.append(module.weight)
    _loss(edited, batch).backward()
    for name, weight, shift in zip(names, weights, shifts):
        expected = weight.grad.T if isinstance(edited.get_submodule(name), torch.nn.Linear) else weight.grad
        torch.testing.assert_close(shift.grad, expected, rtol=1e-5, atol=1e-7)
        assert shift.grad.abs().max() > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recorded_keys_and_grads_match_autograd_weight_gradient(arch):
    # Recording at every real token, Σ_t K_tᵀ G_t must equal the autograd gradient of the unhooked model's
    # edited weight (pads contribute nothing: right padding, causal attention, no loss there).
    tokenizer, model, names = _setup(arch)
    batch = _batch(tokenizer, PAIRS)
    hooks = EditHooks(model, names)
    hooks.reset_records()
    with hooks.recording(batch.attention_mask.bool()):
        loss = _loss(model, batch)
    loss.backward()
    keys, grads = hooks.collect()
    hooks.remove()
    n_rows = int(batch.attention_mask.sum())
    for name, k, g in zip(names, keys, grads):
        assert (k.shape, g.shape) == (
            (n_rows, module_shape(model.get_submodule(name))[0]),
            (n_rows, g.shape[1]),
        )

    reference = copy.deepcopy(model)
    weights = [reference.get_submodule(n).weight.requires_grad_(True) for n in names]
    reference_loss = _loss(reference, batch)
    torch.testing.assert_close(reference_loss, loss.detach())
    reference_loss.backward()
    for name, weight, k, g in zip(names, weights, keys, grads):
        expected = (
            weight.grad.T if isinstance(reference.get_submodule(name), torch.nn.Linear) else weight.grad
        )
        torch.testing.assert_close(k.T @ g, expected, rtol=1e-5, atol=1e-7)
        assert expected.abs().max() > 0


def test_recording_rows_follow_the_mask_and_do_not_change_logits():
    tokenizer, model, names = _setup("llama")
    batch = _batch(tokenizer, PAIRS)
    hooks = EditHooks(model, names)
    with torch.no_grad():
        plain = answer_logits(model, batch)
    full_mask = batch.attention_mask.bool()
    hooks.reset_records()
    with hooks.recording(full_mask):
        all_logits = answer_logits(model, batch)
    torch.testing.assert_close(all_logits, plain)
    all_keys, _ = [torch.cat(k) for k in hooks.keys], None
    cache = cache_pass(model, hooks, [batch], len(PAIRS), loss_scale=1.0)
    answer_in_full = (batch.labels != -100)[full_mask]
    for layer in range(len(names)):
        torch.testing.assert_close(cache.keys[layer], all_keys[layer][answer_in_full])
    hooks.remove()
    with torch.no_grad():
        torch.testing.assert_close(answer_logits(model, batch), plain)
