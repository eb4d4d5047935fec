"""Tokenised pools on disk, memory-mapped: tokenise once per (records, tokenizer, answer end), then every
process that needs the same pool (a restart, a resume, the other workers on the node) maps the files.

At zsRE's 155k training records, tokenising takes minutes of CPU and holds ~1.2 GiB of Python lists per
process; the store is four flat arrays per view (ids, labels, offsets, stop flags; int32 where they are
ids), read through the page cache and shared by every process that maps them. `StoredView` hands out
TokenizedExamples on indexing, so the code that reads pools does not know where they came from.

Layout: <store>/<key>/<view>.{ids,labels,offsets,stop}.npy and meta.json, written into a temporary folder
renamed into place (a folder that exists is complete; two writers racing keep the first).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from horse_dist.data.records import EditRecord, records_fingerprint
from horse_dist.data.tokenize import (
    CONTRAST_VIEWS,
    VIEWS,
    ContrastViews,
    TokenizedExample,
    TokenizedRecords,
    tokenize_records,
)
from horse_dist.fs import file_lock

log = logging.getLogger(__name__)

STORE_VERSION = "1"  # bump when the tokenisation or the layout changes: old folders are then never read
_PARTS = ("ids", "labels", "offsets", "stop")


class StoredView(Sequence[TokenizedExample]):
    """One view (edit, equiv, ...) of a stored pool: `rows` of the flat arrays, as TokenizedExamples."""

    def __init__(self, arrays: dict[str, np.ndarray], rows: np.ndarray | None = None) -> None:
        self.arrays = arrays
        self.rows = np.arange(len(arrays["stop"])) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def _example(self, row: int) -> TokenizedExample:
        start, end = int(self.arrays["offsets"][row]), int(self.arrays["offsets"][row + 1])
        return TokenizedExample(
            input_ids=self.arrays["ids"][start:end].tolist(),
            labels=self.arrays["labels"][start:end].tolist(),
            ends_with_stop=bool(self.arrays["stop"][row]),
        )

    def __getitem__(self, index):  # int -> TokenizedExample; slice -> StoredView
        if isinstance(index, slice):
            return StoredView(self.arrays, self.rows[index])
        return self._example(int(self.rows[index]))

    def __iter__(self) -> Iterator[TokenizedExample]:
        return (self._example(int(row)) for row in self.rows)

    def __eq__(self, other: object) -> bool:  # as the list of examples it stands for
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # mutable-list semantics, as list

    def __add__(self, other: Sequence[TokenizedExample]) -> list[TokenizedExample]:
        return [*self, *other]

    def __radd__(self, other: Sequence[TokenizedExample]) -> list[TokenizedExample]:
        return [*other, *self]

    def select(self, keep: Sequence[int]) -> StoredView:
        return StoredView(self.arrays, self.rows[np.asarray(keep, dtype=np.int64)])

    def lengths(self) -> np.ndarray:
        offsets = self.arrays["offsets"]
        return offsets[self.rows + 1] - offsets[self.rows]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what decides the ids: the tokenizer's full definition (vocabulary, merges, normaliser,
    post-processor) where it has one, else its vocabulary and special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def store_key(records: Sequence[EditRecord], tokenizer: PreTrainedTokenizerBase, stop_id: int | None) -> str:
    digest = hashlib.sha256(f"v{STORE_VERSION}:{stop_id}".encode())
    digest.update(records_fingerprint(records).encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    return digest.hexdigest()[:32]


def _flatten(examples: Sequence[TokenizedExample]) -> dict[str, np.ndarray]:
    lengths = [len(e.input_ids) for e in examples]
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return {
        "ids": np.fromiter((t for e in examples for t in e.input_ids), np.int32, int(offsets[-1])),
        "labels": np.fromiter((t for e in examples for t in e.labels), np.int32, int(offsets[-1])),
        "offsets": offsets,
        "stop": np.fromiter((e.ends_with_stop for e in examples), np.bool_, len(examples)),
    }


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One view's flat arrays from its chunks' (offsets shifted to the joined ids)."""
    starts = np.cumsum([0] + [int(c["offsets"][-1]) for c in chunks[:-1]])
    offsets = [np.zeros(1, np.int64)] + [c["offsets"][1:] + start for c, start in zip(chunks, starts)]
    joined = {part: np.concatenate([c[part] for c in chunks]) for part in ("ids", "labels", "stop")}
    return {**joined, "offsets": np.concatenate(offsets)}


def flat_views(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[EditRecord], stop_id: int | None, chunk: int
) -> dict[str, dict[str, np.ndarray]]:
    """tokenize_records' views as flat arrays, tokenised `chunk` records at a time: the Python lists of one
    chunk are alive at once, not the pool's (~0.5 GiB at 155k records)."""
    contrast = all(r.other_answer for r in records)  # the whole pool's rule, not each chunk's
    names = VIEWS + CONTRAST_VIEWS if contrast else VIEWS
    chunks: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in names}
    for start in range(0, len(records), chunk):
        pool = tokenize_records(tokenizer, records[start : start + chunk], stop_id)
        for name in names:
            source = pool.contrast if name in CONTRAST_VIEWS else pool
            chunks[name].append(_flatten(getattr(source, name)))
    return {name: _concat(parts) for name, parts in chunks.items()}


def save_pool(views: dict[str, dict[str, np.ndarray]], folder: Path) -> None:
    """Write a pool's flat views to `folder` through a temporary sibling renamed into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.tmp"
    temporary.mkdir()
    try:
        for view, arrays in views.items():
            for part, array in arrays.items():
                np.save(temporary / f"{view}.{part}.npy", array)
        meta = {"version": STORE_VERSION, "records": len(views["edit"]["stop"]), "views": sorted(views)}
        (temporary / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(temporary, folder)
        except OSError:
            if not (folder / "meta.json").exists():
                raise
            log.info("token store %s was written by another process meanwhile; using it", folder)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)  # ours: the rename failed or another writer won


def load_pool(folder: Path) -> TokenizedRecords:
    """The pool stored in `folder`, memory-mapped."""
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("version") != STORE_VERSION:
        raise ValueError(f"{folder}: store version {meta.get('version')!r}, expected {STORE_VERSION!r}")
    views = {
        view: StoredView({part: np.load(folder / f"{view}.{part}.npy", mmap_mode="r") for part in _PARTS})
        for view in meta["views"]
    }
    contrast = None
    if all(v in views for v in CONTRAST_VIEWS):
        contrast = ContrastViews(*(views[v] for v in CONTRAST_VIEWS))
    return TokenizedRecords(*(views[v] for v in VIEWS), contrast=contrast)


def stored_tokenize(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[EditRecord],
    stop_id: int | None,
    store: Path | None,
    chunk: int = 16384,
) -> TokenizedRecords:
    """tokenize_records through the store under `store` (None: in memory, as tokenize_records)."""
    if store is None or not records:
        return tokenize_records(tokenizer, records, stop_id)
    folder = store / store_key(records, tokenizer, stop_id)
    if not (folder / "meta.json").exists():
        store.mkdir(parents=True, exist_ok=True)
        with file_lock(store / f".{folder.name}.lock"):  # workers starting together: one tokenises
            if not (folder / "meta.json").exists():
                started = time.perf_counter()
                save_pool(flat_views(tokenizer, records, stop_id, chunk), folder)
                seconds = time.perf_counter() - started
                log.info("tokenised %d records into %s in %.1fs", len(records), folder, seconds)
    try:
        pool = load_pool(folder)
        if len(pool.edit) != len(records):
            raise ValueError(f"holds {len(pool.edit)} records, expected {len(records)}")
    except (OSError, ValueError, EOFError) as err:  # damaged by hand or by a crash: a cache, never fatal
        log.warning(
            "token store %s is unreadable (%s); tokenising in memory (remove it to rebuild)", folder, err
        )
        return tokenize_records(tokenizer, records, stop_id)
    return pool
