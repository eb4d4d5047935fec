"""Typed run configuration: structured dataclasses + YAML presets + `key=value` command-line overrides.

A run file (configs/default.yaml) names one preset per group under `defaults:` (model / data / method); each
preset is configs/<group>/<name>.yaml. `method=malmen` on the command line swaps a preset; `method.rank=64`
overrides one key. Unknown keys and wrong types raise ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from horse_dist.editor.spread import SPREAD_MODES

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
PRESET_GROUPS = ("model", "data", "method")


@dataclass(frozen=True)
class ModelConfig:
    source: str = "smollm2-135m"  # alias, local HF folder, .gguf file or hub id
    dtype: str = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    edit_modules: list[str] = field(default_factory=list)  # empty: the architecture's default
    n_edit_layers: int = 6
    # split: the prompts' leading tokens run apart from the answer tail (lm/answer_tail.py; exact): in the
    # cache pass from the lowest edited block on, without a graph (the backward covers the answer positions
    # only), in the loss passes in the last block (its MLP runs at the answer positions only); full: plain
    # passes. auto: split on a CPU for the families where it is tested (lm/fast_forward.py RESUMABLE), not
    # under ZeRO-3
    answer_tail: str = "auto"


@dataclass(frozen=True)
class DataConfig:
    name: str = "zsre"
    # a file (.json / .jsonl), a glob, a comma-separated list of them, or a hub dataset name[:split]
    train_path: str = "data/zsre/zsre_mend_eval_head.json"
    eval_path: str = "data/zsre/zsre_mend_eval_tail.json"  # empty: hold out eval_size records of train_path
    format: str = "auto"
    target: str = "new"  # new: the counterfactual answer (MEND/HORSE); true: the true answer (MALMEN/MEMIT)
    drop_empty_targets: bool = True
    eval_size: int = 256
    n_edits: int = 64  # edits per meta-step
    batch_size: int = (
        32  # the loss normaliser (the public code's batch size) and the default micro-batch rows
    )
    micro_batch_size: int = (
        0  # rows per micro-batch of the LM passes; 0: batch_size. Results do not depend on it
    )
    # and at most this many padded tokens per micro-batch (0: no limit); with packed rows 2048 beat 640 and
    # 4096 on 2 CPU cores (docs/performance.md); one-sequence rows on a CPU did better at 640
    max_batch_tokens: int = 2048
    # packed: several sequences per row (little padding); padded: one per row; auto: packed on a CPU for the
    # architectures where it is tested exact (lm/fast_forward.py PACKABLE). Results equal up to float rounding
    packing: str = "auto"
    # packed row length (the longest sequence, if longer); 0: per plan, the cheapest of data/packing.py's
    # ROW_CANDIDATES (64-128) for these prompts
    pack_row_tokens: int = 0
    share_prefixes: bool = True  # packed rows compute prompt prefixes that sequences share once (exact)
    max_train_records: int = 0  # 0: all
    # fixed partitions of the training pool, one per worker: every epoch reshuffles within each, so a record
    # meets the same worker (and its block-input cache) all run. 0: the number of workers (a resume keeps the
    # count it started with). A one-process run with data.partitions=W draws a W-worker run's meta-batches
    partitions: int = 0
    # where tokenised pools are kept, memory-mapped, for every later run, resume and worker on the same
    # records and tokenizer (data/token_store.py): auto: ~/.cache/horse_dist/tokens (one per machine, as
    # ~/.cache/huggingface); off: tokenise in memory; else that folder
    token_store: str = "auto"
    # eos: every edit and rephrase answer ends with end-of-text, so the editor learns to stop after the answer
    # (the cache pass's keys and gradients include the position after it), and the locate-then-edit methods'
    # value targets end with it; never scored in ES/GS
    answer_end: str = "none"


@dataclass(frozen=True)
class MethodConfig:
    name: str = "horse"
    spread: str = "orthogonal"  # orthogonal | reference | none
    learn_lambda: bool = True
    locality: str = "ce"  # ce | kl
    loc_coef: float = 1.0
    rank: int = 1920
    n_blocks: int = 2
    eta_init: float = 1e-6
    # constant: η is the raw step size (reference code); key_energy: η is measured in units of
    # 1 / mean ‖K_l‖², set per layer from the first meta-batch
    eta_init_mode: str = "constant"
    log_lambda_init: float = 0.0
    solve_form: str = "auto"  # auto | primal | dual
    # none: ridge e^λ I (MALMEN/HORSE); c0: ridge e^λ C0, C0 = E[k kᵀ] of the edited layers' keys over
    # prior_records training records (editor/prior.py), damped by prior_damping x its mean eigenvalue.
    # prior_keys: which keys: every token of their edit, rephrase and unrelated prompts (prompt_tokens), or
    # the answer positions of their unrelated view, teacher-forced (unrelated_answers)
    key_prior: str = "none"
    prior_keys: str = "prompt_tokens"
    prior_records: int = 512
    prior_damping: float = 1e-3
    solve_dtype: str = "float32"  # float32 | float64
    chunk_rows: int = 1024  # hypernetwork rows per chunk


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20
    meta_lr: float = 1e-5
    scalar_lr: float = 0.0  # Adam lr of the per-layer scalars η and λ; 0: meta_lr
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: evaluate at the end only
    eval_n_edits: int = 64
    eval_batches: int = 4  # eval meta-batches of eval_n_edits (capped by the eval pool)
    # live scores: greedy generations of eval_new_tokens from each prompt (generation/live.py); locality
    # compares the first eval_loc_tokens of the unrelated prompts' continuations with the unedited model's
    eval_live: bool = True
    eval_new_tokens: int = 12
    eval_loc_tokens: int = 8
    eval_untrained: bool = True  # the final evaluation also scores the editor before meta-training
    # model selection (horse_dist/training/selection.py): hold val_size training records out as a validation split,
    # score the editor on val_batches x eval_n_edits of them every eval_every steps and report (and save as
    # <run>/best.pt) the best; 0: no split, the last step's editor is reported. The same records every time,
    # so editors are compared alike, but one batch of 64 zsRE edits differs from the next by up to 0.1 in ES
    val_size: int = 0
    val_batches: int = 2
    checkpoint_every: int = 10
    keep_checkpoints: int = 2  # the newest this many checkpoints stay in <run>/checkpoints/
    out_dir: str = "runs"
    run_name: str = ""  # empty: <method>-<model>-<timestamp>
    resume: bool = False
    # a restarted job (a RayJob retry) continues train.run_name when it holds a checkpoint, else starts it;
    # plain resume=true refuses a run that does not exist
    resume_if_exists: bool = False
    # resume refuses a config that changes the result (RESUME_FREE keys aside); true applies the change
    resume_override: bool = False
    # a step whose loss, gradient or solve is not finite is skipped (logged, counted); this many in a row
    # stop the run with an error (a NaN never reaches the weights or a checkpoint)
    max_bad_steps: int = 3
    # hidden states entering the lowest edited block, kept per training prompt: from a record's second visit
    # on, its passes skip the frozen blocks below (lm/block_cache.py). Host memory budget; 0: off
    block_cache_gb: float = 2.0


@dataclass(frozen=True)
class DistConfig:
    backend: str = "local"  # local | ray
    num_workers: int = 1
    use_gpu: bool = False
    zero_stage: int = 0
    offload_params: bool = False
    zero3_gather: str = "layer"  # layer: one all-gather per transformer block; module: DeepSpeed's per-module
    cache_budget_gb: float = 0.0  # 0: unlimited
    max_failures: int = 0


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = ""  # empty: <dataset>-<model>
    artifact_location: str = ""  # new experiments only; empty: <sqlite db folder>/mlruns, or the server's
    system_metrics: bool = True  # MLflow's CPU/memory/GPU sampler (psutil)
    system_metrics_interval_s: float = 10.0
    register_model: bool = True  # register the final hypernetwork as horse_dist-<model>-<method>
    queue_size: int = 1000  # metric batches in flight (MLflow async logging); more are dropped, counted
    flush_timeout_s: float = 30.0  # how long finish() waits for the batches in flight
    http_timeout_s: float = 10.0  # per request to a tracking server
    http_retries: int = 1
    parent_run_id: str = ""  # log this run as a nested child of that run (set by python -m horse_dist.sweep)


@dataclass(frozen=True)
class BenchConfig:  # python -m horse_dist.bench (issue 5); fields owned by horse_dist/bench.py
    warmup_steps: int = 1
    steps: int = 3
    edit_sizes: list[int] = field(default_factory=lambda: [100])  # facts per edit call; data.n_edits is added
    edit_repeats: int = 2  # timed edit calls per size (median), after one untimed call of the smallest size
    out: str = "bench.json"
    threads: int = 0  # torch intra-op threads; 0: torch's default
    probe_sizes: list[int] = field(default_factory=lambda: [2048, 3072, 4096])  # square matmuls, model dtype
    probe_repeats: int = 3


@dataclass(frozen=True)
class KeyStatsConfig:  # K0 K0^T per edited layer over a text corpus (issue 6); owned by horse_dist/keystats
    corpus: str = "bundled"  # bundled: texts of the bundled zsRE + CounterFact; else a datasets path or name
    corpus_config: str = ""  # datasets config name of a hub corpus
    corpus_split: str = "train"
    text_column: str = "text"
    cache_dir: str = "~/.cache/horse_dist/keystats"
    num_workers: int = 1  # Ray actors; 0: in this process, no Ray
    cpus_per_worker: float = 1.0  # CPUs Ray reserves per actor (and its torch threads)
    gpus_per_worker: float = 0.0  # GPUs Ray reserves per actor (model.device=auto then uses it)
    max_tokens: int = 100000  # corpus prefix of at most this many tokens (0: the whole corpus)
    shard_tokens: int = 4096  # tokens per shard (a shard is consecutive whole texts); fixes the shards
    max_length: int = 128  # tokens per text (longer texts are truncated)
    batch_size: int = 16  # texts per forward pass
    dtype: str = "float64"  # accumulation dtype: float64 | float32
    stop_early: bool = True  # stop each forward after the last edited module's input is captured


@dataclass(frozen=True)
class LocateConfig:  # locate-then-edit methods, MOSE, MEMIT, AlphaEdit; owned by horse_dist/locate
    method: str = "mose"  # mose | memit | alphaedit
    # Candidate layers (MOSE selects one by Eq. 21-22 and edits it with `neighbours` on each side), or the
    # edited layers when select_layer is false. Empty: 6 layers from 10% of the depth (MEMIT's early-mid MLPs).
    layers: list[int] = field(default_factory=list)
    select_layer: bool = True
    neighbours: int = 1
    # mose/memit: λ on C0 (mean E[k kᵀ] scale); alphaedit: l2 on ‖ΔP‖²; 0: the method's default
    # (mose 10, memit 15000, alphaedit 10)
    lam: float = 0.0
    null_energy: float = 1e-2  # alphaedit: the null space holds at most this fraction of tr(C0)
    # mose/memit: the keys of the stream's earlier edits join the preserved keys, so later edits keep their
    # outputs (alphaedit always keeps them). MOSE, 24 head edits: ES 0.70 -> 0.81
    keep_edits: bool = True
    # mose/memit with keep_edits: each earlier edit key weighs this many new edit keys (C0 + w C_p/λ)
    keep_weight: float = 1.0
    solve_dtype: str = "float64"  # SVD / Cholesky dtype
    v_steps: int = 20  # Adam steps of the value optimisation
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5  # on ‖δ‖² / ‖h‖²
    clamp_factor: float = 0.75  # ‖δ‖ <= clamp_factor ‖h‖
    v_min_nll: float = 0.05  # stop early once every edit's answer NLL is below this
    # after the update, edits whose plain prompt does not yet give every answer token as the argmax get
    # new values from the edited model and a second update, up to this many times (0: never)
    refine_rounds: int = 0
    n_prefixes: int = 4  # sampled prefixes besides the empty one
    prefix_len: int = 5  # sampled tokens per prefix
    essence_template: str = "{} is a"
    seed: int = 0


@dataclass(frozen=True)
class SequentialConfig:  # sequential editing streams (issue 6); owned by horse_dist/sequential.py
    method: str = "mose"  # mose | memit | alphaedit | horse | malmen
    steps: int = 200  # T
    batch_size: int = 1  # b edits per step: 1 single-sequential, 10 batch-sequential
    checkpoint: str = ""  # a trained hypernetwork's run dir or checkpoint (horse, malmen)
    pool: str = "eval"  # records drawn from: eval (held out from training) | train | all
    seed: int = 0  # the stream's draw from the pool
    eval_every: int = 10  # steps between curve points (weights, retention); 0: first and last step only
    retention_edits: int = 20  # ES on the first this many edits made (retention curve)
    sample_edits: int = 64  # ES on at most this many of the edits made so far (evenly spaced)
    baseline: bool = True  # score the unedited model on the stream's edit/rephrase prompts first
    # live scores (greedy generation, train.eval_new_tokens / eval_loc_tokens) at every curve point and the end
    live: bool = True
    # horse/malmen: each step solves the ridge system of all the stream's edits so far (editor/memory.py)
    ridge_memory: bool = True
    c0_scale: str = (
        "mean"  # C0 handed to mose/memit: mean E[k kᵀ] (MEMIT's scale for locate.lam) | sum K0 K0ᵀ
    )
    run_name: str = ""  # empty: seq-<method>-b<b>-<model>-<data>-<timestamp>, under train.out_dir


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    keystats: KeyStatsConfig = field(default_factory=KeyStatsConfig)
    locate: LocateConfig = field(default_factory=LocateConfig)
    sequential: SequentialConfig = field(default_factory=SequentialConfig)


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.answer_tail": ("auto", "split", "full"),
    "data.target": ("new", "true"),
    "data.packing": ("auto", "packed", "padded"),
    "data.answer_end": ("none", "eos"),
    # data.formats.FORMATS (a test keeps them equal: importing horse_dist.data here would load transformers)
    "data.format": ("auto", "zsre_mend", "zsre_malmen", "zsre_kilt", "counterfact_rome", "counterfact_flat"),
    "method.spread": SPREAD_MODES,
    "method.locality": ("ce", "kl"),
    "method.solve_form": ("auto", "primal", "dual"),
    "method.key_prior": ("none", "c0"),
    "method.prior_keys": ("prompt_tokens", "unrelated_answers"),
    "method.eta_init_mode": ("constant", "key_energy"),
    "method.solve_dtype": ("float32", "float64"),
    "dist.backend": ("local", "ray"),
    "dist.zero_stage": (0, 3),
    "dist.zero3_gather": ("layer", "module"),
}


class ConfigError(ValueError):
    pass


def _preset_path(group: str, name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        raise ConfigError(f"unknown {group} preset {name!r}: no {path}; available: {available}")
    return path


def _load_yaml(path: Path) -> DictConfig:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    loaded = OmegaConf.load(path)
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def _merge(base: DictConfig, other: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:  # OmegaConf's message spans lines; keep the first, name the key
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{origin}: {key + ': ' if key else ''}{str(err).splitlines()[0]}") from None


def load_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Compose schema <- preset files named in `defaults` <- the run file <- overrides; validate; return a dataclass."""
    overrides = list(overrides or [])
    run_file = Path(config_file) if config_file else CONFIG_DIR / "default.yaml"
    run_yaml = _load_yaml(run_file)
    defaults = dict(run_yaml.pop("defaults", None) or {})
    unknown_groups = set(defaults) - set(PRESET_GROUPS)
    if unknown_groups:
        raise ConfigError(
            f"{run_file}: defaults names unknown groups {sorted(unknown_groups)}; use {PRESET_GROUPS}"
        )

    dotlist = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if key in PRESET_GROUPS:
            defaults[key] = value
        else:
            dotlist.append(item)

    merged = schema()
    for group, name in defaults.items():
        path = _preset_path(group, str(name))
        merged = _merge(merged, {group: _load_yaml(path)}, str(path))
    merged = _merge(merged, run_yaml, str(run_file))
    merged = _merge(merged, parse_overrides(dotlist), "command line")
    cfg: RunConfig = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def load_config_with_extras(
    config_file: str | Path | None, overrides: list[str], extras: tuple[str, ...]
) -> tuple[RunConfig, dict[str, str]]:
    """Like load_config, but top-level `name=value` arguments named in `extras` (checkpoint=, out=) are
    returned separately instead of being config keys."""
    found, rest = {}, []
    for item in overrides:
        key = item.split("=", 1)[0]
        if key in extras and "=" in item:
            found[key] = item.split("=", 1)[1]
        else:
            rest.append(item)
    return load_config(config_file, rest), found


def schema() -> DictConfig:
    """The config schema with its defaults, open for merging (OmegaConf makes frozen dataclasses read-only;
    the RunConfig built from it is frozen again)."""
    merged = OmegaConf.structured(RunConfig)
    OmegaConf.set_readonly(merged, False)
    return merged


def with_changes(cfg: RunConfig, changes: dict[str, Any]) -> RunConfig:
    """A copy of the frozen `cfg` with `section.key` values replaced (the job's own decisions at run time,
    e.g. the run name it picked or a resume it found)."""
    sections: dict[str, dict[str, Any]] = {}
    for dotted, value in changes.items():
        section, key = dotted.split(".", 1)
        check_key(dotted)
        sections.setdefault(section, {})[key] = value
    return dataclasses.replace(
        cfg, **{name: dataclasses.replace(getattr(cfg, name), **values) for name, values in sections.items()}
    )


def config_from_yaml(text: str, overrides: list[str]) -> RunConfig:
    """Rebuild a saved resolved config, then apply overrides. The model and method define a trained
    hypernetwork, so swapping their presets is refused; a data preset may be swapped."""
    merged = _merge(schema(), OmegaConf.create(text), "saved config")
    dotlist = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key in ("model", "method"):
            raise ConfigError(f"{key}={value}: the {key} is fixed by the checkpoint")
        if key == "data":
            merged = _merge(merged, {"data": _load_yaml(_preset_path("data", value))}, value)
        else:
            dotlist.append(item)
    merged = _merge(merged, parse_overrides(dotlist), "command line")
    cfg: RunConfig = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


@functools.cache
def config_keys() -> dict[str, type]:
    """`section.key -> declared type` for every key of the schema."""
    return {
        f"{section.name}.{key.name}": key.type
        for section in dataclasses.fields(RunConfig)
        for key in dataclasses.fields(section.default_factory())  # type: ignore[misc]
    }


def check_key(key: str) -> type:
    """The declared type of `section.key`, or a ConfigError naming the nearest valid key."""
    keys = config_keys()
    if key not in keys:
        nearest = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.5)
        hint = f"; did you mean {nearest[0]}?" if nearest else "; see horse_dist/config.py"
        raise ConfigError(f"unknown config key {key!r}{hint}")
    return keys[key]


def parse_overrides(items: list[str]) -> DictConfig:
    """`section.key=value` items as a config. A value for a string key is taken verbatim (so that
    `data.target=true` is the string "true", not a YAML boolean) unless quoted (`data.eval_path=''`); other
    values are parsed as YAML."""
    parsed = OmegaConf.create({})
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        declared = check_key(key)
        try:
            quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
            if declared in (str, "str") and not quoted:
                OmegaConf.update(parsed, key, value, merge=True)
            else:
                parsed = OmegaConf.merge(parsed, OmegaConf.from_dotlist([item]))
        except Exception as err:  # malformed YAML in the value
            raise ConfigError(f"command line: {item}: {err}") from None
    return parsed


def validate(cfg: RunConfig) -> None:
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not one of {list(allowed)}")
    positive = {
        "data.n_edits": cfg.data.n_edits,
        "data.batch_size": cfg.data.batch_size,
        "method.rank": cfg.method.rank,
        "method.chunk_rows": cfg.method.chunk_rows,
        "method.prior_records": cfg.method.prior_records,
        "train.eval_n_edits": cfg.train.eval_n_edits,
        "train.eval_new_tokens": cfg.train.eval_new_tokens,
        "train.eval_loc_tokens": cfg.train.eval_loc_tokens,
        "dist.num_workers": cfg.dist.num_workers,
        "model.n_edit_layers": cfg.model.n_edit_layers,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.data.micro_batch_size < 0:
        raise ConfigError(
            f"data.micro_batch_size must be >= 0 (0: data.batch_size), got {cfg.data.micro_batch_size}"
        )
    if cfg.data.pack_row_tokens < 0:
        raise ConfigError(
            f"data.pack_row_tokens must be >= 0 (0: chosen per plan), got {cfg.data.pack_row_tokens}"
        )
    if cfg.train.block_cache_gb < 0:
        raise ConfigError(f"train.block_cache_gb must be >= 0 (0: off), got {cfg.train.block_cache_gb}")
    if cfg.train.eval_loc_tokens > cfg.train.eval_new_tokens:
        raise ConfigError(
            f"train.eval_loc_tokens={cfg.train.eval_loc_tokens} exceeds train.eval_new_tokens="
            f"{cfg.train.eval_new_tokens} (the tokens generated per prompt)"
        )
    non_negative = {
        "train.steps": cfg.train.steps,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.eval_every": cfg.train.eval_every,
        "train.val_size": cfg.train.val_size,
        "data.max_train_records": cfg.data.max_train_records,
        "data.partitions": cfg.data.partitions,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if cfg.data.partitions > cfg.data.n_edits:
        raise ConfigError(
            f"data.partitions={cfg.data.partitions} exceeds data.n_edits={cfg.data.n_edits} (each meta-batch "
            "takes at least one record from every partition)"
        )
    if cfg.train.val_size and not cfg.train.eval_every:
        raise ConfigError(
            "train.val_size > 0 selects the best of the editors scored every train.eval_every steps: set train.eval_every > 0"
        )
    for key, value in {
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "train.max_bad_steps": cfg.train.max_bad_steps,
        "train.val_batches": cfg.train.val_batches,
    }.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")


def to_dict(cfg: RunConfig, job: str | None = None) -> dict[str, Any]:
    """Section -> its values: every section, or the sections `job` reads (JOB_SECTIONS)."""
    sections = dataclasses.asdict(cfg)
    return sections if job is None else {s: v for s, v in sections.items() if s in JOB_SECTIONS[job]}


def to_yaml(cfg: RunConfig, job: str | None = None) -> str:
    """The config as YAML: every section, or the sections `job` reads (JOB_SECTIONS)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg) if job is None else to_dict(cfg, job))


# The config sections each job reads: what its --help lists, its --cfg job prints and its run logs as params
# (a training run does not log the bench's, the key statistics', locate-then-edit's or the streams'
# settings). One RunConfig holds them all, so the jobs share the common sections and their presets.
TRAINING_SECTIONS = ("model", "data", "method", "train", "dist", "tracking")
BENCH_SECTIONS = ("model", "data", "method", "train", "dist", "bench")
JOB_SECTIONS = {
    "train": TRAINING_SECTIONS,
    "evaluate": TRAINING_SECTIONS,
    "sweep": TRAINING_SECTIONS,
    "edit": TRAINING_SECTIONS,
    # the streams run every method: hypernetworks (train, dist) and locate-then-edit (locate, keystats)
    "sequential": (*TRAINING_SECTIONS, "sequential", "locate", "keystats"),
    "bench": BENCH_SECTIONS,
    "bench_ab": BENCH_SECTIONS,
    "keystats": ("model", "keystats"),
}


def flatten(cfg: RunConfig, job: str | None = None) -> dict[str, Any]:
    """`section.key -> value` of every section, or of the sections `job` reads (JOB_SECTIONS), for tracking
    params and config diffs."""
    return {
        f"{section}.{key}": value
        for section, values in to_dict(cfg, job).items()
        for key, value in values.items()
    }


@dataclass(frozen=True)
class CommandLine:
    config_file: str | None  # --config FILE (None: configs/default.yaml)
    overrides: list[str]  # group=preset and section.key=value, in order
    show_config: bool = False  # --cfg job: print the resolved config and stop


def split_cli(argv: list[str]) -> CommandLine:
    """`[--config FILE] [--cfg job] key=value ...`; `-h`/`--help` prints the help and exits 0."""
    config_file, overrides, show_config = None, [], False
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            config_file = next(args, None)
            if config_file is None:
                raise ConfigError("--config needs a file")
        elif arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif arg in ("--cfg", "--cfg=job"):
            if arg == "--cfg" and next(args, None) != "job":
                raise ConfigError("--cfg takes one value: job (print the resolved config and stop)")
            show_config = True
        elif arg in ("-h", "--help"):
            print(help_text())  # noqa: T201
            raise SystemExit(0)
        else:
            overrides.append(arg)
    return CommandLine(config_file, overrides, show_config)


def print_config(cfg: RunConfig, job: str) -> dict[str, Any]:
    """`--cfg job`: the sections of the resolved config that `job` reads, as YAML on stdout (what the run
    would use); returns them flattened."""
    print(to_yaml(cfg, job), end="")  # noqa: T201
    return flatten(cfg, job)


def help_text() -> str:
    """The entry point's own docstring (its arguments besides the config), the config's usage, the preset
    groups with their presets, and every key the job reads with its default (and choices)."""
    entry = sys.modules.get("__main__")
    path = Path(getattr(entry, "__file__", None) or "<command>")
    command = path.parent.name if path.stem == "__main__" else path.stem  # python -m horse_dist.keystats
    doc = (getattr(entry, "__doc__", None) or "").strip() if command != "<command>" else ""
    sections = JOB_SECTIONS.get(command, tuple(f.name for f in dataclasses.fields(RunConfig)))
    lines = [
        *([doc, ""] if doc else []),
        f"usage: python -m horse_dist.{command} [--config FILE] [--cfg job] [group=preset] [section.key=value ...]",
        "  --config FILE   the run file (default configs/default.yaml); its `defaults` pick the presets",
        "  --cfg job       print the resolved config as YAML and stop",
        "  --debug         show the traceback of an error instead of one line",
        "",
        "preset groups (configs/<group>/<preset>.yaml):",
    ]
    for group in (g for g in PRESET_GROUPS if g in sections):
        presets = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        lines.append(f"  {group}: {', '.join(presets)}")
    lines.append("")
    lines.append("keys (default; choices):")
    for key, value in flatten(RunConfig()).items():
        if key.split(".")[0] not in sections:
            continue
        choices = f"  [{' | '.join(map(str, CHOICES[key]))}]" if key in CHOICES else ""
        lines.append(f"  {key}={value!r}{choices}")
    return "\n".join(lines)
