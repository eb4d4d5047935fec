"""The edit record every reader produces, and the error every reader raises on bad input."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class EditRecord:
    """One fact to edit, with the prompts used to test generalisation and locality."""

    prompt: str  # edit prompt
    answer: str  # target answer (chosen by the loader's `target`), stripped
    rephrase: str  # equivalent prompt (generalisation)
    loc_prompt: str  # unrelated prompt (locality)
    loc_answer: str  # its answer
    subject: str = ""
    # the answer the edit replaces (CounterFact: the other of true/new), for ROME's contrast scores; "" if none
    other_answer: str = ""


def first_few(indices: Sequence[int], n: int = 10) -> str:
    """The first `n` of a list of record indices for a log line (a 155k-record file may drop thousands)."""
    return f"{list(indices[:n])}{' ...' if len(indices) > n else ''}"


def records_fingerprint(records: Sequence[EditRecord]) -> str:
    """sha256 of the records' text in order: a meta-batch's records are indices into this list, so a resumed
    run must see the same one."""
    digest = hashlib.sha256(str(len(records)).encode())
    names = [f.name for f in fields(EditRecord)]  # astuple's order, without its deep copies (4x faster)
    for record in records:
        digest.update("\x1f".join([getattr(record, name) for name in names]).encode() + b"\x1e")
    return digest.hexdigest()


class DataFormatError(ValueError):
    """A data file does not have the expected shape; the message names file, record index and field."""

    def __init__(self, path: str, problem: str, index: int | None = None, field: str | None = None):
        self.path, self.index, self.field = path, index, field
        where = [path]
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join([*where, problem]))
