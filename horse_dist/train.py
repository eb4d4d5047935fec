"""Meta-train a HORSE-family hypernetwork editor: the main job.

    python -m horse_dist.train [--config FILE] [method=malmen] [data.n_edits=64] [train.steps=20] ...

With no arguments it runs configs/default.yaml: SmolLM2-135M, the bundled zsRE slices, HORSE, one process,
MLflow in ./mlflow.db. Each run writes runs/<run_name>/{config.yaml, checkpoint.pt, results.json}.
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from horse_dist.build import build_engine, load_data, resolve_path
from horse_dist.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointStore,
    LocalCheckpointStore,
    checkpoint_state,
    set_rng_state,
)
from horse_dist.config import ConfigError, RunConfig, flatten, load_config, split_cli, to_yaml
from horse_dist.data import meta_batch_indices, shard_slice
from horse_dist.dist.world import LocalWorld
from horse_dist.evaluate import evaluate_pool, format_table, full_evaluation, live_eval_for
from horse_dist.signals import exit_on_sigterm
from horse_dist.tracking import (
    Tracker,
    experiment_name,
    make_tracker,
    registered_model_name,
    run_tags,
)

log = logging.getLogger("horse_dist.train")

SUMMED = ("gen_loss", "loc_loss", "train_gs", "train_ls", "cache_loss")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def default_run_name(cfg: RunConfig) -> str:
    model = Path(cfg.model.source.rstrip("/")).name.replace(".gguf", "")
    return f"{cfg.method.name}-{model}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(cfg: RunConfig) -> Path:
    if cfg.train.resume and not cfg.train.run_name:
        raise ConfigError("train.resume=true needs train.run_name (the run folder to resume)")
    cfg.train.run_name = cfg.train.run_name or default_run_name(cfg)
    run_dir = resolve_path(cfg.train.out_dir) / cfg.train.run_name
    if run_dir.exists() and not cfg.train.resume and (run_dir / CHECKPOINT_NAME).exists():
        raise ConfigError(
            f"{run_dir} already holds a run; choose another train.run_name or set train.resume=true"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def reduce_step_metrics(raw: dict[str, float], world: LocalWorld) -> dict[str, float]:
    """Per-edit means over all workers of the summed metrics; timings are this worker's."""
    keys = [f"{k}_sum" for k in SUMMED] + ["edits", "tokens"]
    totals = world.all_reduce_sum(torch.tensor([raw[k] for k in keys], dtype=torch.float64))
    total = dict(zip(keys, totals.tolist()))
    metrics = {k: total[f"{k}_sum"] / total["edits"] for k in SUMMED}
    metrics["tokens"] = total["tokens"]
    metrics["grad_norm"] = raw["grad_norm"]
    metrics.update({k: v for k, v in raw.items() if k.startswith("time/")})
    return metrics


def gather_worker_metrics(values: dict[str, float], world: LocalWorld) -> dict[str, float]:
    """`key/w<rank>` for every worker's value of each key (same keys on every worker); {} in one process."""
    if world.size == 1:
        return {}
    keys = sorted(values)
    table = torch.zeros(world.size, len(keys), dtype=torch.float64)
    table[world.rank] = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    world.all_reduce_sum(table)
    return {f"{k}/w{r}": float(table[r, i]) for r in range(world.size) for i, k in enumerate(keys)}


def train_worker(
    cfg: RunConfig, run_dir: Path, world: LocalWorld, tracker: Tracker, store: CheckpointStore
) -> dict[str, float]:
    """The loop every worker runs; rank 0 alone logs and prints, the store decides who writes."""
    rank0 = world.rank == 0
    engine, tokenizer = build_engine(cfg, world)
    pools = load_data(cfg, tokenizer)
    optimizer = engine.make_optimizer()
    start_step = 0
    state = store.load_latest() if cfg.train.resume else None
    if state is not None:
        engine.bank.load_state_dict(state["hypernet"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        log.info("resumed at step %d", start_step)

    n_pool = len(pools.train.edit)
    step_times: list[float] = []
    phase_times: dict[str, list[float]] = {}
    progress = tqdm(range(start_step, cfg.train.steps), desc="meta-train", disable=not rank0)
    for step in progress:
        indices = meta_batch_indices(n_pool, cfg.data.n_edits, cfg.train.seed, step)
        batches = engine.batches_for(pools.train, shard_slice(indices, world.rank, world.size))
        world.bytes_moved.clear()
        started = time.perf_counter()
        raw = engine.meta_step(batches, optimizer)
        seconds = time.perf_counter() - started
        moved = dict(world.bytes_moved)  # the meta-step's collectives, not the metric reductions below
        metrics = reduce_step_metrics(raw, world)
        metrics.update(
            step_seconds=seconds, edits_per_s=cfg.data.n_edits / seconds, peak_rss_gb=peak_rss_gb()
        )
        metrics.update({f"comm_bytes/{k}": float(v) for k, v in moved.items()})
        per_worker = {k: v for k, v in raw.items() if k.startswith("time/")}
        per_worker.update(step_seconds=seconds, peak_rss_gb=metrics["peak_rss_gb"])
        metrics.update(gather_worker_metrics(per_worker, world))
        for layer, name in enumerate(engine.module_names):
            metrics[f"eta/{name}"] = engine.bank.eta(layer)
            metrics[f"lambda/{name}"] = float(engine.bank.log_lambda(layer).exp())
        if torch.cuda.is_available():
            metrics["peak_device_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if engine.block_cache is not None:  # this worker's (rank 0's in the log)
            metrics["block_cache/megabytes"] = engine.block_cache.bytes / 2**20
            metrics["block_cache/hit_rate"] = engine.block_cache.hit_rate
        step_times.append(seconds)
        for key, value in metrics.items():
            if key.startswith("time/"):
                phase_times.setdefault(key, []).append(value)
        if rank0:
            tracker.log_metrics(metrics, step + 1)
            progress.set_postfix(
                gen=f"{metrics['gen_loss']:.3f}", loc=f"{metrics['loc_loss']:.3f}", s=f"{seconds:.1f}"
            )
            log.info(
                "step %d/%d  gen %.4f  loc %.4f  GS %.3f  LS %.3f  |g| %.3g  %.2fs  %s",
                step + 1,
                cfg.train.steps,
                metrics["gen_loss"],
                metrics["loc_loss"],
                metrics["train_gs"],
                metrics["train_ls"],
                metrics["grad_norm"],
                seconds,
                " ".join(f"{k[5:]}={v:.2f}" for k, v in metrics.items() if k.startswith("time/")),
            )
        last = step + 1 == cfg.train.steps
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and not last:
            result = evaluate_pool(
                engine,
                pools.eval,
                cfg.train.eval_n_edits,
                cfg.train.eval_batches,
                cfg.train.seed,
                rank0,
                live_eval_for(cfg, tokenizer),
            )
            if rank0:
                tracker.log_metrics({f"eval/{k}": v for k, v in result.items()}, step + 1)
                log.info("validation at step %d\n%s", step + 1, format_table(result))
        if (cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0) or last:
            state = checkpoint_state(
                hypernet=engine.bank,
                optimizer=optimizer,
                step=step + 1,
                config_yaml=to_yaml(cfg),
                edit_modules=engine.module_names,
            )
            store.save(state, metrics)

    result = full_evaluation(cfg, engine, pools.eval, tokenizer, cfg.train.eval_n_edits, rank0)
    if step_times:
        result["median_step_seconds"] = statistics.median(step_times)
        result.update({f"median_{k}": statistics.median(v) for k, v in phase_times.items()})
    result["peak_rss_gb"] = peak_rss_gb()
    result.update(gather_worker_metrics({"peak_rss_gb": result["peak_rss_gb"]}, world))
    if rank0:
        tracker.log_metrics({f"eval/{k}": v for k, v in result.items()}, cfg.train.steps)
        (run_dir / "results.json").write_text(json.dumps(result, indent=2))
        tracker.log_artifact(run_dir / "results.json")
        if cfg.tracking.register_model and (run_dir / CHECKPOINT_NAME).exists():
            tracker.register_model(
                run_dir / CHECKPOINT_NAME, registered_model_name(cfg.model.source, cfg.method.name)
            )
        print(f"\n{cfg.method.name} on {cfg.model.source}, {result['n_edits']:.0f} edits per batch:")  # noqa: T201
        print(format_table(result))  # noqa: T201
        if step_times:
            phases = "  ".join(
                f"{k[12:]} {v:.2f}s"
                for k, v in result.items()
                if k.startswith("median_time/") and "/w" not in k[12:]
            )
            print(f"median meta-step {result['median_step_seconds']:.2f}s: {phases}")  # noqa: T201
        print(f"run folder: {run_dir}")  # noqa: T201
    return result


def run_local(cfg: RunConfig) -> dict[str, float]:
    run_dir = prepare_run_dir(cfg)
    tracker = make_tracker(
        cfg.tracking.enabled,
        cfg.tracking.uri,
        experiment_name(cfg),
        cfg.train.run_name,
        run_tags(cfg, world_size=1),
        cfg.tracking,
        parent_run_id=cfg.tracking.parent_run_id or None,
    )
    tracker.log_params(flatten(cfg))
    tracker.log_artifact(run_dir / "config.yaml")
    try:
        result = train_worker(cfg, run_dir, LocalWorld(), tracker, LocalCheckpointStore(run_dir))
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exit_on_sigterm()
    config_file, overrides = split_cli(sys.argv[1:] if argv is None else argv)
    cfg = load_config(config_file, overrides)
    torch.manual_seed(cfg.train.seed)
    if cfg.dist.backend == "ray":
        from horse_dist.dist.ray_launch import run_ray

        return run_ray(cfg)
    if cfg.dist.num_workers != 1:
        raise ConfigError(f"dist.num_workers={cfg.dist.num_workers} needs dist.backend=ray")
    return run_local(cfg)


if __name__ == "__main__":
    main()
