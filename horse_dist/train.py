"""Meta-train a HORSE-family hypernetwork editor: the main job.

    python -m horse_dist.train [--config FILE] [method=malmen] [data.n_edits=64] [train.steps=20] ...

With no arguments it runs configs/default.yaml: SmolLM2-135M, the bundled zsRE slices, HORSE, one process,
MLflow in ./mlflow.db. Each run writes runs/<run_name>/{config.yaml, checkpoint.pt, results.json}.
"""

from __future__ import annotations

import sys

import torch

from horse_dist.cli import run_cli, setup_logging
from horse_dist.config import ConfigError, RunConfig, load_config, print_config, split_cli, with_changes
from horse_dist.dist.world import LocalWorld
from horse_dist.process import exit_on_sigterm
from horse_dist.training.checkpoint import LocalCheckpointStore, has_checkpoint
from horse_dist.training.loop import named_run, owned_run_dir, resumed_config, run_folder, run_tracked
from horse_dist.training.ray_trainer import run_ray


def run_local(cfg: RunConfig) -> dict[str, float]:
    """The training loop in this process, in its own run folder and MLflow run."""
    cfg = named_run(cfg)
    with owned_run_dir(cfg) as run_dir:
        store = LocalCheckpointStore(run_dir, keep=cfg.train.keep_checkpoints)
        return run_tracked(cfg, run_dir, LocalWorld(), store)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the job; errors propagate (run_cli turns user errors into one line and exit code 2)."""
    setup_logging()
    exit_on_sigterm()
    cli = split_cli(sys.argv[1:] if argv is None else argv)
    cfg = load_config(cli.config_file, cli.overrides)
    if cfg.train.resume_if_exists and not cfg.train.resume:
        if not cfg.train.run_name:
            raise ConfigError("train.resume_if_exists=true needs train.run_name (the run folder to continue)")
        cfg = with_changes(cfg, {"train.resume": has_checkpoint(run_folder(cfg))})
    if cfg.train.resume:
        cfg = resumed_config(cfg, cli.overrides)
    if cli.show_config:
        return print_config(cfg, "train")
    torch.manual_seed(cfg.train.seed)
    if cfg.dist.backend == "ray":
        return run_ray(cfg)
    if cfg.dist.num_workers != 1:
        raise ConfigError(f"dist.num_workers={cfg.dist.num_workers} needs dist.backend=ray")
    return run_local(cfg)


if __name__ == "__main__":
    run_cli(main)
