"""ES / GS / LS of a trained hypernetwork at any number of edits, beside the unedited model.

    python -m horse_dist.evaluate checkpoint=runs/<run> [data.n_edits=64] [train.eval_batches=4] [key=value ...]

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

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_file, overrides = split_cli(sys.argv[1:] if argv is None else argv)
    cfg, extras = load_config_with_extras(config_file, overrides, extras=("checkpoint", "out"))
    if "checkpoint" not in extras:
        raise ConfigError("evaluate needs checkpoint=PATH (a checkpoint file or a run folder)")
    state = load_checkpoint(extras["checkpoint"])
    cfg = _config_from_checkpoint(state, cfg, overrides)
    engine, tokenizer = build_engine(cfg)
    engine.bank.load_state_dict(state["hypernet"])
    pools = load_data(cfg, tokenizer)
    result = evaluate_pool(engine, pools.eval, cfg.data.n_edits, cfg.train.eval_batches, cfg.train.seed)
    print(format_table(result))  # noqa: T201
    if "out" in extras:
        with open(extras["out"], "w") as handle:
            json.dump(result, handle, indent=2)
    return result


def _config_from_checkpoint(state: dict, cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """The checkpoint's model and method win (the hypernetwork depends on them); data/eval keys may change."""
    from horse_dist.config import config_from_yaml

    saved = config_from_yaml(state["config"], [o for o in overrides if not o.startswith("checkpoint=")])
    saved.tracking = cfg.tracking
    return saved


if __name__ == "__main__":
    main()
