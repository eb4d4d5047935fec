"""Readers for the zsRE and CounterFact file formats, validating every record into an EditRecord."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from horse_dist.data.records import DataFormatError, EditRecord, first_few

logger = logging.getLogger(__name__)

FORMATS = ("zsre_mend", "zsre_malmen", "zsre_kilt", "counterfact_rome", "counterfact_flat")
TARGETS = ("true", "new")  # edit toward the true object (MALMEN/MEMIT) or the counterfactual (MEND/ROME)
_FILE_SUFFIXES = (".json", ".jsonl")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Fields:
    """A raw record and where it came from, so that every check can name file, record and field."""

    def __init__(self, raw: dict, path: str, index: int, prefix: str = ""):
        self.raw, self.path, self.index, self.prefix = raw, path, index, prefix

    def error(self, key: str, problem: str) -> DataFormatError:
        return DataFormatError(self.path, problem, self.index, self.prefix + key)

    def get(self, key: str) -> Any:
        if key not in self.raw:
            raise self.error(key, f"missing (keys present: {', '.join(map(str, self.raw))})")
        return self.raw[key]

    def answer(self, key: str) -> str:
        """A string that may be empty: emptiness of a target is judged by the caller (drop or fail)."""
        value = self.get(key)
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_type_name(value)}")
        return value.strip()

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            raise self.error(key, f"expected a non-empty string, got {_type_name(value)}")
        if not value.strip():
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        return value.strip()

    def optional_text(self, key: str) -> str:
        return self.answer(key) if key in self.raw else ""

    def strings(self, key: str) -> list[str]:
        value = self.get(key)
        if not isinstance(value, list):
            raise self.error(key, f"expected a non-empty list of strings, got {_type_name(value)}")
        if not value:
            raise self.error(key, "expected a non-empty list of strings, got an empty list")
        for position, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{key}[{position}]", f"expected a string, got {_type_name(item)}")
        return value

    def first_text(self, key: str) -> str:
        first = self.strings(key)[0]
        if not first.strip():
            raise self.error(f"{key}[0]", f"expected a non-empty string, got {first!r}")
        return first.strip()

    def nested(self, key: str) -> _Fields:
        value = self.get(key)
        if not isinstance(value, dict):
            raise self.error(key, f"expected an object, got {_type_name(value)}")
        return _Fields(value, self.path, self.index, f"{self.prefix}{key}.")


# Each parser returns the record and the name of the field its answer came from (for empty-target errors).
Parser = Callable[[_Fields, str], tuple[EditRecord, str]]


def _zsre(f: _Fields, answer: str, answer_field: str) -> tuple[EditRecord, str]:
    record = EditRecord(
        prompt=f.text("src"),
        answer=answer,
        rephrase=f.text("rephrase"),
        loc_prompt=f.text("loc") + "?",  # keeps MEND's "nq question: " prefix, as MEND/MALMEN/HORSE do
        loc_answer=f.text("loc_ans"),
        subject=f.optional_text("subject"),
    )
    return record, answer_field


def _parse_zsre_mend(f: _Fields, target: str) -> tuple[EditRecord, str]:
    answers = f.strings("answers")
    if target == "true":
        return _zsre(f, answers[0].strip(), "answers[0]")
    return _zsre(f, f.answer("alt"), "alt")


def _parse_zsre_malmen(f: _Fields, target: str) -> tuple[EditRecord, str]:
    key = "ans" if target == "true" else "alt"
    return _zsre(f, f.answer(key), key)


class _Skip(Exception):
    """A record the format's own rules leave out (dropped with a count, as MEND does), with the reason."""


def _parse_zsre_kilt(f: _Fields, target: str) -> tuple[EditRecord, str]:
    """MEND's original zsRE files (structured_zeroshot-*-new_annotated_final.jsonl, KILT layout): the
    question `input`, its true answers `output[*].answer`, the QA model's other beams `alternatives` (MEND's
    edit targets) and the back-translated rephrases it answers alike, `filtered_rephrases`. MEND draws a
    random alternative and rephrase at every visit; here the first ones, so a pool is one fixed list. The
    files hold no locality prompts: load_records pairs each record with another's question (MEND's training
    split does so)."""
    question = f.text("input")
    outputs = f.get("output")
    if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], dict):
        raise f.error(
            "output", f"expected a non-empty list of objects with an 'answer', got {outputs!r}"[:200]
        )
    first = _Fields(outputs[0], f.path, f.index, f"{f.prefix}output[0].")
    true_answer = first.answer("answer")
    rephrases = [r.strip() for r in f.get("filtered_rephrases") or [] if isinstance(r, str) and r.strip()]
    rephrases = [r for r in rephrases if r != question]  # MEND removes the question itself
    alternatives = [a.strip() for a in f.get("alternatives") or [] if isinstance(a, str) and a.strip()]
    if not true_answer or not rephrases or (target == "new" and not alternatives):
        raise _Skip("no true answer, alternative answer or filtered rephrase (MEND's filter)")
    provenance = first.raw.get("provenance") or [{}]
    subject = provenance[0].get("title", "") if isinstance(provenance[0], dict) else ""
    key = "output[0].answer" if target == "true" else "alternatives[0]"
    record = EditRecord(
        prompt=question,
        answer=true_answer if target == "true" else alternatives[0],
        rephrase=rephrases[0],
        loc_prompt=question,  # its own, until _pair_locality hands it to another record
        loc_answer=true_answer,
        subject=subject.strip() if isinstance(subject, str) else "",
    )
    return record, key


def _pair_locality(records: list[EditRecord], name: str) -> list[EditRecord]:
    """Record i's unrelated prompt: record (i + n/2) mod n's question with its true answer (zsre_kilt)."""
    n = len(records)
    if n < 2:
        raise DataFormatError(
            name, "a zsre_kilt file needs at least 2 records (each one's locality prompt is another's)"
        )
    return [
        dataclasses.replace(
            r,
            loc_prompt=records[(i + n // 2) % n].loc_prompt,
            loc_answer=records[(i + n // 2) % n].loc_answer,
        )
        for i, r in enumerate(records)
    ]


def _parse_counterfact_rome(f: _Fields, target: str) -> tuple[EditRecord, str]:
    rewrite = f.nested("requested_rewrite")
    template, subject = rewrite.text("prompt"), rewrite.text("subject")
    if "{}" not in template:
        raise rewrite.error("prompt", f"expected a '{{}}' placeholder for the subject, got {template!r}")
    true_answer = rewrite.nested("target_true").answer("str")
    new_answer = rewrite.nested("target_new").answer("str")
    key = "target_true" if target == "true" else "target_new"
    record = EditRecord(
        prompt=template.replace("{}", subject),  # not str.format: other braces in a prompt must survive
        answer=true_answer if target == "true" else new_answer,
        rephrase=f.first_text("paraphrase_prompts"),
        loc_prompt=f.first_text("neighborhood_prompts"),
        loc_answer=true_answer,  # neighbourhood subjects share the true object
        subject=subject,
        other_answer=new_answer if target == "true" else true_answer,
    )
    if not record.loc_answer:
        raise rewrite.error("target_true.str", "expected a non-empty string (it is the locality answer)")
    return record, f"requested_rewrite.{key}.str"


def _parse_counterfact_flat(f: _Fields, target: str) -> tuple[EditRecord, str]:
    key, other = ("ground_truth", "target_new") if target == "true" else ("target_new", "ground_truth")
    record = EditRecord(
        prompt=f.text("prompt"),
        answer=f.answer(key),
        other_answer=f.answer(other),
        rephrase=f.text("rephrase_prompt"),
        loc_prompt=f.text("locality_prompt"),
        loc_answer=f.text("locality_ground_truth"),
        subject=f.optional_text("subject"),
    )
    return record, key


_PARSERS: dict[str, Parser] = {
    "zsre_mend": _parse_zsre_mend,
    "zsre_malmen": _parse_zsre_malmen,
    "zsre_kilt": _parse_zsre_kilt,
    "counterfact_rome": _parse_counterfact_rome,
    "counterfact_flat": _parse_counterfact_flat,
}


def detect_format(record: dict, path: str) -> str:
    """The format of a file, judged from the keys of its first record."""
    if not isinstance(record, dict):
        raise DataFormatError(path, f"expected an object, got {_type_name(record)}", index=0)
    keys = set(record)
    if "requested_rewrite" in keys:
        return "counterfact_rome"
    if {"prompt", "target_new", "ground_truth"} <= keys:
        return "counterfact_flat"
    if {"src", "answers"} <= keys:
        return "zsre_mend"
    if {"src", "ans"} <= keys:
        return "zsre_malmen"
    if {"input", "output", "filtered_rephrases"} <= keys:
        return "zsre_kilt"
    raise DataFormatError(
        path, f"cannot detect the format from keys {sorted(keys)}; pass fmt= one of {FORMATS}", index=0
    )


def read_json(path: Path) -> Any:
    """A .json file's value or a .jsonl file's rows; bad encoding or syntax named as a DataFormatError."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataFormatError(str(path), f"not UTF-8 text (byte {error.start}: {error.reason})") from None
    if path.suffix != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise DataFormatError(str(path), f"not valid JSON ({error})") from error
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataFormatError(str(path), f"line {line_number}: not valid JSON ({error})") from error
    return rows


def _read_hub(spec: str) -> list:
    """`name` or `name:split` (default split "train") through `datasets`; any failure reads as not found."""
    name, _, split = spec.partition(":")
    try:
        import datasets

        return list(datasets.load_dataset(name, split=split or "train"))
    except Exception as error:
        raise FileNotFoundError(
            f"{spec}: no such data file, and loading it as a hub dataset failed ({type(error).__name__}: {error})"
        ) from error


def _read_rows(path: str | Path) -> list:
    file = Path(path)
    if file.is_file():
        rows = read_json(file)
    elif file.suffix in _FILE_SUFFIXES:
        raise FileNotFoundError(f"{path}: no such data file")
    else:
        rows = _read_hub(str(path))
    if not isinstance(rows, list):
        raise DataFormatError(
            str(path), f"expected a JSON list of records at the top level, got {_type_name(rows)}"
        )
    return rows


def load_records(
    path: str | Path,
    fmt: str = "auto",
    target: str = "new",
    drop_empty_targets: bool = True,
    limit: int | None = None,
) -> list[EditRecord]:
    """Read and validate a zsRE / CounterFact file (or hub dataset) into EditRecords, in file order.

    Records whose target answer is empty are dropped with one warning (or rejected if not
    `drop_empty_targets`). `limit` caps the number of records returned; later records are not read.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"{path}: unknown format {fmt!r}; expected 'auto' or one of {FORMATS}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    name = str(path)
    rows = _read_rows(path)
    if not rows:
        return []
    detected = detect_format(rows[0], name) if fmt == "auto" else _layout_of(rows[0])
    if fmt != "auto" and detected not in (None, fmt):
        raise DataFormatError(
            name, f"this file is in {detected} layout, not {fmt}; set data.format=auto or {detected}", index=0
        )
    parse = _PARSERS[fmt if fmt != "auto" else detected]
    records: list[EditRecord] = []
    dropped: list[int] = []
    skipped: dict[str, list[int]] = {}
    for index, raw in enumerate(rows):
        if limit is not None and len(records) >= limit:
            break
        if not isinstance(raw, dict):
            raise DataFormatError(name, f"expected an object, got {_type_name(raw)}", index=index)
        try:
            record, answer_field = parse(_Fields(raw, name, index), target)
        except _Skip as skip:
            skipped.setdefault(str(skip), []).append(index)
            continue
        if record.answer:
            records.append(record)
        elif drop_empty_targets:
            dropped.append(index)
        else:
            raise DataFormatError(name, f"empty target answer (target={target!r})", index, answer_field)
    if dropped:
        logger.warning(
            "%s: dropped %d record(s) with an empty target answer (target=%r): indices %s",
            name,
            len(dropped),
            target,
            first_few(dropped),
        )
    for reason, indices in skipped.items():
        logger.warning(
            "%s: dropped %d record(s): %s: indices %s", name, len(indices), reason, first_few(indices)
        )
    if parse is _parse_zsre_kilt and records:
        records = _pair_locality(records, name)
    _report_duplicates(records, name)
    return records


def _layout_of(record: Any) -> str | None:
    """The detected layout of a first record, or None when it matches none (the named parser then reports
    the missing field)."""
    try:
        return detect_format(record, "")
    except DataFormatError:
        return None


def _report_duplicates(records: list[EditRecord], name: str) -> None:
    """Warn (kept, not dropped: a benchmark's duplicates are part of it) about repeated (prompt, answer)."""
    first: dict[tuple[str, str], int] = {}
    repeats = []
    for index, record in enumerate(records):
        key = (record.prompt, record.answer)
        if key in first:
            repeats.append((first[key], index))
        else:
            first[key] = index
    if repeats:
        logger.warning(
            "%s: %d record(s) repeat an earlier (prompt, answer); kept. First pairs (first, repeat): %s",
            name,
            len(repeats),
            repeats[:5],
        )
