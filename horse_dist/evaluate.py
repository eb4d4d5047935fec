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

from horse_dist.config import RunConfig, split_cli
from horse_dist.data import TokenizedRecords, meta_batch_indices, shard_slice
from horse_dist.engine import EditEngine

log = logging.getLogger(__name__)

METRICS = ("ES", "GS", "LS", "loc_agreement")


def evaluate_pool(
    engine: EditEngine, pool: TokenizedRecords, n_edits: int, n_batches: int, seed: int, progress: bool = True
) -> dict[str, float]:
    """Means over `n_batches` disjoint batches of `n_edits` edits (each edited at once, then reverted)."""
    n_edits = min(n_edits, len(pool.edit))
    n_batches = max(1, min(n_batches, len(pool.edit) // n_edits))
    world = engine.world
    sums: dict[str, torch.Tensor] = {}
    for batch_index in tqdm(range(n_batches), desc="evaluate", disable=not progress, leave=False):
        indices = meta_batch_indices(len(pool.edit), n_edits, seed, batch_index)
        batches = engine.batches_for(pool, shard_slice(indices, world.rank, world.size))
        for key, values in engine.evaluate_batch(batches).items():
            sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64)) + values.double().sum()
    keys = sorted(sums)
    totals = world.all_reduce_sum(torch.stack([sums[k] for k in keys]))
    count = n_edits * n_batches
    result = {k: float(v) / count for k, v in zip(keys, totals)}
    result["n_edits"] = float(n_edits)
    result["n_batches"] = float(n_batches)
    return result


def format_table(result: dict[str, float]) -> str:
    lines = [f"{'model':<10}" + "".join(f"{m:>15}" for m in METRICS)]
    for row in ("unedited", "edited"):
        lines.append(
            f"{row:<10}" + "".join(f"{result.get(f'{row}/{m}', float('nan')):>15.3f}" for m in METRICS)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    from horse_dist.build import build_engine, load_data
    from horse_dist.checkpoint import load_checkpoint
    from horse_dist.config import ConfigError, load_config_with_extras
    from horse_dist.signals import exit_on_sigterm

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exit_on_sigterm()
    config_file, overrides = split_cli(sys.argv[1:] if argv is None else argv)
    cfg, extras = load_config_with_extras(config_file, overrides, extras=("checkpoint", "out", "sweep"))
    if "checkpoint" not in extras:
        raise ConfigError("evaluate needs checkpoint=PATH (a checkpoint file or a run folder)")
    state = load_checkpoint(extras["checkpoint"])
    cfg = _config_from_checkpoint(state, cfg, overrides)
    engine, tokenizer = build_engine(cfg)
    engine.bank.load_state_dict(state["hypernet"])
    pools = load_data(cfg, tokenizer)
    if "sweep" in extras:
        sizes = [int(n) for n in extras["sweep"].split(",") if n.strip()]
        result = run_sweep(cfg, engine, pools.eval, sizes, str(extras["checkpoint"]))
        if "out" in extras:
            with open(extras["out"], "w") as handle:
                json.dump(result, handle, indent=2)
        return result
    result = evaluate_pool(engine, pools.eval, cfg.data.n_edits, cfg.train.eval_batches, cfg.train.seed)
    print(format_table(result))  # noqa: T201
    if "out" in extras:
        with open(extras["out"], "w") as handle:
            json.dump(result, handle, indent=2)
    return result


def run_sweep(
    cfg: RunConfig, engine: EditEngine, pool: TokenizedRecords, sizes: list[int], checkpoint: str
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
            result = evaluate_pool(engine, pool, n_edits, cfg.train.eval_batches, cfg.train.seed)
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
    main()
