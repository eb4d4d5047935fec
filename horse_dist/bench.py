"""Benchmark: where every second of a meta-step and of an edit call goes, against the FLOP floor.

    python -m horse_dist.bench [--config FILE] [bench.steps=3] [bench.edit_sizes=[100,8000]] [key=value ...]

Builds the engine exactly as training does, runs `bench.warmup_steps` + `bench.steps` meta-steps, then edit
calls of `bench.edit_sizes` and `data.n_edits` facts (cache + predict + solve + apply into the weights, undone
after each call), probes the dense matmul rate of the device before and after (the floor uses the faster),
and writes a JSON report to `bench.out` and a table to stdout. Per phase: median seconds, FLOPs
(horse_dist/perf/flops.py), floor = FLOPs / probed rate, and the achieved fraction = Σ floor / Σ measured over
the timed runs. Imports only torch, transformers,
omegaconf, tqdm and numpy-level packages (no tracking, Ray or DeepSpeed), so it runs on a bare GPU box.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from horse_dist.cli import job_config, run_cli
from horse_dist.config import ConfigError, RunConfig, flatten, print_config
from horse_dist.data import TokenBatch, TokenizedExample, meta_batch_indices
from horse_dist.editor.solve import choose_form
from horse_dist.lm.export import apply_shifts_
from horse_dist.lm.registry import ARCHITECTURES, layer_index
from horse_dist.lm.shapes import LMShape
from horse_dist.perf.flops import (
    EDIT_PHASES,
    PHASES,
    BatchShape,
    EditorShape,
    edit_flops,
    floor_seconds,
    meta_step_flops,
    phase_total,
)
from horse_dist.tracking.mlflow_run import peak_rss_gb
from horse_dist.training.assembly import build_engine, load_data, model_positions
from horse_dist.training.checkpoint import atomic_write_text
from horse_dist.training.engine import EditBatches, EditEngine
from horse_dist.training.hypernet_bank import PhaseTimer, synced_clock

log = logging.getLogger("horse_dist.bench")

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


# ---- shapes --------------------------------------------------------------------------------------------
def lm_shape_of(model: torch.nn.Module) -> LMShape:
    """The FLOP-relevant shapes from an HF config (Llama family exact; other families: gated_mlp off)."""
    config = model.config
    hidden, n_heads = int(config.hidden_size), int(config.num_attention_heads)
    spec = ARCHITECTURES.get(getattr(config, "model_type", None))
    gated = spec is not None and spec.edit_module == "mlp.down_proj"
    intermediate = (
        getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    )
    return LMShape(
        vocab=int(config.vocab_size),
        hidden=hidden,
        n_layers=int(config.num_hidden_layers),
        intermediate=int(intermediate),
        n_heads=n_heads,
        n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden // n_heads),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        gated_mlp=gated,
    )


def editor_shape(engine: EditEngine) -> EditorShape:
    method = engine.cfg.method
    return EditorShape(
        edited_layers=[layer_index(name) for name in engine.module_names],
        edited_shapes=list(engine.shapes),
        rank=method.rank,
        n_blocks=method.n_blocks,
        spread=method.spread,
        learn_lambda=method.learn_lambda,
        n_trainable=sum(p.numel() for p in engine.bank.parameters() if p.requires_grad),
        chunk_rows=method.chunk_rows,
    )


def batch_shapes(batches: list[TokenBatch]) -> list[BatchShape]:
    return [BatchShape(b.input_ids.shape[0], b.input_ids.shape[1], b.num_answer_tokens) for b in batches]


def useful_shapes(batches: list[TokenBatch]) -> list[BatchShape]:
    """Every sequence at its own unpadded length (less a prefix shared with an earlier one in its row): the
    floor counts the work the edits need, so padding (which large micro-batches add) shows up as a lower
    achieved fraction rather than as extra floor."""
    return [BatchShape(1, int(n), int(a)) for b in batches for n, a in b.sequence_shapes()]


def token_counts(batches: list[TokenBatch]) -> dict[str, int]:
    shapes = batch_shapes(batches)
    sequences = [positions for b in batches for _, positions, _ in b.sequence_positions()]
    tokens = int(sum(int(b.attention_mask.sum()) for b in batches))
    return {
        "micro_batches": len(shapes),
        "rows": sum(s.rows for s in shapes),
        "sequences": len(sequences),
        "padded_tokens": sum(s.padded_tokens for s in shapes),
        "tokens": tokens,
        "shared_prefix_tokens": sum(map(len, sequences)) - tokens,  # computed once, not once per sequence
        "answers": sum(s.answers for s in shapes),
    }


def solve_forms(engine: EditEngine, n_rows: int) -> list[str]:
    # One process: the pipeline's choice is choose_form (hypernet_bank._solve_form forces primal only for W > 1).
    return [choose_form(n_rows, d_in, engine.cfg.method.solve_form) for d_in, _ in engine.shapes]


# ---- probe and memory ----------------------------------------------------------------------------------
def matmul_rate(dtype: torch.dtype, device: torch.device, sizes: list[int], repeats: int) -> float:
    """Median FLOP/s of square (n, n) @ (n, n) matmuls in `dtype` on `device` (one untimed call per size)."""
    rates = []
    generator = torch.Generator(device="cpu").manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
        a @ b
        for _ in range(repeats):
            start = synced_clock()
            a @ b
            rates.append(2.0 * n**3 / (synced_clock() - start))
    return statistics.median(rates)


def peak_device_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_device_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---- meta-steps ----------------------------------------------------------------------------------------
def step_indices(n_pool: int, n_edits: int, seed: int, step: int) -> list[int]:
    """The training schedule's meta-batch; above the pool size, a seeded permutation cycled (with repeats)."""
    if n_edits <= n_pool:
        return meta_batch_indices(n_pool, n_edits, seed, step)
    order = list(range(n_pool))
    random.Random(f"bench:{seed}:{step}").shuffle(order)
    return [order[i % n_pool] for i in range(n_edits)]


def floor_summary(
    seconds: list[dict[str, float]],
    flops: list[dict[str, dict[str, float]]],
    walls: list[float],
    rates: dict[str, float],
    phases: tuple[str, ...],
) -> dict:
    """Over the timed runs: per phase median seconds and FLOPs, floor seconds and the fraction
    Σ floor / Σ measured; the same for the whole run against its wall time."""
    rows = {}
    for phase in phases:
        measured = [run.get(phase, 0.0) for run in seconds]
        floors = [floor_seconds(run[phase], rates) for run in flops]
        rows[phase] = {
            "seconds": statistics.median(measured),
            "flops": statistics.median(phase_total(run[phase]) for run in flops),
            "floor_seconds": statistics.median(floors),
            "fraction": sum(floors) / sum(measured) if sum(measured) > 0 else 0.0,
        }
    floors = [sum(floor_seconds(parts, rates) for parts in run.values()) for run in flops]
    return {
        "phases": rows,
        "flops": statistics.median(sum(phase_total(p) for p in run.values()) for run in flops),
        "floor_seconds": statistics.median(floors),
        "fraction": sum(floors) / sum(walls),
    }


def add_floor(result: dict, rates: dict[str, float], phases: tuple[str, ...]) -> dict:
    """Replace the raw per-run records of a bench result by its floor summary (rates known only at the end)."""
    raw = result.pop("_runs")
    return {**result, **floor_summary(raw["seconds"], raw["flops"], raw["walls"], rates, phases)}


def bench_meta_steps(
    engine: EditEngine, pool, cfg: RunConfig, shape: LMShape, block_cache: str = "off"
) -> dict:
    """Timed meta-steps; the result keeps its raw runs under "_runs" for `add_floor`. `block_cache` says
    what the engine's block-input cache holds for these meta-batches (flops.meta_step_flops)."""
    bench, data = cfg.bench, cfg.data
    optimizer = engine.make_optimizer()
    editor = editor_shape(engine)
    model_dtype = DTYPE_NAMES[next(engine.model.parameters()).dtype]
    walls: list[float] = []
    seconds: list[dict[str, float]] = []
    flops: list[dict[str, dict[str, float]]] = []
    comm: list[int] = []
    tokens: dict[str, dict[str, int]] = {}
    reset_device_peak(engine.device)
    total = bench.warmup_steps + bench.steps
    for step in tqdm(range(total), desc="bench meta-steps"):
        indices = step_indices(len(pool.edit), data.n_edits, cfg.train.seed, step)
        batches = engine.batches_for(pool, indices)
        engine.world.bytes_moved.clear()
        start = synced_clock()
        raw = engine.meta_step(batches, optimizer)
        wall = synced_clock() - start
        phases = {phase: raw.get(f"time/{phase}", 0.0) for phase in PHASES}
        log.info(
            "step %d/%d%s %.3fs: %s",
            step + 1,
            total,
            " (warm-up)" if step < bench.warmup_steps else "",
            wall,
            " ".join(f"{k}={v:.3f}" for k, v in phases.items()),
        )
        if step < bench.warmup_steps:
            continue
        n_rows = int(raw["tokens"])
        shapes = {kind: useful_shapes(getattr(batches, kind)) for kind in ("edit", "equiv", "unrel")}
        step_flops = meta_step_flops(
            shape,
            editor,
            shapes["edit"],
            shapes["equiv"],
            shapes["unrel"],
            solve_forms(engine, n_rows),
            model_dtype,
            cfg.method.solve_dtype,
            cfg.method.locality,
            block_cache,
        )
        walls.append(wall)
        seconds.append(phases)
        flops.append(step_flops)
        comm.append(int(sum(engine.world.bytes_moved.values())))
        tokens = {kind: token_counts(getattr(batches, kind)) for kind in ("edit", "equiv", "unrel")}
        tokens["edit"]["key_rows"] = n_rows
    others = [wall - sum(run.values()) for wall, run in zip(walls, seconds)]
    return {
        "warmup_steps": bench.warmup_steps,
        "steps": bench.steps,
        "n_edits": data.n_edits,
        "records_cycled": data.n_edits > len(pool.edit),
        "wall_seconds": statistics.median(walls),
        "wall_seconds_all": walls,
        "phase_sum_seconds": statistics.median(sum(run.values()) for run in seconds),
        "phase_sum_seconds_all": [sum(run.values()) for run in seconds],
        "other_seconds": statistics.median(others),
        "edits_per_s": data.n_edits / statistics.median(walls),
        "comm_bytes": statistics.median(comm),
        "solve_forms": solve_forms(engine, tokens["edit"]["key_rows"]),
        "tokens_last_step": tokens,
        "peak_device_gb": peak_device_gb(engine.device),
        "_runs": {"seconds": seconds, "flops": flops, "walls": walls},
    }


# ---- edit calls ----------------------------------------------------------------------------------------
def edit_examples(examples: list[TokenizedExample], n: int) -> list[TokenizedExample]:
    """n edit prompts; a pool smaller than n is cycled (repeated facts cost the same as new ones)."""
    if not examples:
        raise ValueError("no edit examples in the data pools")
    return [examples[i % len(examples)] for i in range(n)]


def timed_edit(
    engine: EditEngine, examples: list[TokenizedExample]
) -> tuple[dict[str, float], list[TokenBatch], int]:
    """One edit call: batching + cache pass, predict (hypernet, spread, solve), W += Sᵀ; the weights are
    restored afterwards (untimed) so every call edits the unedited model."""
    model, names = engine.model, engine.module_names
    saved = [model.get_submodule(name).weight.detach().clone() for name in names]
    start = synced_clock()
    batches = engine.micro_batches(examples)
    cache = engine.cache(EditBatches(batches, [], [], len(examples)))
    cached = synced_clock()
    timer = PhaseTimer()
    shifts = engine.predict(cache, learn_statistics=False, timer=timer).shifts
    predicted = synced_clock()
    apply_shifts_(model, dict(zip(names, shifts)))
    applied = synced_clock()
    with torch.no_grad():
        for name, weight in zip(names, saved):
            model.get_submodule(name).weight.copy_(weight)
    seconds = {
        "seconds": applied - start,
        "cache": cached - start,
        "predict": predicted - cached,
        "apply": applied - predicted,
        **{phase: timer.seconds.get(phase, 0.0) for phase in ("hypernet_forward", "spread", "solve")},
    }
    return seconds, batches, int(cache.keys[0].shape[0])


def bench_edits(
    engine: EditEngine, examples: list[TokenizedExample], cfg: RunConfig, shape: LMShape
) -> list[dict]:
    """Timed edit calls per size; each result keeps its raw runs under "_runs" for `add_floor`."""
    bench = cfg.bench
    sizes = sorted(set(bench.edit_sizes) | {cfg.data.n_edits})
    editor = editor_shape(engine)
    model_dtype = DTYPE_NAMES[next(engine.model.parameters()).dtype]
    timed_edit(engine, edit_examples(examples, sizes[0]))  # warm-up
    results = []
    for n in sizes:
        reset_device_peak(engine.device)
        facts = edit_examples(examples, n)
        runs, flops = [], []
        for _ in range(bench.edit_repeats):
            seconds, batches, n_rows = timed_edit(engine, facts)
            forms = solve_forms(engine, n_rows)
            runs.append(seconds)
            flops.append(
                edit_flops(shape, editor, useful_shapes(batches), forms, model_dtype, cfg.method.solve_dtype)
            )
        median = statistics.median(run["seconds"] for run in runs)
        result = {
            "n_facts": n,
            "records_cycled": n > len(examples),
            "seconds": median,
            "seconds_all": [run["seconds"] for run in runs],
            "predict_seconds": statistics.median(run["predict"] for run in runs),
            "edits_per_s": n / median,
            "key_rows": n_rows,
            "solve_forms": forms,
            "peak_device_gb": peak_device_gb(engine.device),
            "_runs": {"seconds": runs, "flops": flops, "walls": [run["seconds"] for run in runs]},
        }
        log.info("edit %d facts: %.3fs (%.1f edits/s)", n, median, n / median)
        results.append(result)
    return results


# ---- report --------------------------------------------------------------------------------------------
def needed_dtypes(cfg: RunConfig) -> list[str]:
    return sorted({cfg.model.dtype, "float32", cfg.method.solve_dtype})


def probe(device: torch.device, cfg: RunConfig) -> dict[str, float]:
    bench = cfg.bench
    rates = {
        name: matmul_rate(TORCH_DTYPES[name], device, bench.probe_sizes, bench.probe_repeats)
        for name in needed_dtypes(cfg)
    }
    log.info("matmul rate: %s", ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items()))
    return rates


def run_bench(cfg: RunConfig) -> dict:
    bench = cfg.bench
    if bench.steps < 1 or bench.warmup_steps < 0 or bench.edit_repeats < 1:
        raise ConfigError("bench.steps and bench.edit_repeats must be >= 1, bench.warmup_steps >= 0")
    if cfg.dist.backend != "local" or cfg.dist.num_workers != 1:
        raise ConfigError("the bench runs one local process: set dist.backend=local dist.num_workers=1")
    if any(n < 1 for n in bench.edit_sizes):
        raise ConfigError(f"bench.edit_sizes must be positive, got {bench.edit_sizes}")
    if bench.threads:
        torch.set_num_threads(bench.threads)
    torch.manual_seed(cfg.train.seed)
    loaded = time.perf_counter()
    engine, tokenizer = build_engine(cfg)
    pools = load_data(cfg, tokenizer, model_positions(engine.model))
    load_seconds = time.perf_counter() - loaded
    shape = lm_shape_of(engine.model)
    before = probe(engine.device, cfg)
    cached = engine.block_cache is not None
    meta = bench_meta_steps(engine, pools.train, cfg, shape, "first_visit" if cached else "off")
    # The same meta-batches again: a training run's later epochs, whose passes start at the lowest edited block.
    revisit = bench_meta_steps(engine, pools.train, cfg, shape, "revisit") if cached else None
    edits = bench_edits(engine, pools.train.edit + pools.eval.edit, cfg, shape)
    after = probe(engine.device, cfg)
    # The floor takes the faster of two probes: on a shared machine one of them may have been crowded out.
    rates = {name: max(before[name], after[name]) for name in before}
    meta = add_floor(meta, rates, PHASES)
    if revisit is not None:
        revisit = add_floor(revisit, rates, PHASES)
    edits = [add_floor(result, rates, EDIT_PHASES) for result in edits]
    device = engine.device
    return {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch_threads": torch.get_num_threads(),
        "load_seconds": load_seconds,
        "model": {
            "source": cfg.model.source,
            "dtype": cfg.model.dtype,
            "shape": shape.as_dict(),
            "n_params_formula": shape.n_params(),
            "n_params": sum(p.numel() for p in engine.model.parameters()),
            "edit_modules": engine.module_names,
            "edit_shapes": [list(s) for s in engine.shapes],
        },
        "probe": {
            "flops_per_second": rates,
            "before": before,
            "after": after,
            "sizes": bench.probe_sizes,
            "repeats": bench.probe_repeats,
        },
        "meta_step": meta,
        "meta_step_revisit": revisit,
        "block_cache": None
        if not cached
        else {
            "first_block": engine.block_cache.block,
            "entries": len(engine.block_cache),
            "megabytes": engine.block_cache.bytes / 2**20,
            "hits": engine.block_cache.hits,
            "misses": engine.block_cache.misses,
        },
        "packing": engine.packing,
        "edits": edits,
        "memory": {"peak_rss_gb": peak_rss_gb(), "peak_device_gb": peak_device_gb(device)},
        "config": flatten(cfg, "bench"),
    }


def _phase_table(meta: dict, title: str) -> list[str]:
    wall = meta["wall_seconds"]
    lines = [
        f"{title}, {meta['n_edits']} edits per meta-step, median of {meta['steps']} steps",
        f"{'phase':<18}{'seconds':>9}{'share':>8}{'GFLOP':>11}{'floor s':>10}{'fraction':>10}",
    ]
    for phase, row in meta["phases"].items():
        lines.append(
            f"{phase:<18}{row['seconds']:>9.3f}{row['seconds'] / wall:>8.1%}{row['flops'] / 1e9:>11.2f}"
            f"{row['floor_seconds']:>10.3f}{row['fraction']:>10.1%}"
        )
    lines.append(f"{'other':<18}{meta['other_seconds']:>9.3f}{meta['other_seconds'] / wall:>8.1%}")
    lines.append(
        f"{'step (wall)':<18}{wall:>9.3f}{1:>8.0%}{meta['flops'] / 1e9:>11.2f}"
        f"{meta['floor_seconds']:>10.3f}{meta['fraction']:>10.1%}"
    )
    return lines


def format_report(report: dict) -> str:
    source = f"{report['model']['source']} ({report['model']['dtype']}) on {report['device']}"
    lines = _phase_table(report["meta_step"], f"{source}: first visit of each meta-batch")
    if report.get("meta_step_revisit"):
        cache = report["block_cache"]
        title = (
            f"\nrevisits (later epochs): passes start at block {cache['first_block']} from the block-input "
            f"cache ({cache['entries']} prompts, {cache['megabytes']:.1f} MiB)"
        )
        lines += _phase_table(report["meta_step_revisit"], title)
    lines.append(
        f"\n{'edit facts':<12}{'seconds':>9}{'cache':>9}{'predict':>9}{'apply':>9}{'edits/s':>10}{'fraction':>10}"
    )
    for row in report["edits"]:
        phases = row["phases"]
        lines.append(
            f"{row['n_facts']:<12}{row['seconds']:>9.3f}{phases['cache']['seconds']:>9.3f}"
            f"{row['predict_seconds']:>9.3f}{phases['apply']['seconds']:>9.3f}{row['edits_per_s']:>10.1f}"
            f"{row['fraction']:>10.1%}" + (" (records cycled)" if row["records_cycled"] else "")
        )
    rates = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in report["probe"]["flops_per_second"].items())
    memory = report["memory"]
    device_gb = "" if memory["peak_device_gb"] is None else f", device {memory['peak_device_gb']:.2f} GiB"
    lines.append(f"\nmatmul probe (GFLOP/s): {rates}; peak RSS {memory['peak_rss_gb']:.2f} GiB{device_gb}")
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> Path:
    """Atomically (temp file + rename), so a reader never sees half a report."""
    return atomic_write_text(json.dumps(report, indent=2), path)


def publish(report: dict, cfg: RunConfig, table: str) -> dict:
    """Both bench jobs' ending: the JSON report to bench.out, the table and the report's path to stdout."""
    out = write_json(report, Path(cfg.bench.out).expanduser())
    print(f"{table}\nreport: {out}")  # noqa: T201
    return report


def main(argv: list[str] | None = None) -> dict:
    cli, cfg = job_config(argv)
    if cli.show_config:
        return print_config(cfg, "bench")
    report = run_bench(cfg)
    return publish(report, cfg, format_report(report))


if __name__ == "__main__":
    run_cli(main)
