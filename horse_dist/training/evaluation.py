"""Scoring an editor on a pool of held-out edits, beside the unedited model and the untrained editor:
teacher-forced ES / GS / LS / agreement, live decoding, fluency and CounterFact's contrast scores
(`evaluate_pool`); used by the train, evaluate and sweep jobs."""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from horse_dist.config import RunConfig
from horse_dist.data import TokenizedRecords, meta_batch_indices, shard_slice
from horse_dist.generation.contrast import CONTRAST_METRICS, contrast_views, scores_from_nll
from horse_dist.generation.live import LIVE_METRICS, LiveEval, LiveRequests
from horse_dist.training.engine import EditEngine
from horse_dist.training.hypernet_bank import HyperNetBank, untrained_bank

log = logging.getLogger(__name__)

TEACHER_FORCED = ("ES", "GS", "LS", "loc_agreement")
ROWS = ("unedited", "untrained", "edited")


def evaluate_pool(
    engine: EditEngine,
    pool: TokenizedRecords,
    n_edits: int,
    n_batches: int,
    seed: int,
    progress: bool = True,
    live: LiveEval | None = None,
    untrained: HyperNetBank | None = None,
) -> dict[str, float]:
    """Means over `n_batches` disjoint batches of `n_edits` edits (each edited at once, then reverted):
    `<row>/<metric>` for the unedited model, the trained editor ("edited") and, given `untrained`, the editor
    before meta-training; teacher-forced scores always, live (generation) scores with `live`, and with it
    CounterFact's contrast scores where the pool names the answers the edits replace."""
    n_edits = min(n_edits, len(pool.edit))
    n_batches = max(1, min(n_batches, len(pool.edit) // n_edits))
    world = engine.world
    editors = (
        {"edited": engine.bank} if untrained is None else {"untrained": untrained, "edited": engine.bank}
    )
    generate = live is not None and engine.can_generate
    if live is not None and not generate:
        log.warning("live (generation) scores are skipped under ZeRO-3 with several workers")
    sums: dict[str, torch.Tensor] = {}

    def add(row: str, scores: dict[str, torch.Tensor]) -> None:
        for key, values in scores.items():
            name = f"{row}/{key}" if row else key
            sums[name] = sums.get(name, torch.zeros((), dtype=torch.float64)) + values.double().sum()

    for batch_index in tqdm(range(n_batches), desc="evaluate", disable=not progress, leave=False):
        indices = shard_slice(
            meta_batch_indices(len(pool.edit), n_edits, seed, batch_index), world.rank, world.size
        )
        scores, shifts = engine.evaluate_batch(engine.batches_for(pool, indices), editors)
        add("", scores)
        if generate:
            requests = LiveRequests.from_pool(pool, indices)
            reference = live.generate(engine.model, requests)
            add("unedited", live.scores(requests, reference, reference["unrel"]))
            for row, row_shifts in shifts.items():
                with engine.hooks.shifted(row_shifts):
                    generated = live.generate(engine.model, requests)
                add(row, live.scores(requests, generated, reference["unrel"]))
            if pool.contrast is not None:
                nll = engine.answer_nll(contrast_views(pool, indices), {"unedited": None, **shifts})
                for row, row_nll in nll.items():
                    add(row, scores_from_nll(row_nll))
    keys = sorted(sums)
    totals = world.all_reduce_sum(torch.stack([sums[k] for k in keys]))
    count = n_edits * n_batches
    result = {k: float(v) / count for k, v in zip(keys, totals)}
    result["n_edits"] = float(n_edits)
    result["n_batches"] = float(n_batches)
    return result


def live_eval_for(cfg: RunConfig, tokenizer) -> LiveEval | None:
    """The live scoring the config asks for (None: teacher-forced scores only)."""
    if not cfg.train.eval_live:
        return None
    return LiveEval(tokenizer, cfg.train.eval_new_tokens, cfg.train.eval_loc_tokens)


def full_evaluation(
    cfg: RunConfig,
    engine: EditEngine,
    pool: TokenizedRecords,
    tokenizer,
    n_edits: int,
    progress: bool = True,
) -> dict[str, float]:
    """The evaluation a run reports: eval_batches x n_edits edits, teacher-forced and live, beside the
    unedited model and (train.eval_untrained) the editor before meta-training."""
    untrained = untrained_bank(engine.bank, cfg.method) if cfg.train.eval_untrained else None
    return evaluate_pool(
        engine,
        pool,
        n_edits,
        cfg.train.eval_batches,
        cfg.train.seed,
        progress,
        live_eval_for(cfg, tokenizer),
        untrained,
    )


def format_table(result: dict[str, float]) -> str:
    """The teacher-forced and (where measured) live scores, a row per model state."""
    rows = [row for row in ROWS if f"{row}/ES" in result]
    groups = [TEACHER_FORCED] + [
        group for group in (LIVE_METRICS, CONTRAST_METRICS) if any(f"edited/{m}" in result for m in group)
    ]
    lines = []
    for group in groups:
        widths = [max(len(m) + 2, 8) for m in group]
        lines.append(f"{'model':<10}" + "".join(f"{m:>{w}}" for m, w in zip(group, widths)))
        for row in rows:
            values = [result.get(f"{row}/{m}", float("nan")) for m in group]
            lines.append(f"{row:<10}" + "".join(f"{v:>{w}.3f}" for v, w in zip(values, widths)))
    return "\n".join(lines)
