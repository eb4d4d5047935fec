"""The memory-mapped token store: the same examples as tokenising in memory, found again by its key, written
atomically, and used by a training run so that a restart never tokenises again."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import horse_dist.data.token_store as token_store
from horse_dist.data import (
    StoredView,
    answer_stop_id,
    load_records,
    overlong,
    select_records,
    stored_tokenize,
    tokenize_records,
)
from horse_dist.lm.tiny_tokenizers import build_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer()


def assert_same_view(stored, memory) -> None:
    assert len(stored) == len(memory)
    for a, b in zip(stored, memory):
        assert (a.input_ids, a.labels, a.ends_with_stop) == (b.input_ids, b.labels, b.ends_with_stop)


@pytest.mark.parametrize("source", ["zsre/zsre_mend_eval_head.json", "counterfact/counterfact_head.json"])
def test_stored_pool_equals_the_tokenised_one(tokenizer, tmp_path, source):
    records = load_records(DATA / source, target="new", limit=40)
    stop = answer_stop_id(tokenizer, "eos")
    memory = tokenize_records(tokenizer, records, stop)
    stored = stored_tokenize(tokenizer, records, stop, tmp_path, chunk=7)  # tokenised 7 records at a time
    assert isinstance(stored.edit, StoredView) and stored.edit.arrays["ids"].dtype == np.int32
    assert (stored.contrast is None) == (memory.contrast is None) == source.startswith("zsre")
    for view_s, view_m in zip(stored.all_views(), memory.all_views()):
        assert_same_view(view_s, view_m)
    keep = [7, 3, 30]
    for view_s, view_m in zip(
        select_records(stored, keep).all_views(), select_records(memory, keep).all_views()
    ):
        assert_same_view(view_s, view_m)
    assert_same_view(stored.unrel[5:9], memory.unrel[5:9])
    assert_same_view(stored.edit + memory.edit[:2], memory.edit + memory.edit[:2])
    longest = max(len(e.input_ids) for view in memory.all_views() for e in view)
    for limit in (longest - 3, longest, 12):
        assert overlong(stored, limit) == overlong(memory, limit)
    assert overlong(stored, longest - 3)  # the comparison is not vacuous


def test_the_store_is_found_again_and_keyed_on_records_tokenizer_and_stop(tokenizer, tmp_path, monkeypatch):
    records = load_records(DATA / "zsre/zsre_mend_eval_head.json", target="new", limit=20)
    stored = stored_tokenize(tokenizer, records, None, tmp_path)
    folder, lock = sorted(tmp_path.iterdir(), key=lambda p: p.name.startswith("."))
    assert lock.name == f".{folder.name}.lock"  # the first process tokenises, the others wait on it
    parts = ("ids", "labels", "offsets", "stop")
    expected = {f"{v}.{p}.npy" for v in ("edit", "equiv", "unrel") for p in parts} | {"meta.json"}
    assert {p.name for p in folder.iterdir()} == expected

    def refuse(*_):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(token_store, "tokenize_records", refuse)
    again = stored_tokenize(tokenizer, records, None, tmp_path)  # mapped, not tokenised
    assert_same_view(again.equiv, stored.equiv)
    for other in ((records[:19], None), (records, answer_stop_id(tokenizer, "eos"))):
        with pytest.raises(AssertionError, match="tokenised again"):
            stored_tokenize(tokenizer, *other, tmp_path)
    assert token_store.store_key(records, tokenizer, None) == folder.name


def test_a_racing_writer_keeps_the_first_store_and_leaves_no_temporary(tokenizer, tmp_path):
    records = load_records(DATA / "zsre/zsre_mend_eval_head.json", target="new", limit=8)
    folder = tmp_path / "key"
    token_store.save_pool(token_store.flat_views(tokenizer, records, None, chunk=3), folder)
    first = (folder / "edit.ids.npy").stat().st_mtime_ns
    token_store.save_pool(
        token_store.flat_views(tokenizer, records[:2], None, chunk=3), folder
    )  # lost the race
    assert (folder / "edit.ids.npy").stat().st_mtime_ns == first and len(
        token_store.load_pool(folder).edit
    ) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["key"]
    (folder / "meta.json").write_text(json.dumps({"version": "0", "views": []}))
    with pytest.raises(ValueError, match="store version '0', expected '1'"):
        token_store.load_pool(folder)


@pytest.mark.slow
def test_scale_bench_reports_a_first_run_that_tokenises_and_a_restart_that_maps(tiny_dir, tmp_path):
    """launch/scale_bench.py as documented, at 4,000 records on the tiny model."""
    out = tmp_path / "scale"
    command = [sys.executable, "launch/scale_bench.py", "--records", "4000", "--out", str(out)]
    subprocess.run([*command, f"model.source={tiny_dir}", "model.n_edit_layers=2"], cwd=REPO, check=True)
    report = json.loads((out / "scale.json").read_text())
    bundled, first, stored = report["runs"]
    rows = json.loads((out / "zsre_synthetic_4000.json").read_text())
    assert len(rows) == 4000 and len({r["src"] for r in rows}) > 3900  # distinct subjects, distinct prompts
    assert len(first["tokenise_s"]) == 1 and "tokenise_s" not in stored  # the restart maps the store
    assert all(0 < r["to_step_1_s"] < r["total_s"] and r["peak_rss_gb"] > 0 for r in report["runs"])
    assert "training records need" in first["block_cache"] and bundled["run"] == "bundled"
    assert report["data_rss_gb"] == pytest.approx(stored["peak_rss_gb"] - bundled["peak_rss_gb"], abs=1e-3)
    code = subprocess.run(command, cwd=REPO, capture_output=True, text=True)  # never reuses run folders
    assert code.returncode == 1 and "exists: choose another --out" in code.stderr


def test_a_damaged_store_is_never_fatal_the_pool_is_tokenised_in_memory(tokenizer, tmp_path, caplog):
    records = load_records(DATA / "zsre/zsre_mend_eval_head.json", target="new", limit=12)
    stored_tokenize(tokenizer, records, None, tmp_path)
    folder = tmp_path / token_store.store_key(records, tokenizer, None)
    (folder / "equiv.ids.npy").write_bytes(b"\x93NUMPY truncated")
    with caplog.at_level("WARNING"):
        pool = stored_tokenize(tokenizer, records, None, tmp_path)
    assert f"token store {folder} is unreadable" in caplog.text and not isinstance(pool.equiv, StoredView)
    assert_same_view(pool.equiv, tokenize_records(tokenizer, records).equiv)
    assert (folder / "meta.json").exists()  # left for the user to remove: nothing is deleted behind them
