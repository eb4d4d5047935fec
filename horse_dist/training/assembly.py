"""Build the pieces of a run from its config: device, frozen LM, edit modules, data pools, engine."""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from horse_dist.config import REPO_ROOT, ConfigError, DataConfig, RunConfig
from horse_dist.data import (
    DataFormatError,
    EditRecord,
    TokenizedRecords,
    answer_stop_id,
    first_few,
    load_records,
    overlong,
    select_records,
    stored_tokenize,
    train_eval_split,
)
from horse_dist.dist.deepspeed_lm import load_frozen_lm_deepspeed
from horse_dist.dist.world import LocalWorld
from horse_dist.fs import user_cache
from horse_dist.lm.load import load_frozen_lm
from horse_dist.lm.registry import resolve_edit_modules
from horse_dist.training.engine import EditEngine

log = logging.getLogger(__name__)


def resolve_path(path: str) -> Path:
    """Paths in configs are relative to the working directory, else to the repository (bundled data)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    bundled = REPO_ROOT / path
    return bundled if bundled.exists() else candidate


def output_dir(path: str) -> Path:
    """Where a run writes: relative to the working directory only. resolve_path's fallback to the repository
    is for bundled inputs; outputs beside a user's command must never land in the checkout's folders."""
    return Path(path).expanduser()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class DataPools:
    train_records: list[EditRecord]
    eval_records: list[EditRecord]
    train: TokenizedRecords
    eval: TokenizedRecords


# `dir:split` picks a directory's files whose name holds the split, or a synonym of it
SPLIT_NAMES = {"train": ("train",), "dev": ("dev", "val"), "validation": ("val", "dev"), "test": ("test",)}
DATA_SUFFIXES = (".json", ".jsonl")


def directory_files(folder: Path, split: str) -> list[Path]:
    """A directory's data files (sorted): all of them, or with `split` those whose name holds it."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    if split:
        names = SPLIT_NAMES.get(split, (split,))
        files = [p for p in files if any(name in p.stem.lower() for name in names)]
    if not files:
        listed = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
        wanted = f"no .json/.jsonl file named for {split!r}" if split else "no .json/.jsonl file"
        raise FileNotFoundError(f"{folder}: {wanted} (it holds {listed})")
    return files


def data_files(spec: str) -> list[Path]:
    """The files a data path names: comma-separated parts, each a file, a glob (its matches, sorted), a
    directory (its .json/.jsonl files) or `directory:split` (those named for the split: train, dev or
    validation, test), or a hub dataset name[:split]; relative paths as resolve_path reads them."""
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        folder, _, split = part.rpartition(":") if ":" in part else (part, "", "")
        directory = resolve_path(folder)
        if any(char in part for char in "*?["):
            pattern = os.path.expanduser(part)
            # relative to the working directory, else to the repository (bundled data), as resolve_path
            matches = sorted(glob.glob(pattern)) or sorted(glob.glob(os.path.join(REPO_ROOT, pattern)))
            if not matches:
                raise FileNotFoundError(f"{part}: no data file matches")
            files.extend(map(Path, matches))
        elif directory.is_dir():
            files.extend(directory_files(directory, split))
        else:
            files.append(resolve_path(part))
    if not files:
        raise ConfigError(f"data path {spec!r} names no file")
    return files


def _nonempty_records(path: str, data: DataConfig) -> list[EditRecord]:
    """The records of every file `path` names, in order (each file's format detected on its own)."""
    records = [
        record
        for file in data_files(path)
        for record in load_records(file, data.format, data.target, drop_empty_targets=data.drop_empty_targets)
    ]
    if not records:
        raise DataFormatError(path, f"no edit records (target={data.target!r})")
    return records


def _drop_overlong(
    records: list[EditRecord], tokenized: TokenizedRecords, max_tokens: int | None, path: str
) -> tuple[list[EditRecord], TokenizedRecords]:
    """Records longer than the model's positions are dropped by rule, with a count; none left is an error."""
    too_long = overlong(tokenized, max_tokens) if max_tokens else []
    if not too_long:
        return records, tokenized
    if len(too_long) == len(records):
        raise DataFormatError(path, f"every record is longer than the model's {max_tokens} positions")
    log.warning(
        "%s: dropped %d record(s) longer than the model's %d positions: indices %s",
        path,
        len(too_long),
        max_tokens,
        first_few(too_long),
    )
    bad = set(too_long)
    keep = [i for i in range(len(records)) if i not in bad]
    return [records[i] for i in keep], select_records(tokenized, keep)


def token_store(cfg: RunConfig) -> Path | None:
    """The folder of tokenised pools (data.token_store), None where off."""
    if cfg.data.token_store == "off":
        return None
    if cfg.data.token_store == "auto":
        return user_cache("tokens")
    return output_dir(cfg.data.token_store)


def load_data(cfg: RunConfig, tokenizer, max_tokens: int | None = None, train: bool = True) -> DataPools:
    """The training and evaluation pools; records longer than `max_tokens` (the model's positions) are
    dropped with a warning. `train=False` (evaluation alone) leaves the training pool empty: at zsRE's full
    155k records its tokenisation takes minutes that evaluation never uses."""
    data = cfg.data
    train_records = _nonempty_records(data.train_path, data)
    if data.eval_path:
        eval_records = _nonempty_records(data.eval_path, data)
    else:
        train_idx, eval_idx = train_eval_split(len(train_records), data.eval_size, cfg.train.seed)
        eval_records = [train_records[i] for i in eval_idx]
        train_records = [train_records[i] for i in train_idx]
    if data.max_train_records:
        train_records = train_records[: data.max_train_records]
    if not train:
        train_records = []
    stop_id = answer_stop_id(tokenizer, data.answer_end)
    store = token_store(cfg)
    train_records, train_pool = _drop_overlong(
        train_records, stored_tokenize(tokenizer, train_records, stop_id, store), max_tokens, data.train_path
    )
    eval_records, evaluation = _drop_overlong(
        eval_records,
        stored_tokenize(tokenizer, eval_records, stop_id, store),
        max_tokens,
        data.eval_path or data.train_path,
    )
    if train:
        log.info("data: %d training and %d evaluation edits", len(train_records), len(eval_records))
    else:
        log.info("data: %d evaluation edits", len(eval_records))
    return DataPools(train_records, eval_records, train_pool, evaluation)


def model_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow (None if its config does not say)."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def build_engine(cfg: RunConfig, world: LocalWorld | None = None) -> tuple[EditEngine, object]:
    """Load the frozen LM and wrap it in an engine; returns (engine, tokenizer)."""
    device = pick_device(cfg.model.device)
    ds_lm = None
    if cfg.dist.backend == "ray":
        # A distributed worker: the frozen LM under DeepSpeed ZeRO (stage from cfg.dist), forward through
        # engine.module. Imported lazily: deepspeed takes seconds to import and local runs never need it.

        ds_lm = load_frozen_lm_deepspeed(
            cfg.model.source,
            cfg.dist.zero_stage,
            cfg.dist.offload_params,
            cfg.model.dtype,
            cfg.dist.zero3_gather,
        )
        model, tokenizer = ds_lm.model, ds_lm.tokenizer
    else:
        model, tokenizer = load_frozen_lm(cfg.model.source, dtype=cfg.model.dtype, device=str(device))
    engine = engine_for(cfg, model, tokenizer, world or LocalWorld(), device)
    engine.deepspeed = ds_lm  # keeps the DeepSpeed engine (owner of the ZeRO partitions) alive
    return engine, tokenizer


def engine_for(
    cfg: RunConfig,
    model: torch.nn.Module,
    tokenizer,
    world: LocalWorld,
    device: torch.device,
    module_names: list[str] | None = None,
) -> EditEngine:
    """An engine around an already loaded LM (edit modules from the config unless given)."""
    try:
        names = module_names or resolve_edit_modules(
            model, list(cfg.model.edit_modules) or None, cfg.model.n_edit_layers
        )
    except ValueError as err:
        key = (
            "model.edit_modules"
            if cfg.model.edit_modules
            else f"model.n_edit_layers={cfg.model.n_edit_layers}"
        )
        raise ConfigError(f"{key}: {err}") from None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    torch.manual_seed(cfg.train.seed)  # the hypernetwork's init
    return EditEngine(
        cfg, model, pad_id, names, world, device, answer_stop_id(tokenizer, cfg.data.answer_end)
    )
