"""One edit call of a trained hypernetwork: cache, predict and solve for a list of (prompt, answer) requests at
once (the edit job, the MLflow pyfunc model and the tests all edit through it)."""

from __future__ import annotations

import time

import torch

from horse_dist.data import tokenize_example
from horse_dist.lm.passes import score_pass
from horse_dist.training.engine import EditBatches, EditEngine


def apply_edits(
    engine: EditEngine, tokenizer, requests: list[tuple[str, str]]
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Cache + predict + solve for all requests at once; returns the shifts and timings."""
    started = time.perf_counter()
    examples = [tokenize_example(tokenizer, prompt, answer, engine.stop_id) for prompt, answer in requests]
    batches = engine.micro_batches(examples)
    hidden = engine.shared_hidden()  # the cache and scoring passes run the blocks below the edited ones once
    cache = engine.cache(EditBatches(batches, [], [], len(requests)), hidden)
    cached = time.perf_counter()
    shifts = engine.predict(cache, learn_statistics=False).shifts
    predicted = time.perf_counter()
    logits = engine.resumed_logits(hidden)
    success = score_pass(
        engine.model, engine.hooks, batches, len(requests), shifts, None, logits, engine.stop_id
    ).accuracy
    timings = {
        "cache_seconds": cached - started,
        "predict_solve_seconds": predicted - cached,
        "edit_seconds": predicted - started,
        "edits_per_s": len(requests) / (predicted - started),
        "edit_success": float(success.mean()),
    }
    return shifts, timings
