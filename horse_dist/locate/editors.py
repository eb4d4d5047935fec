"""Locate-then-edit editors (MOSE, MEMIT, AlphaEdit) behind the small protocol the sequential-editing runner uses.

One call to `edit` applies one batch of edits in place:
  prefixes (once, from the unedited model) -> [MOSE: value residual per candidate layer, Eq. 22 selects l*]
  -> target z = h_L + δ at the top edited layer L -> for each edited layer l, ascending: keys K_l (with the
  layers below already edited), residual (z − h_L(current)) / (L − l + 1) (MEMIT's spreading), values
  V_l = W_l K_l + residual, update W_l (MOSE: W <- R W; MEMIT: W <- W + ΔW; AlphaEdit: W <- W + ΔW with ΔW
  in the null space of the preserved keys) -> with locate.refine_rounds, the edits whose plain prompt does
  not yet give the answer get values from the edited model and another update -> the batch's keys join those
  of earlier edits (C_p).
Legend: N edits, I = d_in, O = d_out.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Protocol

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from horse_dist.config import LocateConfig, RunConfig
from horse_dist.data.records import EditRecord
from horse_dist.data.tokenize import answer_stop_id
from horse_dist.editor.alphaedit import alphaedit_delta, null_space_projector
from horse_dist.editor.mose import (
    layer_scores,
    memit_delta,
    mose_rotation,
    select_layer,
    unreached_share,
    with_neighbours,
)
from horse_dist.lm.registry import module_shape
from horse_dist.locate.keys import compute_keys, subject_block_outputs
from horse_dist.locate.layers import block_name, module_names_for, n_layers, set_weight_OI, weight_OI
from horse_dist.locate.prompts import LocateBatch, essence_batch, rewrite_batch, sample_prefixes
from horse_dist.locate.values import (
    ValueOptions,
    ValueResult,
    answers_made,
    first_row_per_edit,
    optimise_values,
)

logger = logging.getLogger(__name__)

METHODS = ("mose", "memit", "alphaedit")
SOLVE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# λ when locate.lam is 0. MEMIT's GPT-J value; for MOSE a large λ pins R to I (SmolLM2, 5 CounterFact edits:
# ES 0.8 at λ = 1..100, 0.6 at 1000; docs/mose.md); AlphaEdit's l2 on ‖ΔP‖² (the paper's Llama3-8B value).
DEFAULT_LAMBDA = {"mose": 10.0, "memit": 15000.0, "alphaedit": 10.0}


class Editor(Protocol):
    """Any sequential editor (these and lifelong/editors.py's hypernetworks): changes the model's weights in
    place, one batch of edits per call, starting from the weights as they are now."""

    name: str
    module_names: list[str]  # every weight it may change

    def edit(self, records: list[EditRecord]) -> dict[str, float]: ...  # in place; returns timings


def default_layers(total: int) -> list[int]:
    """6 consecutive layers starting at 10% of the depth (MEMIT edits GPT-J's layers 3-8 of 28)."""
    start = max(0, min(round(0.1 * total), total - 6))
    return list(range(start, min(start + 6, total)))


def candidate_layers(cfg: LocateConfig, model: nn.Module) -> list[int]:
    layers = sorted(set(cfg.layers)) if cfg.layers else default_layers(n_layers(model))
    module_names_for(model, layers)  # validates the range
    return layers


def editable_layers(cfg: LocateConfig, model: nn.Module) -> list[int]:
    """Every layer an editor built from `cfg` may change: candidates, plus neighbours when selecting."""
    layers = candidate_layers(cfg, model)
    if not cfg.select_layer:
        return layers
    total = n_layers(model)
    return sorted({i for layer in layers for i in with_neighbours(layer, total, cfg.neighbours)})


def locate_module_names(cfg: LocateConfig, model: nn.Module) -> list[str]:
    """The modules needing key statistics C0 (and changed by the editor), ascending layer order."""
    return module_names_for(model, editable_layers(cfg, model))


def validate_locate(cfg: LocateConfig) -> None:
    if cfg.method not in METHODS:
        raise ValueError(f"locate.method={cfg.method!r} is not one of {list(METHODS)}")
    if cfg.solve_dtype not in SOLVE_DTYPES:
        raise ValueError(f"locate.solve_dtype={cfg.solve_dtype!r} is not one of {sorted(SOLVE_DTYPES)}")
    if cfg.lam < 0:
        raise ValueError(f"locate.lam must be >= 0 (0: the method's default), got {cfg.lam}")
    if not 0.0 <= cfg.null_energy < 1.0:
        raise ValueError(f"locate.null_energy must be in [0, 1), got {cfg.null_energy}")
    for key in ("v_lr", "clamp_factor", "keep_weight"):
        if not getattr(cfg, key) > 0:
            raise ValueError(f"locate.{key} must be positive, got {getattr(cfg, key)}")
    for key in ("v_steps", "n_prefixes", "prefix_len", "neighbours", "refine_rounds"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"locate.{key} must be >= 0, got {getattr(cfg, key)}")


class LocateEditor:
    """Shared flow of MOSE and MEMIT; subclasses give the weight update."""

    name = "locate"

    def __init__(
        self, cfg: RunConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase, stats: dict[str, Tensor]
    ) -> None:
        self.cfg = cfg.locate
        validate_locate(self.cfg)
        self.model, self.tokenizer = model, tokenizer
        self.stop_id = answer_stop_id(tokenizer, cfg.data.answer_end)  # value targets end the answer there
        self.candidates = candidate_layers(self.cfg, model)
        self.module_names = locate_module_names(self.cfg, model)
        self.n_layers = n_layers(model)
        self.dtype = SOLVE_DTYPES[self.cfg.solve_dtype]
        self.lam = self.cfg.lam or DEFAULT_LAMBDA[self.name]
        self.options = ValueOptions(
            steps=self.cfg.v_steps,
            lr=self.cfg.v_lr,
            kl_factor=self.cfg.kl_factor,
            weight_decay=self.cfg.v_weight_decay,
            clamp_factor=self.cfg.clamp_factor,
            min_nll=self.cfg.v_min_nll,
        )
        self.stats = self._check_stats(stats)
        # C_p = Σ K_E K_Eᵀ of the stream's edits, recomputed on the edited model after each batch
        self.edited = {name: torch.zeros_like(c0) for name, c0 in self.stats.items()}
        self.keeps_edits = self.cfg.keep_edits
        self.prefixes: list[str] | None = None
        self.n_edited = 0

    def _check_stats(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = [name for name in self.module_names if name not in stats]
        if missing:
            raise ValueError(f"{self.name}: no key statistics C0 for {missing} (have {sorted(stats)})")
        checked = {}
        for name in self.module_names:
            d_in, _ = module_shape(self.model.get_submodule(name))
            if tuple(stats[name].shape) != (d_in, d_in):
                raise ValueError(
                    f"{self.name}: C0 of {name} has shape {tuple(stats[name].shape)}, expected {(d_in, d_in)}"
                )
            checked[name] = stats[name].to(dtype=self.dtype, device=self._device)
        return checked

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _module(self, layer: int) -> str:
        return module_names_for(self.model, [layer])[0]

    def update(self, name: str, w_OI: Tensor, keys_IN: Tensor, values_ON: Tensor) -> Tensor:
        """The new weight (O, I) of module `name`; subclasses implement it."""
        raise TypeError(f"{type(self).__name__} does not define an update")

    def preserved(self, name: str) -> Tensor:
        """C0 and, with keep_edits, the earlier edits' keys at locate.keep_weight new edit keys each (λ
        multiplies the sum)."""
        if not self.keeps_edits:
            return self.stats[name]
        return self.stats[name] + self.edited[name] * (self.cfg.keep_weight / self.lam)

    def after_edit(self, rewrite: LocateBatch, layers: list[int]) -> None:
        """Once the batch's layers are all updated: add its keys, as the edited model computes them, to C_p."""
        if not self.keeps_edits:
            return
        for layer in layers:
            name = self._module(layer)
            keys_IN = compute_keys(self.model, name, rewrite).to(self.dtype)
            self.edited[name] += keys_IN @ keys_IN.T

    def _values(self, layer: int, rewrite, essence, options: ValueOptions | None = None) -> ValueResult:
        name = self._module(layer)
        return optimise_values(self.model, name, rewrite, essence, options or self.options)

    def _select(self, rewrite, essence) -> tuple[int, dict[int, ValueResult]]:
        """Eq. 22 over the candidate layers: the δ each needs, scaled by ‖W‖₂ and ‖k_e‖."""
        results, resid, spectral, key_norms = {}, [], [], []
        for layer in self.candidates:
            name = self._module(layer)
            keys_IN = compute_keys(self.model, name, rewrite)
            results[layer] = self._values(layer, rewrite, essence)
            resid.append(results[layer].delta_NO.T.double())  # V_E − W0 K_E = δ at that layer
            spectral.append(
                torch.linalg.matrix_norm(weight_OI(self.model.get_submodule(name)).double(), ord=2)
            )
            key_norms.append(keys_IN.double().norm(dim=0))
        scores = layer_scores(resid, torch.stack(spectral), torch.stack(key_norms))
        chosen = select_layer(self.candidates, scores)
        logger.info(
            "%s: layer scores %s -> layer %d", self.name, dict(zip(self.candidates, scores.tolist())), chosen
        )
        return chosen, results

    def _batches(self, records: list[EditRecord], first: int) -> tuple[LocateBatch, LocateBatch]:
        """The rewrite and essence batches of `records`, the stream's edits number `first` on."""
        assert self.prefixes is not None
        names = [f"edit {first + i} (subject {r.subject!r})" for i, r in enumerate(records)]
        rewrite = rewrite_batch(self.tokenizer, records, self.prefixes, names, self.stop_id)
        return rewrite, essence_batch(self.tokenizer, records, self.cfg.essence_template, names)

    def edit(self, records: list[EditRecord]) -> dict[str, float]:
        if not records:
            return {}
        t0 = time.perf_counter()
        if self.prefixes is None:
            self.prefixes = sample_prefixes(
                self.model, self.tokenizer, self.cfg.n_prefixes, self.cfg.prefix_len, self.cfg.seed
            )
        rewrite, essence = self._batches(records, self.n_edited)
        timings = {"time/prepare": time.perf_counter() - t0}

        t1 = time.perf_counter()
        results: dict[int, ValueResult] = {}
        if self.cfg.select_layer:
            chosen, results = self._select(rewrite, essence)
            layers = with_neighbours(chosen, self.n_layers, self.cfg.neighbours)
            timings["layer"] = float(chosen)
        else:
            layers = list(self.candidates)
        top = layers[-1]
        if top not in results:
            results[top] = self._values(top, rewrite, essence)
        target = results[top]
        timings["time/values"] = time.perf_counter() - t1
        timings["nll_before"] = float(target.nll_before_N.mean())
        timings["nll_after_values"] = float(target.nll_after_N.mean())

        t2 = time.perf_counter()
        unreached = self._update_layers(rewrite, target, layers)
        timings["time/update"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        timings["refined"] = float(self._refine(records, rewrite, layers))
        timings["time/refine"] = time.perf_counter() - t3
        self.after_edit(rewrite, layers)
        # what the updates left of the change their layers' values asked for (mean over layers; 0: all made)
        timings["unreached"] = sum(unreached) / len(unreached)
        timings["time/total"] = time.perf_counter() - t0
        self.n_edited += len(records)
        logger.info(
            "%s: %d edits on layers %s in %.2fs", self.name, len(records), layers, timings["time/total"]
        )
        return timings

    def _update_layers(self, rewrite: LocateBatch, target: ValueResult, layers: list[int]) -> list[float]:
        """Move each layer, lowest first, a share of the way to the target z at the top one (MEMIT's
        spreading); returns the share of each layer's asked change its update left undone."""
        top = layers[-1]
        top_block = block_name(self._module(top))
        plain_rows = first_row_per_edit(rewrite)
        unreached: list[float] = []
        for layer in layers:
            name = self._module(layer)
            module = self.model.get_submodule(name)
            keys_IN = compute_keys(self.model, name, rewrite).to(self.dtype)
            current_NO = subject_block_outputs(self.model, top_block, rewrite)[plain_rows]
            resid_NO = (target.target_NO - current_NO.to(target.target_NO.device)) / (top - layer + 1)
            w_OI = weight_OI(module).to(self.dtype)
            values_ON = w_OI @ keys_IN + resid_NO.T.to(self.dtype)
            new_OI = self.update(name, w_OI, keys_IN, values_ON)
            unreached.append(unreached_share(w_OI, new_OI, keys_IN, values_ON))
            set_weight_OI(module, new_OI)
        return unreached

    def _refine(self, records: list[EditRecord], rewrite: LocateBatch, layers: list[int]) -> int:
        """Up to locate.refine_rounds more rounds for the edits the update has not yet made (their plain
        prompt's answer not the argmax at every token): values again from the edited model, and a second
        update. These values stop only once every answer token of every row is at probability above 1/2:
        an edit the first round left short can already sit below the mean-NLL target (a long answer with
        one token wrong, or prefixed rows over the target while the plain prompt is under it). Runs before
        the batch's keys join C_p, which would hold the edit where it fell short. Returns the number of
        edits refined (counted once per round)."""
        options = replace(self.options, max_token_nll=math.log(2))
        refined, todo = 0, list(range(len(records)))
        for _ in range(self.cfg.refine_rounds):
            made_N = answers_made(self.model, rewrite).tolist()  # rewrite: the rows of `todo`
            todo = [i for i, made in zip(todo, made_N) if not made]
            if not todo:
                break
            rewrite, essence = self._batches([records[i] for i in todo], self.n_edited)
            target = self._values(layers[-1], rewrite, essence, options)
            self._update_layers(rewrite, target, layers)
            refined += len(todo)
            logger.info("%s: refined %d of %d edits not yet made", self.name, len(todo), len(records))
        return refined


class MoseEditor(LocateEditor):
    """W <- R W with R the Procrustes rotation of MOSE (norm and condition number of W unchanged)."""

    name = "mose"

    def update(self, name: str, w_OI: Tensor, keys_IN: Tensor, values_ON: Tensor) -> Tensor:
        rot_OO = mose_rotation(w_OI, self.preserved(name), keys_IN, values_ON, self.lam, self.dtype)
        return rot_OO @ w_OI.to(self.dtype)


class MemitEditor(LocateEditor):
    """W <- W + ΔW, MEMIT's additive least-squares update (the drift MOSE avoids)."""

    name = "memit"

    def update(self, name: str, w_OI: Tensor, keys_IN: Tensor, values_ON: Tensor) -> Tensor:
        delta_OI = memit_delta(w_OI, self.preserved(name), keys_IN, values_ON, self.lam, self.dtype)
        return w_OI.to(self.dtype) + delta_OI


class AlphaEditEditor(LocateEditor):
    """W <- W + ΔW with ΔW in the null space of the preserved keys (P from C0, locate.null_energy), kept off
    the keys of the stream's earlier edits (editor/alphaedit.py)."""

    name = "alphaedit"

    def __init__(
        self, cfg: RunConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase, stats: dict[str, Tensor]
    ) -> None:
        super().__init__(cfg, model, tokenizer, stats)
        energy = self.cfg.null_energy
        self.projectors = {name: null_space_projector(c0, energy) for name, c0 in self.stats.items()}
        self.keeps_edits = True  # C_p enters the update as its own term
        ranks = {name: round(float(p.trace())) for name, p in self.projectors.items()}
        logger.info("alphaedit: null-space dimensions %s (energy %g of tr C0)", ranks, energy)

    def update(self, name: str, w_OI: Tensor, keys_IN: Tensor, values_ON: Tensor) -> Tensor:
        projector, edited = self.projectors[name], self.edited[name]
        delta_OI = alphaedit_delta(w_OI, keys_IN, values_ON, projector, edited, self.lam, self.dtype)
        return w_OI.to(self.dtype) + delta_OI


EDITORS: dict[str, type[LocateEditor]] = {
    "mose": MoseEditor,
    "memit": MemitEditor,
    "alphaedit": AlphaEditEditor,
}
