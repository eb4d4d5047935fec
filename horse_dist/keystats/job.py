"""The key-statistics job: fixed corpus shards -> per-shard partial sums (Ray actors or in-process) -> reduce.

    <cache_dir>/<content_hash>/shards/shard_<i>.pt   one partial per shard, written atomically when done
    <cache_dir>/<content_hash>/stats.pt              the reduced KeyStats per module + provenance
    <cache_dir>/<content_hash>/provenance.json       the same provenance, for humans

content_hash covers everything the numbers depend on: the model (source + a digest of its files), its dtype,
the module names, the corpus (spec + a digest of its texts), max_length, max_tokens, shard_tokens and the
accumulation dtype. An existing stats.pt is returned without running anything; an interrupted job rerun with
the same settings skips the shards already written (resume). Partials are reduced in shard order, so any
number of workers gives the same sums bit for bit (each shard is computed by the same code on the same texts).

Environment knobs (tests): HORSE_DIST_KEYSTATS_FAULT_AFTER=N makes a worker process exit hard after writing
its N-th shard; with HORSE_DIST_KEYSTATS_FAULT_MARKER=FILE only the first worker to create FILE does.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from horse_dist.config import RunConfig
from horse_dist.dist.ray_cluster import ensure_ray
from horse_dist.keystats.accumulate import KeyStats, accum_dtype, accumulate_texts, token_counts
from horse_dist.keystats.corpus import Corpus, Shard, build_corpus, plan_shards, shards_json
from horse_dist.lm.load import load_frozen_lm, resolve_device, resolve_local
from horse_dist.lm.registry import layer_index, resolve_edit_modules
from horse_dist.tracking.mlflow_run import git_commit
from horse_dist.training.checkpoint import atomic_torch_save, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "horse_dist.keystats.v1"
SHARD_FORMAT = "horse_dist.keystats.shard.v1"
FAULT_AFTER_ENV = "HORSE_DIST_KEYSTATS_FAULT_AFTER"
FAULT_MARKER_ENV = "HORSE_DIST_KEYSTATS_FAULT_MARKER"


@dataclass
class JobPlan:
    content_hash: str
    root: Path  # <cache_dir>/<content_hash>
    model_source: str
    model_location: str  # the local folder it loads from, or the hub id
    model_fingerprint: str
    module_names: list[str]
    corpus: Corpus
    shards: list[Shard]
    spec: dict[str, Any]  # what content_hash hashes

    @property
    def stats_path(self) -> Path:
        return self.root / "stats.pt"

    def shard_path(self, index: int) -> Path:
        return self.root / "shards" / f"shard_{index:05d}.pt"


@dataclass
class JobReport:
    reused: bool  # stats.pt existed: nothing was run
    computed: list[int] = field(default_factory=list)  # shard indices computed by this run
    skipped: list[int] = field(default_factory=list)  # already written by an earlier (interrupted) run
    n_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- identity of the model and the job


def _file_digest(path: Path, memo: dict[str, Any]) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if key not in memo:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        memo[key] = digest.hexdigest()
    return memo[key]


def folder_fingerprint(folder: Path, memo_path: Path) -> str:
    """sha256 over every file of a model folder (weights in full: an edited export differs in a few tensors
    only); per-file digests are memoised by (path, size, mtime) so reuse costs no rehash."""
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + _file_digest(path, memo).encode())
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(memo), memo_path)
    return digest.hexdigest()


def resolve_model(source: str, cache_dir: Path) -> tuple[str, str, bool]:
    """(location to load from, fingerprint, is_local) of a model source (alias, local folder/.gguf, hub id)."""

    local = resolve_local(source, None, None)
    if local is None:
        return source, f"hub:{source}", False  # no revision is known: the id is all we have
    return str(local), folder_fingerprint(Path(local), cache_dir / "fingerprints.json"), True


def load_tokenizer(location: str, is_local: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=is_local)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as load_frozen_lm: right padding, pad = eos
    tokenizer.padding_side = "right"
    return tokenizer


def resolve_module_names(location: str, names: Sequence[str], n_last: int, model=None) -> list[str]:
    """Explicit names validated, or the architecture's default last `n_last` layers, on a weightless (meta)
    copy of the model unless a loaded one is given."""

    if model is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(location))
    return resolve_edit_modules(model, list(names), n_last)


def content_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def plan_job(
    cfg: RunConfig, model_source: str, module_names: Sequence[str], model=None, tokenizer=None
) -> JobPlan:
    ks = cfg.keystats
    accum_dtype(ks.dtype)  # validate early
    cache_dir = Path(ks.cache_dir).expanduser()
    location, fingerprint, is_local = resolve_model(model_source, cache_dir)
    names = resolve_module_names(location, module_names, cfg.model.n_edit_layers, model)
    corpus = build_corpus(ks.corpus, ks.corpus_config, ks.corpus_split, ks.text_column)
    tokenizer = tokenizer or load_tokenizer(location, is_local)
    shards = plan_shards(
        token_counts(tokenizer, corpus.texts, ks.max_length), corpus.texts, ks.shard_tokens, ks.max_tokens
    )
    if not shards:
        raise ValueError(f"keystats.corpus={ks.corpus!r}: the corpus has no tokens")
    spec = {
        "format": FORMAT,
        "model_source": model_source,
        "model_fingerprint": fingerprint,
        "model_dtype": cfg.model.dtype,
        "module_names": names,
        "corpus": corpus.spec,
        "corpus_digest": corpus.digest(),
        "max_length": ks.max_length,
        "max_tokens": ks.max_tokens,
        "shard_tokens": ks.shard_tokens,
        "dtype": ks.dtype,
    }
    digest = content_hash(spec)
    return JobPlan(
        digest, cache_dir / digest, model_source, location, fingerprint, names, corpus, shards, spec
    )


# ---------------------------------------------------------------- workers


class ShardWorker:
    """Loads the frozen LM once, then turns shards into partial-sum files. A Ray actor, or a plain object."""

    def __init__(
        self,
        settings: dict[str, Any],
        threads: int | None = None,
        fault_after: int = 0,
        fault_marker: str = "",
        model=None,
        tokenizer=None,
    ) -> None:
        started = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        self.settings = settings
        if model is None:
            model, tokenizer = load_frozen_lm(
                settings["model_location"], settings["model_dtype"], str(resolve_device(settings["device"]))
            )
        self.model, self.tokenizer = model, tokenizer
        self.fault_after, self.fault_marker, self.n_written = fault_after, fault_marker, 0
        self.load_seconds = time.perf_counter() - started

    def ready(self) -> float:
        return self.load_seconds

    def run_shard(self, shard: Shard, texts: list[str], out_path: str) -> dict[str, Any]:
        started = time.perf_counter()
        s = self.settings
        stats = accumulate_texts(
            self.model,
            self.tokenizer,
            s["module_names"],
            texts,
            max_length=s["max_length"],
            batch_size=s["batch_size"],
            dtype=accum_dtype(s["dtype"]),
            stop_early=s["stop_early"],
        )
        counts = {entry.count for entry in stats.values()}
        if counts != {shard.n_tokens}:
            raise RuntimeError(
                f"shard {shard.index}: counted {sorted(counts)} tokens, the plan says {shard.n_tokens} "
                "(the worker's tokenizer differs from the driver's?)"
            )
        seconds = time.perf_counter() - started
        payload = {
            "format": SHARD_FORMAT,
            "content_hash": s["content_hash"],
            "index": shard.index,
            "digest": shard.digest,
            "n_tokens": shard.n_tokens,
            "seconds": seconds,
            "stats": {name: entry.to_dict() for name, entry in stats.items()},
        }
        atomic_torch_save(payload, out_path)
        self.n_written += 1
        self._maybe_inject_fault()
        return {"index": shard.index, "n_tokens": shard.n_tokens, "seconds": seconds}

    def _maybe_inject_fault(self) -> None:
        if not self.fault_after or self.n_written != self.fault_after:
            return
        if self.fault_marker:
            try:
                os.close(os.open(self.fault_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:  # another worker already died for this test
                return
        log.error(
            "fault injection: key-statistics worker %d exits after %d shards", os.getpid(), self.n_written
        )
        os._exit(17)


def _worker_settings(cfg: RunConfig, plan: JobPlan) -> dict[str, Any]:
    ks = cfg.keystats
    return {
        "model_location": plan.model_location,
        "model_dtype": cfg.model.dtype,
        "device": cfg.model.device,
        "module_names": plan.module_names,
        "max_length": ks.max_length,
        "batch_size": ks.batch_size,
        "dtype": ks.dtype,
        "stop_early": ks.stop_early,
        "content_hash": plan.content_hash,
    }


def _fault_env() -> dict[str, Any]:
    return {
        "fault_after": int(os.environ.get(FAULT_AFTER_ENV, "0") or 0),
        "fault_marker": os.environ.get(FAULT_MARKER_ENV, ""),
    }


def _shard_texts(plan: JobPlan, shard: Shard) -> list[str]:
    return plan.corpus.texts[shard.start : shard.stop]


def run_local(plan: JobPlan, worker: ShardWorker, todo: list[Shard], on_done: Callable[[dict], None]) -> None:
    for shard in todo:
        on_done(worker.run_shard(shard, _shard_texts(plan, shard), str(plan.shard_path(shard.index))))


def run_ray(
    plan: JobPlan,
    cfg: RunConfig,
    todo: list[Shard],
    on_done: Callable[[dict], None],
    timings: dict[str, float],
) -> None:
    """`keystats.num_workers` actors pull shards: each gets a new one as soon as it returns the last."""
    import ray
    from ray.exceptions import RayActorError

    started = time.perf_counter()
    ensure_ray()
    ks = cfg.keystats
    actor_cls = ray.remote(num_cpus=ks.cpus_per_worker, num_gpus=ks.gpus_per_worker, max_restarts=0)(
        ShardWorker
    )
    threads = max(1, int(ks.cpus_per_worker))
    actors = [
        actor_cls.remote(_worker_settings(cfg, plan), threads, **_fault_env())
        for _ in range(min(ks.num_workers, len(todo)))
    ]
    queue = list(todo)
    pending: dict[Any, tuple[Any, Shard]] = {}

    def submit(actor) -> None:
        shard = queue.pop(0)
        ref = actor.run_shard.remote(shard, _shard_texts(plan, shard), str(plan.shard_path(shard.index)))
        pending[ref] = (actor, shard)

    try:
        load_seconds = ray.get([actor.ready.remote() for actor in actors])
        timings["workers_start"] = time.perf_counter() - started
        timings["worker_load_max"] = max(load_seconds)
        for actor in actors:
            if queue:
                submit(actor)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor, shard = pending.pop(ref)
            try:
                on_done(ray.get(ref))
            except RayActorError as err:
                done = sum(plan.shard_path(s.index).is_file() for s in plan.shards)
                raise RuntimeError(
                    f"a key-statistics worker died on shard {shard.index}; {done}/{len(plan.shards)} shards are "
                    f"saved under {plan.root / 'shards'}: rerun the same command to resume"
                ) from err
            if queue:
                submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)


# ---------------------------------------------------------------- reduce and provenance


def load_partial(plan: JobPlan, shard: Shard) -> dict[str, Any] | None:
    """The saved partial of `shard` if it is complete and belongs to this plan, else None."""
    path = plan.shard_path(shard.index)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a file that is not a complete torch file: recompute the shard
        log.warning("%s is unreadable (%s); recomputing it", path, err)
        return None
    same = (payload.get("format"), payload.get("content_hash"), payload.get("digest")) == (
        SHARD_FORMAT,
        plan.content_hash,
        shard.digest,
    )
    if not same:
        log.warning("%s belongs to another plan; recomputing it", path)
        return None
    return payload


def reduce_partials(plan: JobPlan) -> dict[str, KeyStats]:
    """Σ over shards in shard order (a fixed summation order: the result does not depend on who computed what)."""
    total: dict[str, KeyStats] | None = None
    for shard in plan.shards:
        payload = load_partial(plan, shard)
        if payload is None:
            raise RuntimeError(f"shard {shard.index} of {plan.root} is missing after the job ran")
        partial = {name: KeyStats.from_dict(payload["stats"][name]) for name in plan.module_names}
        total = (
            partial if total is None else {name: total[name] + partial[name] for name in plan.module_names}
        )
    return total


def _version() -> str:
    try:
        return importlib.metadata.version("horse_dist")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def provenance(plan: JobPlan, cfg: RunConfig, n_tokens: int, timings: dict[str, float]) -> dict[str, Any]:

    return {
        **plan.spec,
        "content_hash": plan.content_hash,
        "model_location": plan.model_location,
        "layer_indices": [layer_index(name) for name in plan.module_names],
        "n_texts": plan.shards[-1].stop,
        "n_corpus_texts": len(plan.corpus.texts),
        "n_shards": len(plan.shards),
        "n_tokens": n_tokens,
        "batch_size": cfg.keystats.batch_size,
        "stop_early": cfg.keystats.stop_early,
        "num_workers": cfg.keystats.num_workers,
        "statistic": "second_moment = sum_t k_t k_t^T (uncentred, unnormalised); key_sum = sum_t k_t",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "horse_dist_version": _version(),
        "git_commit": git_commit(),
        "timings_s": timings,
    }


def load_stats_file(path: str | Path) -> tuple[dict[str, KeyStats], dict[str, Any]]:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a key-statistics file (format {payload.get('format')!r}, want {FORMAT!r})"
        )
    return {name: KeyStats.from_dict(d) for name, d in payload["stats"].items()}, payload["provenance"]


# ---------------------------------------------------------------- the job


def run_job(
    cfg: RunConfig, model_source: str, module_names: Sequence[str] = (), model=None, tokenizer=None
) -> tuple[dict[str, KeyStats], dict[str, Any], JobReport]:
    """Stats, provenance and what this call did. With `model` (+ `tokenizer`) given, runs in this process on
    that model, which must be the unedited model `model_source` loads (it names the cache entry)."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    plan = plan_job(cfg, model_source, module_names, model, tokenizer)
    timings["plan"] = time.perf_counter() - started
    if plan.stats_path.is_file():
        stats, prov = load_stats_file(plan.stats_path)
        log.info("key statistics reused from %s (%d tokens)", plan.stats_path, prov["n_tokens"])
        return stats, prov, JobReport(reused=True, n_tokens=prov["n_tokens"], timings=timings)

    report = JobReport(reused=False, timings=timings)
    report.skipped = [s.index for s in plan.shards if load_partial(plan, s) is not None]
    todo = [s for s in plan.shards if s.index not in set(report.skipped)]
    n_total = sum(s.n_tokens for s in plan.shards)
    log.info(
        "key statistics %s: %d modules, %d texts, %d tokens in %d shards (%d already done), %s",
        plan.content_hash,
        len(plan.module_names),
        plan.shards[-1].stop,
        n_total,
        len(plan.shards),
        len(report.skipped),
        f"{cfg.keystats.num_workers} Ray workers"
        if cfg.keystats.num_workers and model is None
        else "in process",
    )
    plan.root.mkdir(parents=True, exist_ok=True)
    (plan.root / "plan.json").write_text(json.dumps({"spec": plan.spec, "shards": shards_json(plan.shards)}))
    bar = tqdm(total=len(plan.shards), initial=len(report.skipped), desc="key statistics", unit="shard")
    done_tokens = sum(plan.shards[i].n_tokens for i in report.skipped)

    def on_done(info: dict[str, Any]) -> None:
        nonlocal done_tokens
        report.computed.append(info["index"])
        done_tokens += info["n_tokens"]
        bar.update(1)
        bar.set_postfix(tokens=f"{done_tokens}/{n_total}")

    shards_started = time.perf_counter()
    try:
        if todo and cfg.keystats.num_workers > 0 and model is None:
            run_ray(plan, cfg, todo, on_done, timings)
        elif todo:
            load_started = time.perf_counter()
            worker = ShardWorker(
                _worker_settings(cfg, plan), None, **_fault_env(), model=model, tokenizer=tokenizer
            )
            timings["workers_start"] = time.perf_counter() - load_started
            run_local(plan, worker, todo, on_done)
    finally:
        bar.close()
    timings["shards"] = time.perf_counter() - shards_started

    reduce_started = time.perf_counter()
    stats = reduce_partials(plan)
    timings["reduce"] = time.perf_counter() - reduce_started
    report.n_tokens = next(iter(stats.values())).count
    timings["total"] = time.perf_counter() - started
    prov = provenance(plan, cfg, report.n_tokens, timings)
    atomic_torch_save(
        {"format": FORMAT, "provenance": prov, "stats": {n: s.to_dict() for n, s in stats.items()}},
        plan.stats_path,
    )
    atomic_write_text(json.dumps(prov, indent=2) + "\n", plan.root / "provenance.json")
    log.info(
        "key statistics written to %s: %d tokens; timings %s",
        plan.stats_path,
        report.n_tokens,
        {k: round(v, 2) for k, v in timings.items()},
    )
    return stats, prov, report


def load_or_compute_stats(
    cfg: RunConfig, model_source: str, module_names: Sequence[str] = (), model=None, tokenizer=None
) -> dict[str, KeyStats]:
    """KeyStats per edited module (cached by content hash). Empty `module_names`: the architecture's default
    last `cfg.model.n_edit_layers` layers. `stats[name].second_moment` is C0 = K0 K0ᵀ = Σ_t k_t k_tᵀ."""
    return run_job(cfg, model_source, module_names, model, tokenizer)[0]


def report_dict(report: JobReport) -> dict[str, Any]:
    return asdict(report)
