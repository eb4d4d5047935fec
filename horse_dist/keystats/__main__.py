"""python -m horse_dist.keystats [--config FILE] [model=preset] [model.key=value] [keystats.key=value ...]

Computes (or reuses) the key statistics of model.source's edit modules (model.edit_modules, else the last
model.n_edit_layers layers) and prints the provenance as JSON.
"""

from __future__ import annotations

import json

import torch

from horse_dist.cli import job_config, run_cli
from horse_dist.config import print_config
from horse_dist.keystats.job import report_dict, run_job


def main(argv: list[str] | None = None) -> dict:
    cli, cfg = job_config(argv)
    if cli.show_config:
        return print_config(cfg, "keystats")
    torch.set_num_threads(max(1, int(cfg.keystats.cpus_per_worker)))
    stats, prov, report = run_job(cfg, cfg.model.source, cfg.model.edit_modules)
    summary = {"report": report_dict(report), "provenance": prov}
    print(json.dumps(summary, indent=2))  # noqa: T201
    return summary


if __name__ == "__main__":
    run_cli(main)
