"""Editors for sequential editing: one protocol for trained hypernetworks and locate-then-edit methods.

An editor changes the model's weights in place, one batch of edits at a time, always starting from the
weights as they are now (so a stream of calls edits cumulatively).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from horse_dist.config import ConfigError, RunConfig, with_changes
from horse_dist.data import EditRecord, tokenize_examples
from horse_dist.dist.world import LocalWorld
from horse_dist.editor.memory import RidgeMemory, remembered_step
from horse_dist.editor.prior import layer_shift
from horse_dist.keystats.job import load_or_compute_stats
from horse_dist.lm.export import apply_shifts_
from horse_dist.lm.registry import module_shape
from horse_dist.locate import build_locate_editor, locate_module_names
from horse_dist.locate.editors import METHODS as LOCATE_METHODS
from horse_dist.locate.editors import Editor
from horse_dist.training.assembly import engine_for
from horse_dist.training.engine import EditBatches, EditEngine

log = logging.getLogger(__name__)

HYPERNET_METHODS = ("horse", "malmen")
METHODS = HYPERNET_METHODS + LOCATE_METHODS


class HyperNetEditor:
    """A trained HORSE/MALMEN hypernetwork: predict the shifts from the current weights, merge them in.

    With a ridge memory (editor/memory.py) the hypernetwork reads the unedited weights at every step and the
    step applies the solve of all the stream's edits so far. It was trained on the unedited model and
    predicts badly on an edited one: on SmolLM2-135M a second step of 64 zsRE edits computed on the edited
    weights moved them by 3.5x their norm and left ES 0.15 on the 128 edits (one batch of 128: 0.93)."""

    def __init__(self, engine: EditEngine, tokenizer: Any, name: str, ridge_memory: bool = False) -> None:
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.module_names = list(engine.module_names)
        self.memories: list[RidgeMemory] | None = None
        if ridge_memory:
            modules = [engine.model.get_submodule(n) for n in self.module_names]
            self.memories = [RidgeMemory.empty(*module_shape(m), device=engine.device) for m in modules]
            self.unedited = [m.weight.detach().clone() for m in modules]

    def edit(self, records: list[EditRecord]) -> dict[str, float]:
        if not records:
            raise ValueError("edit() needs at least one record")
        started = time.perf_counter()
        prompts, answers = [r.prompt for r in records], [r.answer for r in records]
        examples = tokenize_examples(self.tokenizer, prompts, answers, self.engine.stop_id)
        batches = self.engine.micro_batches(examples)
        with self._reading_unedited():
            cache = self.engine.cache(EditBatches(batches, [], [], len(records)))
        cached = time.perf_counter()
        prediction = self.engine.predict(cache, learn_statistics=False)
        shifts = prediction.shifts
        if self.memories is not None:  # with a key prior the memory solves in whitened key space (cache.keys)
            shifts = self._remembered(cache.keys, prediction.solved or prediction.shifts)
        predicted = time.perf_counter()
        apply_shifts_(self.engine.model, dict(zip(self.module_names, shifts)))
        merged = time.perf_counter()
        return {
            "cache_seconds": cached - started,
            "predict_seconds": predicted - cached,
            "merge_seconds": merged - predicted,
            "edit_seconds": merged - started,
        }

    @contextlib.contextmanager
    def _reading_unedited(self) -> Iterator[None]:
        """With a memory: the edited modules hold their unedited weights inside the block."""
        if self.memories is None:
            yield
            return
        weights = [self.engine.model.get_submodule(n).weight for n in self.module_names]
        edited = [w.detach().clone() for w in weights]
        with torch.no_grad():
            for weight, unedited in zip(weights, self.unedited):
                weight.copy_(unedited)
        try:
            yield
        finally:
            with torch.no_grad():
                for weight, current in zip(weights, edited):
                    weight.copy_(current)

    def _remembered(self, keys: list[Tensor], shifts: list[Tensor]) -> list[Tensor]:
        increments = []
        for layer, (keys_NI, shift_IO) in enumerate(zip(keys, shifts)):
            ridge = float(self.engine.bank.log_lambda(layer).detach().double().exp())
            self.memories[layer], increment_IO = remembered_step(
                self.memories[layer], keys_NI, shift_IO, ridge
            )
            whitening_II = self.engine.bank.whitening(layer)
            increments.append(
                increment_IO if whitening_II is None else layer_shift(increment_IO, whitening_II)
            )
        return increments


def hypernet_editor(
    cfg: RunConfig, model: nn.Module, tokenizer: Any, state: dict[str, Any]
) -> HyperNetEditor:
    """Wrap `model` (already loaded from the checkpoint's model config) with the checkpoint's hypernetwork."""
    device = next(model.parameters()).device
    names = list(state.get("edit_modules") or []) or None
    engine = engine_for(cfg, model, tokenizer, LocalWorld(), device, names)
    engine.bank.load_state_dict(state["hypernet"])
    engine.bank.eval()
    return HyperNetEditor(engine, tokenizer, cfg.method.name, cfg.sequential.ridge_memory)


def locate_editor(cfg: RunConfig, model: nn.Module, tokenizer: Any) -> Editor:
    """MOSE / MEMIT from horse_dist.locate, with C0 per module it may change from horse_dist.keystats."""
    cfg = with_changes(cfg, {"locate.method": cfg.sequential.method})
    names = locate_module_names(cfg.locate, model)
    stats = load_or_compute_stats(cfg, cfg.model.source, names, model, tokenizer)
    # locate.lam is calibrated on MEMIT's scale, the mean E[k kᵀ]; `sum` passes K0 K0ᵀ itself
    if cfg.sequential.c0_scale == "mean":
        c0 = {name: s.normalized_second_moment() for name, s in stats.items()}
    else:
        c0 = {name: s.second_moment for name, s in stats.items()}
    try:
        return build_locate_editor(cfg, model, tokenizer, c0)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def build_editor(
    cfg: RunConfig, model: nn.Module, tokenizer: Any, checkpoint_state: dict[str, Any] | None = None
) -> Editor:
    """The editor for cfg.sequential.method; hypernetwork methods need their checkpoint's state."""
    method = cfg.sequential.method
    if method in HYPERNET_METHODS:
        if checkpoint_state is None:
            raise ConfigError(
                f"sequential.method={method!r} needs a trained checkpoint (sequential.checkpoint)"
            )
        return hypernet_editor(cfg, model, tokenizer, checkpoint_state)
    if method in LOCATE_METHODS:
        return locate_editor(cfg, model, tokenizer)
    raise ConfigError(f"sequential.method={method!r} is not one of {list(METHODS)}")
