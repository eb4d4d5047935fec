"""The text corpus of the key statistics and its fixed split into shards.

A corpus is a list of non-empty texts in a stable order. Shards are runs of consecutive whole texts of about
`shard_tokens` tokens each; they depend only on the texts, the tokenizer and the sizes, never on the number
of workers, so any worker count computes the same partial sums.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from horse_dist.config import REPO_ROOT
from horse_dist.data import load_records

BUNDLED = "bundled"
BUNDLED_GLOBS = ("data/zsre/*.json", "data/counterfact/*.json")
_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Corpus:
    spec: str  # what built it: "bundled", a path or a hub name (with config/split/column)
    texts: list[str]

    def digest(self) -> str:
        return texts_digest(self.texts)


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # texts[start:stop]
    stop: int
    n_tokens: int  # after truncation to max_length
    digest: str  # of its texts: a saved partial is only reused for the same texts


def texts_digest(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))  # length prefix: no two lists collide by joining
        digest.update(data)
    return digest.hexdigest()


def dedupe(texts: Sequence[str]) -> list[str]:
    """Stripped, non-empty, first occurrence kept, order otherwise unchanged."""
    seen: set[str] = set()
    out = []
    for text in texts:
        text = text.strip()
        if text and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def bundled_texts(root: Path = REPO_ROOT) -> list[str]:
    """Prompt + true answer, rephrase + true answer and locality prompt + its answer of every bundled record.

    Records are taken round-robin over the files (file 0 record 0, file 1 record 0, ...), so any prefix that
    keystats.max_tokens keeps mixes zsRE and CounterFact texts."""
    files = [path for pattern in BUNDLED_GLOBS for path in sorted(root.glob(pattern))]
    if not files:
        raise FileNotFoundError(f"keystats.corpus=bundled: no files match {BUNDLED_GLOBS} under {root}")
    per_file = [load_records(path, target="true") for path in files]
    texts = []
    for i in range(max(len(records) for records in per_file)):
        for records in per_file:
            if i < len(records):
                record = records[i]
                texts += [
                    f"{record.prompt} {record.answer}",
                    f"{record.rephrase} {record.answer}",
                    f"{record.loc_prompt} {record.loc_answer}",
                ]
    return dedupe(texts)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or Path(spec).suffix in _FILE_BUILDERS


def _load_dataset(spec: str, config: str, split: str):
    import datasets  # lazy: slow to import, and only needed for external corpora

    path = Path(spec).expanduser()
    if _looks_like_path(spec) and not path.exists():
        raise FileNotFoundError(f"keystats.corpus={spec!r}: no such file or folder ({path.resolve()})")
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise ValueError(
                    f"keystats.corpus={spec!r}: unknown file type {path.suffix!r}; use one of {sorted(_FILE_BUILDERS)}"
                )
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        return datasets.load_dataset(spec, config or None, split=split)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # hub unreachable, unknown name, bad split ...
        raise ValueError(
            f"keystats.corpus={spec!r} (config {config!r}, split {split!r}) could not be loaded as a datasets "
            f"text dataset: {type(err).__name__}: {err}"
        ) from err


def dataset_texts(spec: str, config: str = "", split: str = "train", column: str = "text") -> list[str]:
    dataset = _load_dataset(spec, config, split)
    if column not in dataset.column_names:
        raise ValueError(
            f"keystats.corpus={spec!r}: no column {column!r} (columns: {dataset.column_names}); "
            "set keystats.text_column"
        )
    texts = dataset[column]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"keystats.corpus={spec!r}: row {bad} column {column!r} is not a string")
    return dedupe(texts)


def build_corpus(spec: str, config: str = "", split: str = "train", column: str = "text") -> Corpus:
    if spec == BUNDLED:
        return Corpus(BUNDLED, bundled_texts())
    texts = dataset_texts(spec, config, split, column)
    if not texts:
        raise ValueError(f"keystats.corpus={spec!r}: no non-empty texts in column {column!r}")
    described = json.dumps(
        {"source": spec, "config": config, "split": split, "column": column}, sort_keys=True
    )
    return Corpus(described, texts)


def plan_shards(
    token_counts: Sequence[int], texts: Sequence[str], shard_tokens: int, max_tokens: int
) -> list[Shard]:
    """Consecutive texts, ≤ shard_tokens per shard (one longer text gets a shard of its own), over the
    longest corpus prefix of ≤ max_tokens tokens (0: all). Texts with no tokens are kept inside shards."""
    if shard_tokens <= 0:
        raise ValueError(f"keystats.shard_tokens must be positive, got {shard_tokens}")
    if len(token_counts) != len(texts):
        raise ValueError(f"{len(token_counts)} token counts for {len(texts)} texts")
    shards: list[Shard] = []
    start, in_shard, total, stop = 0, 0, 0, len(texts)
    for i, n in enumerate(token_counts):
        if max_tokens and total + n > max_tokens:
            stop = i
            break
        if in_shard and in_shard + n > shard_tokens:
            shards.append(Shard(len(shards), start, i, in_shard, texts_digest(texts[start:i])))
            start, in_shard = i, 0
        in_shard += n
        total += n
    if stop > start:
        shards.append(Shard(len(shards), start, stop, in_shard, texts_digest(texts[start:stop])))
    return shards


def shards_json(shards: Sequence[Shard]) -> list[dict]:
    return [asdict(shard) for shard in shards]
