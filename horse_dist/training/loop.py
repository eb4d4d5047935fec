"""The meta-training loop of one worker (`train_worker`): resume, validation and model selection, periodic
and final evaluation, checkpoints; and the run folder it owns. `python -m horse_dist.train` runs it in this
process, `training/ray_trainer.py` on every Ray Train worker."""

from __future__ import annotations

import json
import logging
import re
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from horse_dist.config import ConfigError, RunConfig, config_from_yaml, flatten, to_yaml, with_changes
from horse_dist.data import (
    TokenizedRecords,
    meta_batch_indices,
    partition,
    records_fingerprint,
    sequence_lengths,
    shard_slice,
    steps_per_epoch,
)
from horse_dist.dist.world import LocalWorld
from horse_dist.keystats.accumulate import KeyStats
from horse_dist.tracking.mlflow_run import (
    NullTracker,
    Tracker,
    experiment_name,
    make_tracker,
    peak_rss_gb,
    registered_model_name,
    run_tags,
)
from horse_dist.training.assembly import DataPools, build_engine, load_data, model_positions, output_dir
from horse_dist.training.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointStore,
    RunFolderError,
    RunFolderLock,
    atomic_torch_save,
    atomic_write_text,
    check_finite,
    checkpoint_state,
    has_checkpoint,
    load_run_checkpoint,
    remove_orphans,
    set_rng_state,
)
from horse_dist.training.engine import DivergedError, EditEngine
from horse_dist.training.evaluation import evaluate_pool, format_table, full_evaluation, live_eval_for
from horse_dist.training.selection import BEST_NAME, ModelSelection, hold_out_validation, validation_score

log = logging.getLogger(__name__)

SUMMED = ("gen_loss", "loc_loss", "train_gs", "train_ls", "cache_loss")


def default_run_name(cfg: RunConfig) -> str:
    model = Path(cfg.model.source.rstrip("/")).name.replace(".gguf", "")
    return f"{cfg.method.name}-{model}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


# Keys a resumed run may change freely: how long it runs, how it is evaluated, checkpointed, tracked and
# distributed. Any other change alters the result and needs train.resume_override=true.
RESUME_FREE_PREFIXES = ("tracking.", "dist.", "bench.", "keystats.", "locate.", "sequential.", "train.eval_")
RESUME_FREE = {
    "train.steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.resume",
    "train.resume_if_exists",
    "train.resume_override",
    "train.max_bad_steps",
    "train.out_dir",
    "train.run_name",
    "train.block_cache_gb",
    "model.device",
}
# Keys that fix the hypernetwork's shapes or its key prior (fitted once, at step 0): no override can resume
# across them.
RESUME_FIXED = {
    "model.source",
    "model.edit_modules",
    "model.n_edit_layers",
    "method.name",
    "method.rank",
    "method.n_blocks",
    "method.spread",
    "method.learn_lambda",
    "method.key_prior",
    "method.prior_keys",
    "method.prior_records",
    "method.prior_damping",
    "data.partitions",
}


def resume_changes(saved_yaml: str, cfg: RunConfig) -> dict[str, tuple[object, object]]:
    """`key -> (saved, new)` for every result-altering key a resumed run changes."""
    saved, new = flatten(config_from_yaml(saved_yaml, [])), flatten(cfg)
    return {
        key: (saved.get(key), value)
        for key, value in new.items()
        if saved.get(key) != value and key not in RESUME_FREE and not key.startswith(RESUME_FREE_PREFIXES)
    }


def run_folder(cfg: RunConfig) -> Path:
    return output_dir(cfg.train.out_dir) / cfg.train.run_name


def resumed_config(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A resume continues the run's saved config, with this command line's `key=value` overrides on top (so
    `train.run_name=X train.resume=true train.steps=40` resumes X as it was trained)."""
    if not cfg.train.run_name:
        raise ConfigError("train.resume=true needs train.run_name (the run folder to resume)")
    run_dir = run_folder(cfg)
    state = load_run_checkpoint(run_dir)
    if state is None:
        raise RunFolderError(
            f"{run_dir}: nothing to resume (no checkpoint); drop train.resume=true to start a new run there"
        )
    resumed = config_from_yaml(state["config"], overrides)
    here = {"train.out_dir": cfg.train.out_dir, "train.run_name": cfg.train.run_name, "train.resume": True}
    resumed = with_changes(resumed, here)
    check_resume(state["config"], resumed, run_dir)
    return resumed


def check_resume(saved_yaml: str, cfg: RunConfig, run_dir: Path) -> None:
    """The same result-altering config as the saved one, unless train.resume_override."""
    changes = resume_changes(saved_yaml, cfg)
    listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
    fixed = sorted(set(changes) & RESUME_FIXED)
    if fixed:
        raise ConfigError(f"{run_dir}: cannot resume with a different {', '.join(fixed)} ({listed})")
    if changes and not cfg.train.resume_override:
        raise ConfigError(
            f"{run_dir}: resuming with a changed config ({listed}); set train.resume_override=true to apply it"
        )
    if changes:
        log.warning("resuming %s with overridden config: %s", run_dir, listed)


def check_resumed_data(saved: str, current: str, cfg: RunConfig, run_dir: Path) -> None:
    """A resume draws its meta-batches as indices into the training pool: a changed pool (file edited or
    replaced, other records dropped) would silently change them. Refused unless train.resume_override."""
    if not saved or saved == current:  # checkpoints before data fingerprints carry none
        return
    problem = (
        f"{run_dir}: the training records differ from the ones this run was trained on "
        f"({cfg.data.train_path}: fingerprint {current[:12]}, checkpoint {saved[:12]})"
    )
    if not cfg.train.resume_override:
        raise ConfigError(f"{problem}; set train.resume_override=true to continue on the new records")
    log.warning("%s; continuing on the new records (train.resume_override)", problem)


def resolve_partitions(cfg: RunConfig, world: LocalWorld, state: dict | None) -> int:
    """The training pool's partition count: the config's, else the resumed run's (the meta-batches are a
    function of it; an explicit other count is refused by check_resume, data.partitions being in RESUME_FIXED;
    checkpoints from before partitions drew from one), else one per worker."""
    saved = int(state.get("data_partitions", 1)) if state is not None else 0
    parts = cfg.data.partitions or saved or world.size
    if parts != world.size:
        log.info(
            "%d data partition(s) on %d worker(s): records move between workers across epochs",
            parts,
            world.size,
        )
    return parts


def plan_block_cache(
    engine: EditEngine, pool: TokenizedRecords, records: list[int], epochs: float, evaluations: bool
) -> None:
    """Keep the block-input cache only where it will be hit: where this worker's training prompts come back
    (a run of more than one epoch) they must fit its budget, else it is turned off (a partial cache serves
    almost no micro-batch: one is served only when all its prompts are stored); a one-epoch run keeps it
    for its periodic evaluations (`evaluations`), which revisit their pool. The decision is logged."""
    cache = engine.block_cache
    if cache is None:
        return
    lengths = [np.asarray(sequence_lengths(view)) for view in (pool.edit, pool.equiv, pool.unrel)]
    tokens = int(sum(view[records].sum() for view in lengths))
    hidden = engine.model.config.hidden_size
    element = torch.empty((), dtype=engine.model.dtype).element_size()
    need_gib, budget = tokens * hidden * element / 2**30, cache.budget_bytes / 2**30
    need = f"this worker's {len(records)} training records need {need_gib:.2f} GiB of {budget:.2f}"
    if epochs <= 1 and evaluations:
        log.info("block-input cache on for the periodic evaluations (%.2f epochs: %s)", epochs, need)
    elif epochs <= 1:
        engine.block_cache = None
        log.info("block-input cache off: no prompt comes back in %.2f epochs (%s)", epochs, need)
    elif not cache.fits(tokens, hidden, element):
        engine.block_cache = None
        log.warning(
            "block-input cache off: %s (train.block_cache_gb); a cache of that size would hold %.2f of "
            "their prompts and serve almost no micro-batch",
            need,
            budget / need_gib,
        )
    else:
        log.info("block-input cache on: %s; projected hit rate from epoch 2: 1.0", need)


def named_run(cfg: RunConfig) -> RunConfig:
    """The config with its run name: train.run_name, or <method>-<model>-<data>-<time> when it is empty."""
    return with_changes(cfg, {"train.run_name": cfg.train.run_name or default_run_name(cfg)})


@contextmanager
def owned_run_dir(cfg: RunConfig) -> Iterator[Path]:
    """The run folder, locked for this run: a new run refuses a folder holding a checkpoint (a resume's config
    was checked by resumed_config); orphaned temporary files of an interrupted write are removed."""
    if not cfg.train.run_name:
        raise ValueError("owned_run_dir needs a named run: pass the config through named_run first")
    run_dir = run_folder(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunFolderLock(run_dir).acquire()
    try:
        if not cfg.train.resume and has_checkpoint(run_dir):
            raise RunFolderError(
                f"{run_dir} already holds a run; choose another train.run_name or set train.resume=true"
            )
        remove_orphans(run_dir)
        atomic_write_text(to_yaml(cfg), run_dir / "config.yaml")
        yield run_dir
    finally:
        lock.release()


def set_learning_rates(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> None:
    """The config's rates on a restored optimizer (equal unless a resume overrode them)."""
    blocks, scalars = optimizer.param_groups
    blocks["lr"] = cfg.train.meta_lr
    scalars["lr"] = cfg.train.scalar_lr or cfg.train.meta_lr


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


TRAIN_SCALARS = {
    "gen_loss",
    "loc_loss",
    "cache_loss",
    "train_gs",
    "train_ls",
    "grad_norm",
    "tokens",
    "skipped_steps",
}
PERF_SCALARS = {  # the step's own name -> its perf/ name
    "step_seconds": "step_s",
    "edits_per_s": "edits_per_s",
    "peak_rss_gb": "peak_rss_gb",
    "peak_device_gb": "peak_device_gb",
}
WORKER_SUFFIX = re.compile(r"(.*)/w(\d+)")  # gather_worker_metrics' per-worker copies


def step_metric_names(metrics: dict[str, float]) -> dict[str, float]:
    """The MLflow names of a meta-step's metrics: the optimisation under train/ (losses, train_gs -> train/gs,
    grad norm, eta/lambda per layer), time, throughput, memory, communication and the block cache under perf/
    with their unit in the name (time/cache/w1 -> perf/cache_s/w1)."""
    named = {}
    for key, value in metrics.items():
        match = WORKER_SUFFIX.fullmatch(key)
        base, suffix = (match[1], f"/w{match[2]}") if match else (key, "")
        if base in TRAIN_SCALARS:
            named[f"train/{base.removeprefix('train_')}{suffix}"] = value
        elif base.startswith(("eta/", "lambda/")):
            named[f"train/{key}"] = value
        elif base in PERF_SCALARS:
            named[f"perf/{PERF_SCALARS[base]}{suffix}"] = value
        elif base.startswith("time/"):
            named[f"perf/{base.removeprefix('time/')}_s{suffix}"] = value
        else:  # comm_bytes/*, block_cache/*
            named[f"perf/{key}"] = value
    return named


def final_metric_names(result: dict[str, float]) -> dict[str, float]:
    """The MLflow names of a run's final result: the scores under eval/, time and memory under perf/ with
    their unit in the name (median_time/cache/w1 -> perf/median_cache_s/w1)."""
    named = {}
    for key, value in result.items():
        if key.startswith("median_time/"):
            phase, _, worker = key.removeprefix("median_time/").partition("/")
            named[f"perf/median_{phase}_s" + (f"/{worker}" if worker else "")] = value
        elif key == "median_step_seconds":
            named["perf/median_step_s"] = value
        elif key.startswith("peak_rss_gb"):
            named[f"perf/{key}"] = value
        else:
            named[f"eval/{key}"] = value
    return named


def key_prior_stats(engine: EditEngine, cfg: RunConfig, pools: DataPools, tokenizer) -> dict[str, KeyStats]:
    """The key prior's moments over the first method.prior_records training records (never the evaluation
    pool): every token of their edit, rephrase and unrelated prompts, or their unrelated answers' keys."""
    n_records = cfg.method.prior_records
    if cfg.method.prior_keys == "unrelated_answers":
        return engine.answer_key_stats(pools.train.unrel[:n_records])
    records = pools.train_records[:n_records]
    texts = [text for r in records for text in (r.prompt, r.rephrase, r.loc_prompt)]
    return engine.prompt_key_stats(texts, tokenizer)


def validate_and_select(
    cfg: RunConfig,
    engine: EditEngine,
    val_pool: TokenizedRecords,
    tokenizer,
    selection: ModelSelection,
    step: int,
    tracker: Tracker,
    rank0: bool,
    run_dir: Path,
) -> None:
    """Score the editor on the validation split; a new best is kept (and written to <run>/best.pt)."""
    result = evaluate_pool(
        engine,
        val_pool,
        cfg.train.eval_n_edits,
        cfg.train.val_batches,
        cfg.train.seed,
        rank0,
        live_eval_for(cfg, tokenizer),
    )
    result["score"] = validation_score(result)
    improved = selection.offer(result["score"], step, engine.bank)
    if not rank0:
        return
    logged = {f"val/{k}": v for k, v in result.items()}
    tracker.log_metrics(logged, step)
    log.info(
        "validation at step %d: score %.4f%s\n%s",
        step,
        result["score"],
        " (best)" if improved else "",
        format_table(result),
    )
    if improved:
        best = checkpoint_state(
            hypernet=engine.bank,
            optimizer=None,
            step=step,
            config_yaml=to_yaml(cfg),
            edit_modules=engine.module_names,
        )
        check_finite(best, run_dir / BEST_NAME)
        atomic_torch_save({**best, "metrics": logged}, run_dir / BEST_NAME)


def train_worker(
    cfg: RunConfig, run_dir: Path, world: LocalWorld, tracker: Tracker, store: CheckpointStore
) -> dict[str, float]:
    """The loop every worker runs; rank 0 alone logs and prints, the store decides who writes."""
    rank0 = world.rank == 0
    engine, tokenizer = build_engine(cfg, world)
    pools = load_data(cfg, tokenizer, model_positions(engine.model))
    selection, val_pool = None, None
    if cfg.train.val_size:
        pools, val_pool = hold_out_validation(pools, cfg.train.val_size, cfg.train.seed)
        selection = ModelSelection()
        log.info("model selection on %d validation records held out of training", cfg.train.val_size)
    optimizer = engine.make_optimizer()
    start_step = 0
    state = store.load_latest() if cfg.train.resume else None
    fingerprint = records_fingerprint(pools.train_records)
    if state is not None:
        check_resumed_data(state.get("data_fingerprint", ""), fingerprint, cfg, run_dir)
        engine.bank.load_state_dict(state["hypernet"])
        if selection is not None and state.get("selection"):
            selection.load_state_dict(state["selection"])
        optimizer.load_state_dict(state["optimizer"])
        set_learning_rates(optimizer, cfg)
        set_rng_state(state["rng"])
        start_step = state["step"]
        log.info("resumed at step %d", start_step)

    if engine.bank.has_prior and state is None:
        engine.fit_key_prior(key_prior_stats(engine, cfg, pools, tokenizer))
    n_pool = len(pools.train.edit)
    parts = resolve_partitions(cfg, world, state)
    epoch_steps = steps_per_epoch(n_pool, cfg.data.n_edits, parts)
    mine = partition(n_pool, cfg.train.seed, parts, world.rank) if parts == world.size else range(n_pool)
    epochs = cfg.train.steps / epoch_steps
    plan_block_cache(engine, pools.train, list(mine), epochs, evaluations=cfg.train.eval_every > 0)
    step_times: list[float] = []
    phase_times: dict[str, list[float]] = {}
    skipped_total = skipped_in_row = 0
    progress = tqdm(range(start_step, cfg.train.steps), desc="meta-train", disable=not rank0)
    for step in progress:
        if engine.block_cache is not None and (step % epoch_steps == 0 or step == start_step):
            engine.block_cache.start_epoch()
        indices = meta_batch_indices(n_pool, cfg.data.n_edits, cfg.train.seed, step, parts)
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
        if cfg.train.block_cache_gb > 0:  # the same keys on every worker; 0 where a worker's cache is off
            cache = engine.block_cache
            per_worker["block_cache/epoch_hit_rate"] = cache.epoch_hit_rate if cache is not None else 0.0
        metrics.update(gather_worker_metrics(per_worker, world))
        for layer, name in enumerate(engine.module_names):
            metrics[f"eta/{name}"] = engine.bank.eta(layer)
            metrics[f"lambda/{name}"] = float(engine.bank.log_lambda(layer).exp())
        if torch.cuda.is_available():
            metrics["peak_device_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if engine.block_cache is not None:  # this worker's (rank 0's in the log)
            metrics["block_cache/megabytes"] = engine.block_cache.bytes / 2**20
            metrics["block_cache/hit_rate"] = engine.block_cache.hit_rate
            metrics["block_cache/epoch_hit_rate"] = engine.block_cache.epoch_hit_rate
        skipped_total += int(raw["skipped"])
        skipped_in_row = skipped_in_row + 1 if raw["skipped"] else 0
        metrics["skipped_steps"] = float(skipped_total)
        if skipped_in_row and rank0:
            log.warning(
                "step %d skipped: gradient norm %s (a non-finite loss, gradient or solve); %d in a row, %d in all",
                step + 1,
                metrics["grad_norm"],
                skipped_in_row,
                skipped_total,
            )
        if skipped_in_row >= cfg.train.max_bad_steps:
            raise DivergedError(
                f"{skipped_in_row} meta-steps in a row (up to step {step + 1}) had a non-finite loss or gradient; "
                f"the last good checkpoint in {run_dir} is kept. Lower train.meta_lr or check method.* inits"
            )
        step_times.append(seconds)
        for key, value in metrics.items():
            if key.startswith("time/"):
                phase_times.setdefault(key, []).append(value)
        if rank0:
            tracker.log_metrics(step_metric_names(metrics), step + 1)
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
        if selection is not None and ((step + 1) % cfg.train.eval_every == 0 or last):
            validate_and_select(
                cfg, engine, val_pool, tokenizer, selection, step + 1, tracker, rank0, run_dir
            )
        elif cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and not last:
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
                log.info("evaluation pool at step %d\n%s", step + 1, format_table(result))
        if (cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0) or last:
            state = checkpoint_state(
                hypernet=engine.bank,
                optimizer=optimizer,
                step=step + 1,
                config_yaml=to_yaml(cfg),
                edit_modules=engine.module_names,
                data_fingerprint=fingerprint,
            )
            state["data_partitions"] = parts
            if selection is not None:
                state["selection"] = selection.state_dict()
            store.save(state, metrics)

    if selection is not None and selection.hypernet is None:
        selection = None  # no validation ran (train.steps=0): the editor as it stands is reported
    if selection is not None:
        selection.restore_best(engine.bank)
        log.info("reporting the editor of step %d (validation score %.4f)", selection.step, selection.score)
    result = full_evaluation(cfg, engine, pools.eval, tokenizer, cfg.train.eval_n_edits, rank0)
    if step_times:
        result["median_step_seconds"] = statistics.median(step_times)
        result.update({f"median_{k}": statistics.median(v) for k, v in phase_times.items()})
    if selection is not None:
        result["selected_step"], result["val_score"] = float(selection.step), selection.score
    result["peak_rss_gb"] = peak_rss_gb()
    result.update(gather_worker_metrics({"peak_rss_gb": result["peak_rss_gb"]}, world))
    if rank0:
        tracker.log_metrics(final_metric_names(result), cfg.train.steps)
        atomic_write_text(json.dumps(result, indent=2), run_dir / "results.json")
        tracker.log_artifact(run_dir / "results.json")
        reported = run_dir / (BEST_NAME if selection is not None else CHECKPOINT_NAME)  # the editor scored
        if cfg.tracking.register_model and reported.exists():
            # here, not at the top: mlflow.pyfunc takes ~2 s to import and only a registered run needs it
            from horse_dist.training.mlflow_model import save_pyfunc_model

            tracker.register_model(
                partial(save_pyfunc_model, reported), registered_model_name(cfg.model.source, cfg.method.name)
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
        if selection is not None:
            chosen = f"editor of step {selection.step} (best validation score {selection.score:.4f})"
            print(f"{chosen}: {reported}")  # noqa: T201
        print(f"run folder: {run_dir}")  # noqa: T201
    return result


def run_tracked(cfg: RunConfig, run_dir: Path, world: LocalWorld, store: CheckpointStore) -> dict[str, float]:
    """`train_worker` inside the run's MLflow run: rank 0 tracks (params, the run file, a FAILED status if
    anything stops it), the other ranks get a NullTracker."""
    tracker: Tracker = NullTracker()
    if world.rank == 0:
        tracker = make_tracker(
            cfg.tracking.enabled,
            cfg.tracking.uri,
            experiment_name(cfg),
            cfg.train.run_name,
            run_tags(cfg, world.size),
            cfg.tracking,
            parent_run_id=cfg.tracking.parent_run_id or None,
        )
        tracker.log_params(flatten(cfg, "train"))
        tracker.log_artifact(run_dir / "config.yaml")
    try:
        result = train_worker(cfg, run_dir, world, tracker, store)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return result
