"""The per-worker editing engine: frozen LM + hooks + hypernetworks + world, and the meta-step of DESIGN §1.

The same object runs in local mode (LocalWorld) and as a distributed worker (TorchWorld): it only ever sees
its own slice of each meta-batch, and every global quantity goes through the world.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from horse_dist.config import RunConfig
from horse_dist.data import TokenBatch, TokenizedExample, TokenizedRecords, collate, micro_batch_plan
from horse_dist.data.packing import collate_packed, packed_plan
from horse_dist.dist.cache_store import spill_over_budget
from horse_dist.dist.world import LocalWorld
from horse_dist.editor.losses import per_example_ce
from horse_dist.editor.prior import layer_shift, prior_whitening, whiten_keys, whitened_shift_grad
from horse_dist.keystats.accumulate import KeyStats, accumulate_passes, accumulate_texts
from horse_dist.lm.answer_tail import last_block_tail_logits, tail_answer_logits
from horse_dist.lm.block_cache import BlockInputCache, once_per_batch
from horse_dist.lm.fast_forward import (
    RESUMABLE,
    HiddenStates,
    hidden_entering_block,
    use_answer_tail,
    use_packing,
)
from horse_dist.lm.hooks import EditHooks
from horse_dist.lm.passes import (
    CacheResult,
    Logits,
    answer_logits,
    cache_pass,
    loss_pass,
    model_inputs,
    recording,
    resumed_answer_logits,
    score_pass,
)
from horse_dist.lm.registry import layer_index, model_type, module_shape
from horse_dist.training.hypernet_bank import (
    HyperNetBank,
    PhaseTimer,
    Prediction,
    meta_backward,
    predict_shifts,
    set_step_units_from_keys,
    update_normalizers,
)

log = logging.getLogger(__name__)

PROMPT_KINDS = ("edit", "equiv", "unrel")


class DivergedError(RuntimeError):
    """train.max_bad_steps meta-steps in a row had a non-finite loss or gradient (each one skipped)."""


@dataclass
class EditBatches:
    """One worker's slice of a meta-batch, tokenised into micro-batches of the three prompt kinds."""

    edit: list[TokenBatch]
    equiv: list[TokenBatch]
    unrel: list[TokenBatch]
    n_edits: int
    # (pool uid, index in the pool) of each edit: the keys of the block-input cache
    records: list[tuple[int, int]] | None = None


class EditEngine:
    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        pad_id: int,
        module_names: list[str],
        world: LocalWorld,
        device: torch.device,
        stop_id: int | None = None,
    ) -> None:
        self.cfg, self.model, self.pad_id, self.world, self.device = cfg, model, pad_id, world, device
        # end-of-text taught after each edit answer (data.answer_end=eos): learned, never scored
        self.stop_id = stop_id
        self.module_names = list(module_names)
        self.shapes = [module_shape(model.get_submodule(name)) for name in self.module_names]
        self.hooks = EditHooks(model, self.module_names)
        self.bank = HyperNetBank(self.shapes, cfg.method).to(device)
        self.deepspeed = None  # the DeepSpeedLM of a distributed worker (build.build_engine sets it)
        self.loss_scale = float(cfg.data.batch_size)
        # Losses are sums of per-edit means times 1/loss_scale, so the grouping into micro-batches only
        # changes speed and memory (large ones fill a GPU), never the result.
        self.micro_batch_rows = cfg.data.micro_batch_size or cfg.data.batch_size
        self.packing = use_packing(cfg.data.packing, model, device)
        zero_stage = cfg.dist.zero_stage if cfg.dist.backend == "ray" else 0
        self.answer_tail = use_answer_tail(cfg.model.answer_tail, model, device, zero_stage)
        resumable = model_type(model) in RESUMABLE
        # the blocks below it are frozen and never shifted (where passes may resume)
        self.lowest_block = min(layer_index(name) for name in self.module_names) if resumable else 0
        self.block_cache: BlockInputCache | None = None
        if cfg.train.block_cache_gb > 0 and resumable:
            self.block_cache = BlockInputCache(self.lowest_block, int(cfg.train.block_cache_gb * 2**30))

    # ---- data -------------------------------------------------------------------------------------------
    def micro_batches(self, examples: list, min_batches: int = 0) -> list[TokenBatch]:
        plan = self._plan(examples, min_batches)
        if self.packing:
            share = self.cfg.data.share_prefixes
            batches = [collate_packed(examples, rows, self.pad_id, share) for rows in plan]
        else:
            batches = [collate([examples[i] for i in chunk], chunk, self.pad_id) for chunk in plan]
        return [b.to(self.device) for b in batches]

    def batches_for(self, pool: TokenizedRecords, indices: list[int]) -> EditBatches:
        views = [[examples[i] for i in indices] for examples in (pool.edit, pool.equiv, pool.unrel)]
        counts = [0, 0, 0]
        if self.lockstep:
            local = [len(self._plan(v)) for v in views]
            counts = self._max_batch_counts(local)
        edit, equiv, unrel = (self.micro_batches(v, n) for v, n in zip(views, counts))
        return EditBatches(edit, equiv, unrel, len(indices), [(pool.uid, i) for i in indices])

    def _plan(self, examples: list, min_batches: int = 0) -> list:
        """Micro-batches as example indices (packed: per row), under the data config's limits."""
        data, rows = self.cfg.data, self.micro_batch_rows
        if self.packing:
            return packed_plan(
                examples, rows, data.max_batch_tokens, min_batches, data.pack_row_tokens, data.share_prefixes
            )
        return micro_batch_plan(examples, rows, data.max_batch_tokens, min_batches)

    @property
    def lockstep(self) -> bool:
        """ZeRO-3 with several workers: every LM pass all-gathers weight shards from all workers, so each
        worker must run the same number of micro-batches (a worker with one pass more would wait forever)."""
        return self.world.size > 1 and self.deepspeed is not None and self.deepspeed.zero_stage == 3

    @property
    def can_generate(self) -> bool:
        """Free generation runs a different number of forwards per worker, which lockstep ZeRO-3 forbids."""
        return not self.lockstep

    def _max_batch_counts(self, local: list[int]) -> list[int]:
        table = torch.zeros(self.world.size, len(local), dtype=torch.float64)
        table[self.world.rank] = torch.tensor(local, dtype=torch.float64)
        return [int(v) for v in self.world.all_reduce_sum(table).max(dim=0).values]

    # ---- editing ----------------------------------------------------------------------------------------
    def cache(self, batches: EditBatches, hidden_fn: HiddenStates | None = None) -> CacheResult:
        """K, G and the unedited loss of the edit prompts. `hidden_fn` gives the states entering the lowest
        edited block (the block-input cache's); without it the blocks below run."""
        if self.answer_tail:
            hidden = hidden_fn or self._hidden_below

            def recorded(batch: TokenBatch) -> torch.Tensor:
                return tail_answer_logits(self.model, self.hooks, batch, hidden(batch), self.lowest_block)

        elif hidden_fn is not None:
            recorded = recording(self.hooks, self.resumed_logits(hidden_fn))
        else:
            recorded = None  # the plain full pass
        cache = cache_pass(self.model, self.hooks, batches.edit, batches.n_edits, self.loss_scale, recorded)
        if self.bank.has_prior:  # the pipeline edits in whitened key space (editor/prior.py)
            cache.keys = [whiten_keys(k, self.bank.whitening(i)) for i, k in enumerate(cache.keys)]
        return spill_over_budget(cache, self.cfg.dist.cache_budget_gb)  # unchanged within the budget

    def prompt_key_stats(self, texts: list[str], tokenizer) -> dict[str, KeyStats]:
        """Σ k kᵀ of the edited layers' inputs at every token of `texts` (method.prior_keys=prompt_tokens)."""
        return accumulate_texts(
            self.model, tokenizer, self.module_names, texts, max_length=128, batch_size=32, stop_early=True
        )

    def answer_key_stats(self, examples: list[TokenizedExample]) -> dict[str, KeyStats]:
        """Σ k kᵀ of the edited layers' inputs at the answer positions of `examples`, teacher-forced: the keys
        an unrelated answer is generated from (method.prior_keys=unrelated_answers)."""
        passes = (
            (model_inputs(self.model, batch), batch.answer_positions()[0])
            for batch in self.micro_batches(examples)
        )
        return accumulate_passes(self.model, self.module_names, passes)

    def fit_key_prior(self, stats: dict[str, KeyStats]) -> None:
        """Set W_l of the key prior from the edited layers' key moments (editor/prior.py)."""
        for layer, name in enumerate(self.module_names):
            moment = stats[name]
            self.bank.whitening(layer).copy_(
                prior_whitening(moment.second_moment, moment.count, self.cfg.method.prior_damping)
            )
        log.info("key prior C0 from %d keys per layer", stats[self.module_names[0]].count)

    def block_cache_sources(self, batches: EditBatches) -> dict[str, HiddenStates | None]:
        """Per prompt kind, the block-input cache's states entering the lowest edited block (for training
        and evaluation passes); None where there is no usable cache: the passes run the blocks below."""
        usable = self.block_cache is not None and batches.records is not None and self._may_resume
        if not usable:
            return dict.fromkeys(PROMPT_KINDS)
        return {kind: self.block_cache.hidden_fn(self.model, kind, batches.records) for kind in PROMPT_KINDS}

    def block_inputs(
        self, batches: EditBatches, shared: Collection[str] = ()
    ) -> dict[str, HiddenStates | None]:
        """Per prompt kind, where the passes over `batches` get the states entering the lowest edited block:
        the block-input cache where usable, else None (the passes run the blocks below); the kinds in
        `shared` are computed once per micro-batch, for several passes over the same batches."""
        sources = self.block_cache_sources(batches)
        return {kind: self.shared_hidden(s) if kind in shared else s for kind, s in sources.items()}

    def shared_hidden(self, source: HiddenStates | None = None) -> HiddenStates | None:
        """For several passes over the same micro-batches: the states entering the lowest edited block,
        computed once per batch (by `source` where given); None where passes cannot resume there."""
        if self.lowest_block == 0 or not self._may_resume:
            return None
        return once_per_batch(source or self._hidden_below)

    @property
    def _may_resume(self) -> bool:
        """ZeRO-3 fetches its partitioned blocks in traced module order: its passes start at block 0."""
        return self.deepspeed is None or self.deepspeed.zero_stage != 3

    @torch.no_grad()
    def _hidden_below(self, batch: TokenBatch) -> torch.Tensor:
        return hidden_entering_block(self.model, model_inputs(self.model, batch), self.lowest_block)

    def _loss_logits(self, hidden_fn: HiddenStates | None) -> Logits | None:
        """The loss passes' answer logits: the last block split off the answer tail where enabled, resumed
        from `hidden_fn` where given; None: the plain full pass."""
        if self.answer_tail:
            hidden = hidden_fn or self._hidden_below
            return lambda b: last_block_tail_logits(self.model, b, hidden(b), self.lowest_block)
        return self.resumed_logits(hidden_fn)

    def resumed_logits(self, hidden_fn: HiddenStates | None) -> Logits | None:
        """Answer logits from the states `hidden_fn` gives for the lowest edited block; None (the plain full
        pass) without it."""
        if hidden_fn is None:
            return None
        return lambda b: resumed_answer_logits(self.model, b, hidden_fn(b), self.lowest_block)

    def predict(
        self,
        cache: CacheResult,
        learn_statistics: bool,
        timer: PhaseTimer | None = None,
        keep_graph: bool = False,
        bank: HyperNetBank | None = None,
    ) -> Prediction:
        """Shifts S_l for the cached edits (by `bank`, default the engine's). Training merges the step's
        moments into the normalisers first; evaluation and editing use the trained statistics (and fall back
        to the batch's own if there are none)."""
        bank = bank or self.bank
        if learn_statistics or not bank.normalizers_ready():
            if not learn_statistics:
                log.warning("hypernetwork normaliser has no statistics yet; using this batch's")
            if self.cfg.method.eta_init_mode == "key_energy" and not bank.normalizers_ready():
                set_step_units_from_keys(bank, cache.keys, self.world)
            update_normalizers(bank, cache.keys, cache.grads, self.world)
        prediction = predict_shifts(
            bank,
            cache.keys,
            cache.grads,
            self.cfg.method,
            self.world,
            self.module_names,
            timer,
            keep_graph,
        )
        if not bank.has_prior:
            return prediction
        layer_shifts = [layer_shift(s, bank.whitening(i)) for i, s in enumerate(prediction.shifts)]
        return replace(prediction, shifts=layer_shifts, solved=prediction.shifts)

    # ---- training ---------------------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam; the per-layer scalars (η, λ) may get their own learning rate."""
        train = self.cfg.train
        scalars = [p for n, p in self.bank.named_parameters() if n.endswith(("eta", "log_lambda"))]
        scalar_ids = {id(p) for p in scalars}
        blocks = [p for p in self.bank.parameters() if id(p) not in scalar_ids]
        groups = [
            {"params": [p for p in blocks if p.requires_grad], "lr": train.meta_lr},
            {"params": [p for p in scalars if p.requires_grad], "lr": train.scalar_lr or train.meta_lr},
        ]
        # fused: one kernel per tensor instead of a dozen passes (16 M parameters on SmolLM2: 36 -> 7 ms a step)
        return torch.optim.Adam(groups, fused=True)

    def meta_step(self, batches: EditBatches, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One meta-step on this worker's slice; returns metrics summed over this worker's edits."""
        method, timer = self.cfg.method, PhaseTimer()
        optimizer.zero_grad(set_to_none=False)
        # KL locality's reference and shifted passes run over the same unrelated batches
        sources = self.block_inputs(batches, shared=("unrel",) if method.locality == "kl" else ())
        with timer("cache"):
            cache = self.cache(batches, sources["edit"])
        prediction = self.predict(cache, learn_statistics=True, timer=timer, keep_graph=True)
        shifts = [s.detach().clone().requires_grad_(True) for s in prediction.shifts]

        def shifted_loss(micro: list[TokenBatch], objective: str, weight: float, source, unscored=None):
            logits = self._loss_logits(source)
            return loss_pass(
                self.model, self.hooks, micro, shifts, batches.n_edits, objective, weight, logits, unscored
            )

        with timer("generalisation"):
            gen = shifted_loss(batches.equiv, "ce", 1.0 / self.loss_scale, sources["equiv"], self.stop_id)
        with timer("locality"):  # unrelated answers never end with the stop label: all their positions count
            loc = shifted_loss(
                batches.unrel, method.locality, method.loc_coef / self.loss_scale, sources["unrel"]
            )
        grad_shifts = [s.grad if s.grad is not None else torch.zeros_like(s) for s in shifts]
        if self.bank.has_prior:  # ∂L/∂S' = Wᵀ ∂L/∂S
            grad_shifts = [whitened_shift_grad(g, self.bank.whitening(i)) for i, g in enumerate(grad_shifts)]
        meta_backward(self.bank, cache.keys, cache.grads, prediction, grad_shifts, method, self.world, timer)
        with timer("optimizer"):
            params = [p for p in self.bank.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
            # the gradients are all-reduced, so every worker sees the same norm and skips the same steps; a
            # non-finite loss or solve makes it non-finite too
            skipped = not bool(torch.isfinite(grad_norm))
            if skipped:
                optimizer.zero_grad(set_to_none=False)
            else:
                optimizer.step()
        metrics = {
            "gen_loss_sum": float(gen.loss.sum()),
            "loc_loss_sum": float(loc.loss.sum()),
            "train_gs_sum": float(gen.accuracy.sum()),
            "train_ls_sum": float(loc.accuracy.sum()),
            "cache_loss_sum": float(cache.loss.sum()),
            "edits": float(batches.n_edits),
            "tokens": float(cache.keys[0].shape[0]),
            "grad_norm": float(grad_norm),
            "skipped": float(skipped),
        }
        metrics.update({f"time/{phase}": seconds for phase, seconds in timer.seconds.items()})
        return metrics

    # ---- evaluation -------------------------------------------------------------------------------------
    def evaluate_batch(
        self, batches: EditBatches, editors: dict[str, HyperNetBank] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
        """Per-edit ES/GS/LS of the unedited model and, with each editor's predicted edit applied, of the
        edited one (`<editor>/ES` ..., default one editor "edited" = the engine's bank), plus locality
        agreement. Returns the scores and each editor's shifts."""
        editors = editors or {"edited": self.bank}
        n = batches.n_edits
        # The unedited, cache and edited passes over a kind's batches run the blocks below the edited ones once.
        hidden = self.block_inputs(batches, shared=PROMPT_KINDS)

        def score(kind: str, shifts: list[torch.Tensor] | None = None, reference: list | None = None):
            logits = self.resumed_logits(hidden[kind])
            return score_pass(
                self.model, self.hooks, getattr(batches, kind), n, shifts, reference, logits, self.stop_id
            )

        out: dict[str, torch.Tensor] = {}
        unrel_before = score("unrel")
        out["unedited/ES"] = score("edit").accuracy
        out["unedited/GS"] = score("equiv").accuracy
        out["unedited/LS"] = unrel_before.accuracy
        out["unedited/loc_agreement"] = torch.ones(n)
        cache = self.cache(batches, hidden["edit"])  # K and G do not depend on the editor
        all_shifts = {}
        for name, bank in editors.items():
            shifts = self.predict(cache, learn_statistics=False, bank=bank).shifts
            out[f"{name}/ES"] = score("edit", shifts).accuracy
            out[f"{name}/GS"] = score("equiv", shifts).accuracy
            unrel_after = score("unrel", shifts, unrel_before.predictions)
            out[f"{name}/LS"] = unrel_after.accuracy
            out[f"{name}/loc_agreement"] = unrel_after.agreement
            all_shifts[name] = shifts
        return out, all_shifts

    @torch.no_grad()
    def answer_nll(
        self, views: dict[str, list[TokenizedExample]], shifts: dict[str, list[torch.Tensor] | None]
    ) -> dict[str, dict[str, torch.Tensor]]:
        """`[row][view]`: each example's mean answer-token NLL (float64, CPU) with row's shifts applied (None:
        the unedited model). The blocks below the lowest edited one run once per micro-batch for all rows."""
        out: dict[str, dict[str, torch.Tensor]] = {row: {} for row in shifts}
        for view, examples in views.items():
            batches, n = self.micro_batches(examples), len(examples)
            logits_fn = self.resumed_logits(self.shared_hidden()) or partial(answer_logits, self.model)
            for row, row_shifts in shifts.items():
                total = torch.zeros(n, dtype=torch.float64)
                for batch in batches:
                    _, labels_P, example_ids_P = batch.answer_positions()
                    with self.hooks.shifted(row_shifts) if row_shifts is not None else nullcontext():
                        logits_PV = logits_fn(batch)
                    total += per_example_ce(logits_PV, labels_P, example_ids_P, n).double().cpu()
                out[row][view] = total
        return out
