"""ES / GS / LS of a trained hypernetwork at any number of edits, beside the unedited model.

    python -m horse_dist.evaluate checkpoint=runs/<run> [data.n_edits=64] [train.eval_batches=4] [key=value ...]
    python -m horse_dist.evaluate checkpoint=runs/<run> sweep=16,32,64   # an MLflow parent run, a child per n_edits

ES/GS/LS are per-edit teacher-forced top-1 token accuracies over the answer tokens, averaged over edits
(MALMEN/HORSE semantics; LS against the unrelated prompts' own answers). loc_agreement is the fraction of
answer positions where the edited model's argmax equals the unedited model's (EasyEdit semantics).
"""

from __future__ import annotations

import json
import logging
import sys

import torch
from tqdm import tqdm

from horse_dist.cli import setup_logging
from horse_dist.config import RunConfig, print_config, split_cli
from horse_dist.data import TokenizedRecords, meta_batch_indices, shard_slice
from horse_dist.engine import EditEngine
from horse_dist.generation.contrast import CONTRAST_METRICS, contrast_views, scores_from_nll
from horse_dist.generation.live import LIVE_METRICS, LiveEval, LiveRequests
from horse_dist.pipeline import HyperNetBank, untrained_bank

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


def main(argv: list[str] | None = None) -> dict[str, float]:
    from horse_dist.build import build_engine, load_data, model_positions
    from horse_dist.checkpoint import load_checkpoint
    from horse_dist.config import ConfigError, load_config_with_extras
    from horse_dist.signals import exit_on_sigterm

    setup_logging()
    exit_on_sigterm()
    cli = split_cli(sys.argv[1:] if argv is None else argv)
    overrides = cli.overrides
    cfg, extras = load_config_with_extras(cli.config_file, overrides, extras=("checkpoint", "out", "sweep"))
    if "checkpoint" not in extras:
        raise ConfigError("evaluate needs checkpoint=PATH (a checkpoint file or a run folder)")
    state = load_checkpoint(extras["checkpoint"])
    cfg = _config_from_checkpoint(state, cfg, overrides)
    if cli.show_config:
        return print_config(cfg)
    engine, tokenizer = build_engine(cfg)
    engine.bank.load_state_dict(state["hypernet"])
    pools = load_data(cfg, tokenizer, model_positions(engine.model), train=False)
    if "sweep" in extras:
        sizes = [int(n) for n in extras["sweep"].split(",") if n.strip()]
        result = run_sweep(cfg, engine, tokenizer, pools.eval, sizes, str(extras["checkpoint"]))
        if "out" in extras:
            with open(extras["out"], "w") as handle:
                json.dump(result, handle, indent=2)
        return result
    result = tracked_evaluation(cfg, engine, tokenizer, pools.eval, str(extras["checkpoint"]))
    print(format_table(result))  # noqa: T201
    if "out" in extras:
        with open(extras["out"], "w") as handle:
            json.dump(result, handle, indent=2)
    return result


def tracked_evaluation(
    cfg: RunConfig, engine: EditEngine, tokenizer, pool: TokenizedRecords, checkpoint: str
) -> dict[str, float]:
    """full_evaluation at data.n_edits, logged as its own MLflow run (`eval/<row>/<metric>`, as training
    runs log their final evaluation)."""
    from pathlib import Path

    from horse_dist.config import flatten
    from horse_dist.tracking import experiment_name, make_tracker, run_tags

    tracker = make_tracker(
        cfg.tracking.enabled,
        cfg.tracking.uri,
        experiment_name(cfg),
        f"eval-{Path(checkpoint).name}-n{cfg.data.n_edits}",
        {**run_tags(cfg, world_size=1), "checkpoint": checkpoint},
        cfg.tracking,
    )
    tracker.log_params(flatten(cfg))
    try:
        result = full_evaluation(cfg, engine, pool, tokenizer, cfg.data.n_edits)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.log_metrics({f"eval/{k}": v for k, v in result.items()}, 0)
    tracker.finish()
    return result


def run_sweep(
    cfg: RunConfig,
    engine: EditEngine,
    tokenizer,
    pool: TokenizedRecords,
    sizes: list[int],
    checkpoint: str,
) -> dict[str, float]:
    """Evaluate at each number of edits: one MLflow parent run, a nested child run per size, and the
    ES/GS/LS-against-edits plot on the parent. Returns `n_edits=<n>/<metric>` for every size."""
    import tempfile
    from pathlib import Path

    from horse_dist.config import flatten
    from horse_dist.tracking import experiment_name, make_tracker, plot_vs_edits, run_tags

    experiment = experiment_name(cfg)
    tags = run_tags(cfg, world_size=1)
    name = f"sweep-{Path(checkpoint).name}-{cfg.data.name}"
    parent = make_tracker(
        cfg.tracking.enabled,
        cfg.tracking.uri,
        experiment,
        name,
        {**tags, "sweep": "n_edits", "checkpoint": checkpoint},
        cfg.tracking,
    )
    parent.log_params({**flatten(cfg), "sweep.n_edits": ",".join(map(str, sizes))})
    rows, flat = [], {}
    try:
        for n_edits in sizes:
            child = make_tracker(
                cfg.tracking.enabled,
                cfg.tracking.uri,
                experiment,
                f"{name}-n{n_edits}",
                {**tags, "n_edits": str(n_edits), "checkpoint": checkpoint},
                cfg.tracking,
                parent_run_id=getattr(parent, "run_id", None),
            )
            cfg.data.n_edits = n_edits
            child.log_params(flatten(cfg))
            result = full_evaluation(cfg, engine, pool, tokenizer, n_edits)
            child.log_metrics({f"eval/{k}": v for k, v in result.items()}, 0)
            child.finish()
            parent.log_metrics({f"eval/{k}": v for k, v in result.items()}, n_edits)
            print(f"\n{n_edits} edits per batch:\n{format_table(result)}")  # noqa: T201
            rows.append(result)
            flat.update({f"n_edits={n_edits}/{k}": v for k, v in result.items()})
        try:
            figure = plot_vs_edits(rows, title=f"{cfg.method.name} on {cfg.model.source}, {cfg.data.name}")
        except Exception as err:  # e.g. no matplotlib
            log.warning("could not plot the sweep (%s)", err)
        else:
            parent.log_figure(figure, "plots/metrics_vs_edits.png")
            import matplotlib.pyplot as plt

            plt.close(figure)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "sweep.json"
            path.write_text(json.dumps(rows, indent=2))
            parent.log_artifact(path)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    return flat


def _config_from_checkpoint(state: dict, cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """The checkpoint's model and method win (the hypernetwork depends on them); data/eval keys may change."""
    from horse_dist.config import config_from_yaml

    saved = config_from_yaml(
        state["config"], [o for o in overrides if not o.startswith(("checkpoint=", "out=", "sweep="))]
    )
    saved.tracking = cfg.tracking
    return saved


if __name__ == "__main__":
    from horse_dist.cli import run_cli

    run_cli(main)
