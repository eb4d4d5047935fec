"""Side-by-side A/B of run configs: one engine per variant in one process, meta-steps and edit calls
interleaved round by round, so that a shared machine's drifting speed hits every variant alike.

    python -m horse_dist.bench_ab --variant data.packing=padded --variant data.packing=packed [key=value ...]

Each `--variant` is a comma-separated list of overrides applied on top of the common ones (an empty
variant is the baseline as configured). Round r (0: an untimed warm-up) runs meta-batch r on every
variant, alternating the order, each followed by one edit call of `bench.edit_sizes[0]` facts; the
meta-batches are first visits (the block-input cache has not seen them) while rounds stay within an epoch. Prints per
variant the median meta-step and edit seconds and the median of the per-round ratios to the first variant;
`bench.steps` is the number of rounds. Results go to `bench.out` as JSON.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time

import torch

from horse_dist.bench import edit_examples, publish, step_indices, timed_edit
from horse_dist.cli import run_cli, setup_logging
from horse_dist.config import ConfigError, load_config, print_config, split_cli
from horse_dist.training.assembly import build_engine, load_data, model_positions

log = logging.getLogger("horse_dist.bench_ab")


def parse_variants(argv: list[str]) -> tuple[list[list[str]], list[str]]:
    """`--variant a=1,b=2 --variant a=3 rest...` -> ([[a=1, b=2], [a=3]], rest)."""
    variants, rest = [], []
    args = iter(argv)
    for arg in args:
        if arg == "--variant":
            value = next(args, None)
        elif arg.startswith("--variant="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
            continue
        if value is None:
            raise ConfigError("--variant needs a value such as data.packing=padded")
        variants.append([item for item in value.split(",") if item])
    if len(variants) < 2:
        raise ConfigError("give at least two --variant options to compare")
    return variants, rest


def run_ab(variants: list[list[str]], config_file: str | None, common: list[str]) -> dict:
    engines = []
    for overrides in variants:
        cfg = load_config(config_file, [*common, *overrides])
        torch.manual_seed(cfg.train.seed)
        engine, tokenizer = build_engine(cfg)
        pools = load_data(cfg, tokenizer, model_positions(engine.model))
        engines.append((cfg, engine, pools, engine.make_optimizer()))
    cfg = engines[0][0]
    if cfg.bench.threads:
        torch.set_num_threads(cfg.bench.threads)
    n_facts = cfg.bench.edit_sizes[0] if cfg.bench.edit_sizes else cfg.data.n_edits
    names = [",".join(v) or "(baseline)" for v in variants]
    facts = [edit_examples(pools.train.edit + pools.eval.edit, n_facts) for _, _, pools, _ in engines]
    steps: list[list[float]] = [[] for _ in variants]
    edits: list[list[float]] = [[] for _ in variants]
    for round_ in range(cfg.bench.steps + 1):  # round 0: warm-up, untimed
        order = list(range(len(variants)))
        if round_ % 2:
            order.reverse()
        for v in order:
            vcfg, engine, pools, optimizer = engines[v]
            pool = pools.train
            batches = engine.batches_for(
                pool, step_indices(len(pool.edit), vcfg.data.n_edits, vcfg.train.seed, round_)
            )
            start = time.perf_counter()
            engine.meta_step(batches, optimizer)
            step_seconds = time.perf_counter() - start
            edit_seconds = timed_edit(engine, facts[v])[0]["seconds"]
            if round_:
                steps[v].append(step_seconds)
                edits[v].append(edit_seconds)
            log.info(
                "round %d %s: meta-step %.3fs, %d facts %.3fs",
                round_,
                names[v],
                step_seconds,
                n_facts,
                edit_seconds,
            )
    rows = []
    for v, name in enumerate(names):
        rows.append(
            {
                "variant": name,
                "meta_step_seconds": statistics.median(steps[v]),
                "edit_seconds": statistics.median(edits[v]),
                "meta_step_ratio": statistics.median(a / b for a, b in zip(steps[v], steps[0])),
                "edit_ratio": statistics.median(a / b for a, b in zip(edits[v], edits[0])),
                "meta_step_all": steps[v],
                "edit_all": edits[v],
            }
        )
    return {"rounds": cfg.bench.steps, "edit_facts": n_facts, "common": common, "variants": rows}


def format_ab(report: dict) -> str:
    width = max(len(row["variant"]) for row in report["variants"]) + 2
    facts = f"{report['edit_facts']} facts s"
    lines = [
        f"{report['rounds']} interleaved rounds; ratios: median of per-round ratios to the first variant",
        f"{'variant':<{width}}{'meta-step s':>12}{'ratio':>8}{facts:>12}{'ratio':>8}",
    ]
    for row in report["variants"]:
        lines.append(
            f"{row['variant']:<{width}}{row['meta_step_seconds']:>12.3f}{row['meta_step_ratio']:>8.3f}"
            f"{row['edit_seconds']:>12.3f}{row['edit_ratio']:>8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        split_cli(["--help"])  # prints this module's docstring (the --variant usage) and the keys; exits 0
    variants, rest = parse_variants(args)
    cli = split_cli(rest)
    cfg = load_config(cli.config_file, cli.overrides)
    if cli.show_config:
        return print_config(cfg, "bench_ab")
    report = run_ab(variants, cli.config_file, cli.overrides)
    return publish(report, cfg, format_ab(report))


if __name__ == "__main__":
    run_cli(main)
