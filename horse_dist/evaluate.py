"""ES / GS / LS of a trained hypernetwork at any number of edits, beside the unedited model.

    python -m horse_dist.evaluate checkpoint=runs/<run> [data.n_edits=64] [train.eval_batches=4] [key=value ...]
    python -m horse_dist.evaluate checkpoint=runs/<run> sweep=16,32,64   # an MLflow parent run, a child per n_edits

ES/GS/LS are per-edit teacher-forced top-1 token accuracies over the answer tokens, averaged over edits
(MALMEN/HORSE semantics; LS against the unrelated prompts' own answers). loc_agreement is the fraction of
answer positions where the edited model's argmax equals the unedited model's (EasyEdit semantics).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

from horse_dist.cli import run_cli, setup_logging
from horse_dist.config import (
    ConfigError,
    RunConfig,
    config_from_yaml,
    flatten,
    load_config_with_extras,
    print_config,
    split_cli,
    with_changes,
)
from horse_dist.data import TokenizedRecords
from horse_dist.process import exit_on_sigterm
from horse_dist.tracking.mlflow_run import experiment_name, make_tracker, run_tags
from horse_dist.tracking.plots import plot_vs_edits
from horse_dist.training.assembly import build_engine, load_data, model_positions
from horse_dist.training.checkpoint import load_checkpoint
from horse_dist.training.engine import EditEngine
from horse_dist.training.evaluation import format_table, full_evaluation

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict[str, float]:

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
        return print_config(cfg, "evaluate")
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

    tracker = make_tracker(
        cfg.tracking.enabled,
        cfg.tracking.uri,
        experiment_name(cfg),
        f"eval-{Path(checkpoint).name}-n{cfg.data.n_edits}",
        {**run_tags(cfg, world_size=1), "checkpoint": checkpoint},
        cfg.tracking,
    )
    tracker.log_params(flatten(cfg, "evaluate"))
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
    parent.log_params({**flatten(cfg, "evaluate"), "sweep.n_edits": ",".join(map(str, sizes))})
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
            sized = with_changes(cfg, {"data.n_edits": n_edits})
            child.log_params(flatten(sized, "evaluate"))
            result = full_evaluation(sized, engine, pool, tokenizer, n_edits)
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

    saved = config_from_yaml(
        state["config"], [o for o in overrides if not o.startswith(("checkpoint=", "out=", "sweep="))]
    )
    return dataclasses.replace(saved, tracking=cfg.tracking)


if __name__ == "__main__":
    run_cli(main)
