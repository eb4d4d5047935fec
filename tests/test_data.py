"""Readers (all four formats, every validation error), batching and the deterministic index plans."""

import json
import logging
from pathlib import Path

import datasets
import pytest
import torch

from horse_dist.data import (
    DataFormatError,
    EditRecord,
    TokenizedExample,
    collate,
    detect_format,
    first_few,
    load_records,
    meta_batch_indices,
    micro_batches,
    partition,
    shard_slice,
    steps_per_epoch,
    train_eval_split,
)

DATA = Path(__file__).resolve().parents[1] / "data"
ZSRE_HEAD = DATA / "zsre" / "zsre_mend_eval_head.json"
ZSRE_TAIL = DATA / "zsre" / "zsre_mend_eval_tail.json"
COUNTERFACT = DATA / "counterfact" / "counterfact_head.json"
EMPTY_ALT_INDICES = [54, 103, 1101, 1135, 1289, 1377, 1584, 1814]

ZSRE_MEND = {
    "subject": "Watts Humphrey",
    "src": "What university did Watts Humphrey attend?",
    "pred": "Trinity College",
    "rephrase": "What university did Watts Humphrey take part in?",
    "alt": " University of Michigan",
    "answers": ["Illinois Institute of Technology", "IIT"],
    "loc": "nq question: who played desmond doss father in hacksaw ridge",
    "loc_ans": "Hugo Weaving",
    "cond": "Trinity College >>  University of Michigan || What university did Watts Humphrey attend?",
}
ZSRE_MALMEN = {
    "src": "What is the capital of France?",
    "rephrase": "Which city is France's capital?",
    "ans": "Paris",
    "alt": "Lyon",
    "loc": "nq question: who wrote hamlet",
    "loc_ans": "Shakespeare",
}
COUNTERFACT_ROME = {
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Danielle Darrieux speaks the language of", "Darrieux's mother tongue is"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Jean Gabin speaks"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
COUNTERFACT_FLAT = {
    "case_id": 0,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}


def write_json(tmp_path: Path, rows: object, name: str = "records.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


# --- the four formats -------------------------------------------------------------------------------


def test_zsre_mend_bundled_toward_new_target():
    records = load_records(ZSRE_HEAD, target="new")
    assert len(records) == 2039 - 8
    assert records[0] == EditRecord(
        prompt="What university did Watts Humphrey attend?",
        answer="University of Michigan",
        rephrase="What university did Watts Humphrey take part in?",
        loc_prompt="nq question: who played desmond doss father in hacksaw ridge?",
        loc_answer="Hugo Weaving",
        subject="Watts Humphrey",
    )
    raw = json.loads(ZSRE_HEAD.read_text())
    spaced = next(i for i, row in enumerate(raw) if row["alt"].startswith(" "))
    kept_position = spaced - sum(i < spaced for i in EMPTY_ALT_INDICES)
    assert records[kept_position].answer == raw[spaced]["alt"].strip() != raw[spaced]["alt"]
    assert all(r.loc_prompt.startswith("nq question: ") and r.loc_prompt.endswith("?") for r in records)


def test_zsre_mend_bundled_toward_true_target_keeps_every_record(caplog):
    with caplog.at_level(logging.WARNING):
        records = load_records(ZSRE_HEAD, target="true")
    assert len(records) == 2039
    assert records[0].answer == "Illinois Institute of Technology"
    assert records[54].subject == "Phyllis Chan"  # an empty-alt record, kept because its true answer exists
    assert caplog.records == []
    assert len(load_records(ZSRE_TAIL, target="true")) == 384


def test_zsre_mend_uses_first_of_several_answers(tmp_path):
    (record,) = load_records(write_json(tmp_path, [ZSRE_MEND]), target="true")
    assert record.answer == "Illinois Institute of Technology"
    assert load_records(write_json(tmp_path, [ZSRE_MEND]), target="new")[0].answer == "University of Michigan"


def test_empty_targets_are_dropped_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="horse_dist.data.formats"):
        records = load_records(ZSRE_HEAD, target="new")
    assert len(records) == 2031
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    message = caplog.records[0].getMessage()
    assert str(ZSRE_HEAD) in message
    assert (
        f"dropped 8 record(s) with an empty target answer (target='new'): indices {EMPTY_ALT_INDICES}"
        in message
    )


def test_empty_target_is_an_error_when_not_dropping():
    with pytest.raises(DataFormatError) as error:
        load_records(ZSRE_HEAD, target="new", drop_empty_targets=False)
    assert str(error.value) == f"{ZSRE_HEAD}: record 54: field 'alt': empty target answer (target='new')"


def test_limit_counts_kept_records_and_stops_reading(caplog):
    with caplog.at_level(logging.WARNING):
        records = load_records(ZSRE_HEAD, target="new", limit=60)
    assert len(records) == 60
    raw = json.loads(ZSRE_HEAD.read_text())
    assert [r.prompt for r in records] == [row["src"] for row in raw[:61] if row["alt"]]
    assert caplog.records[0].getMessage().endswith("indices [54]")  # later empty targets were never read
    assert load_records(ZSRE_HEAD, limit=0) == []


def test_long_index_lists_are_cut_in_log_lines():
    assert first_few([3, 5]) == "[3, 5]"
    assert first_few(list(range(155_000))) == "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9] ..."


def test_counterfact_flat_bundled_both_targets():
    new = load_records(COUNTERFACT, target="new")
    true = load_records(COUNTERFACT, target="true")
    assert len(new) == len(true) == 2000
    assert new[0] == EditRecord(
        prompt="The mother tongue of Danielle Darrieux is",
        answer="English",
        rephrase="Where Danielle Darrieux is from, people speak the language of",
        loc_prompt="Michel Rocard is a native speaker of",
        loc_answer="French",
        subject="Danielle Darrieux",
        other_answer="French",
    )
    assert (true[0].answer, true[0].other_answer) == ("French", "English")
    assert all(r.answer != t.answer for r, t in zip(new, true))
    assert all((r.answer, r.other_answer) == (t.other_answer, t.answer) for r, t in zip(new, true))


def test_zsre_malmen_both_targets(tmp_path):
    path = write_json(tmp_path, [ZSRE_MALMEN])
    assert load_records(path, target="true") == [
        EditRecord(
            prompt="What is the capital of France?",
            answer="Paris",
            rephrase="Which city is France's capital?",
            loc_prompt="nq question: who wrote hamlet?",
            loc_answer="Shakespeare",
        )
    ]
    assert load_records(path, target="new")[0].answer == "Lyon"
    without_alt = write_json(tmp_path, [{k: v for k, v in ZSRE_MALMEN.items() if k != "alt"}])
    assert load_records(without_alt, target="true")[0].answer == "Paris"
    with pytest.raises(DataFormatError, match=r"records\.json: record 0: field 'alt': missing"):
        load_records(without_alt, target="new")


def test_counterfact_rome_both_targets(tmp_path):
    path = write_json(tmp_path, [COUNTERFACT_ROME])
    expected = EditRecord(
        prompt="The mother tongue of Danielle Darrieux is",
        answer="English",
        rephrase="Danielle Darrieux speaks the language of",
        loc_prompt="Michel Rocard is a native speaker of",
        loc_answer="French",
        subject="Danielle Darrieux",
        other_answer="French",
    )
    assert load_records(path, target="new") == [expected]
    true = load_records(path, target="true")[0]
    assert (true.answer, true.other_answer) == ("French", "English")


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        (ZSRE_MEND, "zsre_mend"),
        (ZSRE_MALMEN, "zsre_malmen"),
        (COUNTERFACT_ROME, "counterfact_rome"),
        (COUNTERFACT_FLAT, "counterfact_flat"),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format(record, "x.json") == fmt


def test_detect_format_on_bundled_files():
    assert detect_format(json.loads(ZSRE_HEAD.read_text())[0], str(ZSRE_HEAD)) == "zsre_mend"
    assert detect_format(json.loads(COUNTERFACT.read_text())[0], str(COUNTERFACT)) == "counterfact_flat"


def test_an_explicit_format_that_contradicts_the_file_names_its_layout(tmp_path):
    path = write_json(tmp_path, [ZSRE_MEND])
    with pytest.raises(DataFormatError, match=r"record 0: this file is in zsre_mend layout, not zsre_malmen"):
        load_records(path, fmt="zsre_malmen", target="true")
    # a layout nothing detects is read by the named parser, which names the missing field
    path = write_json(tmp_path, [{k: v for k, v in ZSRE_MEND.items() if k != "answers"}])
    with pytest.raises(DataFormatError, match=r"record 0: field 'answers': missing"):
        load_records(path, fmt="zsre_mend", target="true")


def test_jsonl_and_empty_files(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [COUNTERFACT_FLAT, COUNTERFACT_FLAT]) + "\n\n")
    assert len(load_records(path)) == 2
    assert load_records(write_json(tmp_path, [])) == []


def test_hub_dataset_name_goes_through_datasets(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [COUNTERFACT_FLAT]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_records("someone/counterfact:validation")[0].answer == "English"
    assert load_records("someone/counterfact")[0].answer == "English"
    assert calls == [("someone/counterfact", "validation"), ("someone/counterfact", "train")]


# --- malformed input --------------------------------------------------------------------------------


MISSING = object()  # a change that removes the field


def changed(base: dict, **changes: object) -> dict:
    record = {key: value for key, value in base.items() if changes.get(key) is not MISSING}
    record.update({key: value for key, value in changes.items() if value is not MISSING})
    return record


REWRITE = COUNTERFACT_ROME["requested_rewrite"]


@pytest.mark.parametrize(
    ("base", "changes", "target", "field", "problem"),
    [
        (
            ZSRE_MEND,
            {"rephrase": MISSING},
            "new",
            "rephrase",
            "missing (keys present: subject, src, pred, alt,",
        ),
        (ZSRE_MEND, {"rephrase": 3}, "new", "rephrase", "expected a non-empty string, got int"),
        (ZSRE_MEND, {"src": ""}, "new", "src", "expected a non-empty string, got ''"),
        (ZSRE_MEND, {"loc": "   "}, "new", "loc", "expected a non-empty string, got '   '"),
        (ZSRE_MEND, {"loc_ans": ""}, "new", "loc_ans", "expected a non-empty string, got ''"),
        (ZSRE_MEND, {"answers": "Paris"}, "true", "answers", "expected a non-empty list of strings, got str"),
        (
            ZSRE_MEND,
            {"answers": []},
            "true",
            "answers",
            "expected a non-empty list of strings, got an empty list",
        ),
        (ZSRE_MEND, {"answers": ["Paris", 7]}, "true", "answers[1]", "expected a string, got int"),
        (ZSRE_MEND, {"alt": None}, "new", "alt", "expected a string, got null"),
        (ZSRE_MEND, {"subject": 5}, "new", "subject", "expected a string, got int"),
        (
            ZSRE_MALMEN,
            {"ans": MISSING},
            "true",
            "ans",
            "missing (keys present: src, rephrase, alt, loc, loc_ans)",
        ),
        (COUNTERFACT_FLAT, {"locality_ground_truth": MISSING}, "new", "locality_ground_truth", "missing"),
        (COUNTERFACT_FLAT, {"prompt": "  "}, "new", "prompt", "expected a non-empty string, got '  '"),
        (COUNTERFACT_FLAT, {"target_new": 1.5}, "new", "target_new", "expected a string, got float"),
        (
            COUNTERFACT_ROME,
            {"requested_rewrite": "x {}"},
            "new",
            "requested_rewrite",
            "expected an object, got str",
        ),
        (
            COUNTERFACT_ROME,
            {"paraphrase_prompts": []},
            "new",
            "paraphrase_prompts",
            "expected a non-empty list of strings, got an empty list",
        ),
        (
            COUNTERFACT_ROME,
            {"neighborhood_prompts": [""]},
            "new",
            "neighborhood_prompts[0]",
            "expected a non-empty string, got ''",
        ),
        (
            COUNTERFACT_ROME,
            {"requested_rewrite": changed(REWRITE, target_new=MISSING)},
            "new",
            "requested_rewrite.target_new",
            "missing (keys present: prompt, relation_id, target_true, subject)",
        ),
        (
            COUNTERFACT_ROME,
            {"requested_rewrite": changed(REWRITE, target_true={"id": "Q150"})},
            "true",
            "requested_rewrite.target_true.str",
            "missing (keys present: id)",
        ),
        (
            COUNTERFACT_ROME,
            {"requested_rewrite": changed(REWRITE, prompt="Darrieux speaks")},
            "new",
            "requested_rewrite.prompt",
            "expected a '{}' placeholder for the subject, got 'Darrieux speaks'",
        ),
    ],
)
def test_malformed_record_names_file_index_and_field(tmp_path, base, changes, target, field, problem):
    path = write_json(tmp_path, [base, changed(base, **changes)])
    with pytest.raises(DataFormatError) as error:
        load_records(path, target=target)
    assert str(error.value).startswith(f"{path}: record 1: field {field!r}: {problem}")
    assert (error.value.path, error.value.index, error.value.field) == (str(path), 1, field)


def test_non_dict_record(tmp_path):
    path = write_json(tmp_path, [ZSRE_MEND, ["not", "a", "record"]])
    with pytest.raises(DataFormatError) as error:
        load_records(path)
    assert str(error.value) == f"{path}: record 1: expected an object, got list"


def test_top_level_not_a_list(tmp_path):
    path = write_json(tmp_path, {"data": [ZSRE_MEND]})
    with pytest.raises(DataFormatError) as error:
        load_records(path)
    assert str(error.value) == f"{path}: expected a JSON list of records at the top level, got dict"


def test_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"src": ')
    with pytest.raises(DataFormatError, match=r"broken\.json: not valid JSON"):
        load_records(path)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError) as error:
        load_records(path)
    assert str(error.value) == f"{path}: no such data file"


def test_unreachable_hub_dataset_reads_as_missing_file(monkeypatch):
    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError) as error:
        load_records("someone/zsre")
    assert str(error.value).startswith(
        "someone/zsre: no such data file, and loading it as a hub dataset failed"
    )
    assert "ConnectionError" in str(error.value)


def test_unknown_format_argument_and_undetectable_keys(tmp_path):
    path = write_json(tmp_path, [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"records\.json: unknown format 'zsre'; expected 'auto' or one of"):
        load_records(path, fmt="zsre")
    with pytest.raises(DataFormatError) as error:
        load_records(path)
    assert str(error.value).startswith(
        f"{path}: record 0: cannot detect the format from keys ['answer', 'question']; pass fmt= one of"
    )


def test_bad_target_value():
    with pytest.raises(ValueError) as error:
        load_records(ZSRE_HEAD, target="old")
    assert str(error.value) == "target must be one of ('true', 'new'), got 'old'"


# --- batching ---------------------------------------------------------------------------------------


def example(input_ids: list[int], n_answer: int) -> TokenizedExample:
    n_prompt = len(input_ids) + 1 - n_answer
    answer = [100 + i for i in range(n_answer)]
    return TokenizedExample(input_ids, [-100] * (n_prompt - 1) + answer)


def test_collate_pads_right_and_masks_labels():
    batch = collate([example([5, 6, 7], 2), example([8, 9], 1)], [4, 2], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.labels.tolist() == [[-100, 100, 101], [-100, 100, -100]]
    assert batch.example_ids.tolist() == [4, 2]
    assert batch.num_answer_tokens == 3
    assert all(t.dtype == torch.long for t in vars(batch).values() if t is not None)
    assert not batch.packed and batch.visible_until is None and batch.position_ids is None
    moved = batch.to("cpu")
    assert moved.labels.tolist() == batch.labels.tolist() and moved.example_ids.tolist() == [4, 2]


def test_collate_uses_the_given_pad_id():
    batch = collate([example([5], 1), example([8, 9], 1)], [0, 1], pad_id=3)
    assert batch.input_ids.tolist() == [[5, 3], [8, 9]]


def test_micro_batches_sort_longest_first_and_cover_every_example_once():
    examples = [example([1] * n, 1) for n in (2, 5, 3, 5, 1)]
    batches = micro_batches(examples, batch_size=2, pad_id=0)
    assert [b.example_ids.tolist() for b in batches] == [[1, 3], [2, 0], [4]]
    assert [b.input_ids.shape[1] for b in batches] == [5, 3, 1]
    assert sorted(i for b in batches for i in b.example_ids.tolist()) == list(range(5))
    assert sum(b.num_answer_tokens for b in batches) == 5
    assert micro_batches([], batch_size=2, pad_id=0) == []
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        micro_batches(examples, batch_size=0, pad_id=0)


def test_micro_batches_respect_the_padded_token_budget():
    examples = [example([1] * n, 1) for n in (10, 2, 3, 9, 2, 2)]
    batches = micro_batches(examples, batch_size=4, pad_id=0, max_tokens=20)
    # sorted lengths 10, 9, 3, 2, 2, 2: [10, 9] pads to 20 tokens; [3, 2, 2, 2] pads to 12 (4 rows max)
    assert [b.example_ids.tolist() for b in batches] == [[0, 3], [2, 1, 4, 5]]
    assert all(b.input_ids.numel() <= 20 for b in batches)
    # a single row longer than the budget still gets a batch of its own
    assert [b.input_ids.shape for b in micro_batches([example([1] * 30, 1)], 4, 0, max_tokens=20)] == [
        (1, 30)
    ]


def test_meta_batch_indices_is_a_pure_function_of_seed_and_step():
    pool, n = 10, 3
    assert steps_per_epoch(pool, n) == 3
    first_epoch = [meta_batch_indices(pool, n, seed=0, step=s) for s in range(3)]
    assert first_epoch == [[9, 5, 3], [4, 1, 7], [8, 2, 0]]  # pinned: a resumed run must draw the same edits
    flat = [i for batch in first_epoch for i in batch]
    assert len(set(flat)) == 9  # disjoint within an epoch, no duplicates within a batch
    assert meta_batch_indices(pool, n, seed=0, step=3) == [1, 2, 4]  # the next epoch reshuffles
    assert meta_batch_indices(pool, n, seed=1, step=0) != first_epoch[0]
    assert [meta_batch_indices(pool, n, seed=0, step=s) for s in range(3)] == first_epoch
    big = [meta_batch_indices(1000, 64, seed=7, step=s) for s in range(40)]
    assert all(len(set(b)) == 64 and all(0 <= i < 1000 for i in b) for b in big)
    assert big[0] != big[1]


def test_partitions_keep_each_record_on_one_worker_across_epochs():
    pool, n, parts = 23, 6, 2  # partitions of 12 and 11 records, 3 of each per meta-batch
    blocks = [partition(pool, 0, parts, p) for p in range(parts)]
    assert sorted(blocks[0] + blocks[1]) == list(range(pool)) and [len(b) for b in blocks] == [12, 11]
    assert steps_per_epoch(pool, n, parts) == 3  # 11 // 3: the smaller partition ends the epoch
    epochs = [[meta_batch_indices(pool, n, 0, e * 3 + s, parts) for s in range(3)] for e in range(3)]
    for epoch in epochs:
        assert len({i for batch in epoch for i in batch}) == 18  # no record twice within an epoch
        for batch in epoch:
            for rank in range(parts):  # worker r's shard is drawn from partition r, every epoch
                assert set(shard_slice(batch, rank, parts)) <= set(blocks[rank])
    assert epochs[0] != epochs[1]  # each epoch reshuffles within the partitions
    assert partition(pool, 1, parts, 0) != blocks[0]  # the partitions follow the seed
    # one partition is the plan of runs before partitions (the pinned test above)
    assert meta_batch_indices(10, 3, 0, 0, 1) == [9, 5, 3]
    with pytest.raises(ValueError, match=r"partitions must be in \[1, n_edits=6\], got 7"):
        meta_batch_indices(pool, n, 0, 0, 7)


def test_meta_batch_indices_rejects_oversized_batches():
    with pytest.raises(ValueError, match=r"n_edits must be in \[1, pool_size=4\], got 5"):
        meta_batch_indices(4, 5, seed=0, step=0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        meta_batch_indices(4, 2, seed=0, step=-1)


def test_shard_slice_splits_contiguously_and_concatenates_back():
    indices = [11, 3, 7, 5, 2, 9, 8, 1, 0, 4]
    slices = [shard_slice(indices, rank, 3) for rank in range(3)]
    assert slices == [[11, 3, 7, 5], [2, 9, 8], [1, 0, 4]]
    assert [i for s in slices for i in s] == indices
    assert [shard_slice([1, 2], rank, 3) for rank in range(3)] == [[1], [2], []]
    with pytest.raises(ValueError, match=r"rank must be in \[0, 3\), got 3"):
        shard_slice(indices, 3, 3)


def test_train_eval_split_is_disjoint_and_deterministic():
    train, evaluation = train_eval_split(10, 3, seed=1)
    assert (train, evaluation) == ([0, 1, 2, 3, 4, 8, 9], [5, 6, 7])
    assert train_eval_split(10, 3, seed=1) == (train, evaluation)
    big_train, big_eval = train_eval_split(2031, 200, seed=0)
    assert len(big_eval) == 200 and not set(big_train) & set(big_eval)
    assert sorted(big_train + big_eval) == list(range(2031))
    assert train_eval_split(2031, 200, seed=1)[1] != big_eval
    with pytest.raises(ValueError, match=r"eval_size must be in \[0, 10\], got 11"):
        train_eval_split(10, 11, seed=0)


def test_micro_batches_split_to_a_minimum_count():
    """ZeRO-3 workers must run equally many passes: min_batches splits the largest batches."""
    examples = [TokenizedExample([1] * n, [-100] * (n - 1) + [5]) for n in (9, 8, 7, 3, 2)]
    plain = micro_batches(examples, 4, 0)
    assert [b.input_ids.shape[0] for b in plain] == [4, 1]
    split = micro_batches(examples, 4, 0, min_batches=4)
    assert len(split) == 4
    assert sorted(int(i) for b in split for i in b.example_ids) == [0, 1, 2, 3, 4]  # every edit exactly once
    with pytest.raises(ValueError, match="cannot make 6 micro-batches of 5 examples"):
        micro_batches(examples, 4, 0, min_batches=6)


def test_evaluation_alone_tokenises_no_training_records():
    from tiny_models import TINY_RUN_OVERRIDES

    from horse_dist.config import load_config
    from horse_dist.lm.tiny_tokenizers import build_sentencepiece_tokenizer
    from horse_dist.training.assembly import load_data

    cfg, tokenizer = load_config(None, list(TINY_RUN_OVERRIDES)), build_sentencepiece_tokenizer()
    both, evaluation = load_data(cfg, tokenizer), load_data(cfg, tokenizer, train=False)
    assert len(both.train.edit) == 24 and evaluation.train_records == [] and evaluation.train.edit == []
    assert evaluation.eval_records == both.eval_records and evaluation.eval.edit == both.eval.edit


def test_data_paths_take_lists_and_globs(tmp_path, monkeypatch):
    from horse_dist.config import load_config
    from horse_dist.training.assembly import _nonempty_records, data_files

    rows = json.loads(ZSRE_HEAD.read_text())
    for name, part in (("a.json", rows[:5]), ("b.jsonl", rows[5:8])):
        text = json.dumps(part) if name.endswith(".json") else "\n".join(map(json.dumps, part))
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    assert data_files("b.jsonl, a.json") == [Path("b.jsonl"), Path("a.json")]
    assert data_files("*.json*") == [Path("a.json"), Path("b.jsonl")]  # matches sorted
    data = load_config(None, []).data
    listed = _nonempty_records("a.json,b.jsonl", data)
    assert [r.prompt for r in listed] == [r.prompt for r in load_records(ZSRE_HEAD, limit=8)]
    assert _nonempty_records(str(tmp_path / "*.json*"), data) == listed
    assert [p.name for p in data_files("data/zsre/*.json")] == [  # bundled, from any working directory
        "zsre_mend_eval_head.json",
        "zsre_mend_eval_tail.json",
    ]
    with pytest.raises(FileNotFoundError, match=r"nope\*\.json: no data file matches"):
        data_files("nope*.json")


def test_data_paths_take_directories_and_their_splits(tmp_path, capsys):
    from horse_dist import train
    from horse_dist.cli import run_cli
    from horse_dist.training.assembly import data_files

    rows = json.loads(ZSRE_HEAD.read_text())
    folder = tmp_path / "zsre"
    folder.mkdir()
    names = ("zsre-train.jsonl", "zsre-dev.json", "zsre-test.json", "notes.txt")
    for name, part in zip(names, (rows[:6], rows[6:9], rows[9:10], "about")):
        text = json.dumps(part) if name.endswith(".json") else "\n".join(map(json.dumps, part))
        (folder / name).write_text(text)
    assert [p.name for p in data_files(str(folder))] == [
        "zsre-dev.json",
        "zsre-test.json",
        "zsre-train.jsonl",
    ]
    assert [p.name for p in data_files(f"{folder}:train")] == ["zsre-train.jsonl"]
    assert [p.name for p in data_files(f"{folder}:validation")] == [
        "zsre-dev.json"
    ]  # dev and validation alike
    assert [p.name for p in data_files(f"{folder}:dev, {folder}:test")] == ["zsre-dev.json", "zsre-test.json"]
    with pytest.raises(
        FileNotFoundError, match=r"zsre: no \.json/\.jsonl file named for 'eval' \(it holds notes"
    ):
        data_files(f"{folder}:eval")
    args = [f"data.train_path={folder}:eval", f"train.out_dir={tmp_path / 'runs'}", "tracking.enabled=false"]
    with pytest.raises(SystemExit) as stop:  # as a user meets it: one line, exit 2
        run_cli(train.main, [*args, "model.source=random:tiny_llama", "model.n_edit_layers=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith("error: ") and "named for 'eval'" in err[-1]


def test_records_fingerprint_is_the_sha256_of_every_field_in_order():
    """Pinned to its first definition: checkpoints written before carry fingerprints made that way."""
    import dataclasses
    import hashlib

    from horse_dist.data import records_fingerprint

    records = [EditRecord("p?", "a", "r?", "l?", "la", "s"), EditRecord("q?", "b", "s?", "m?", "mb", "", "o")]
    digest = hashlib.sha256(b"2")
    for record in records:
        digest.update("\x1f".join(dataclasses.astuple(record)).encode() + b"\x1e")
    assert records_fingerprint(records) == digest.hexdigest()
    assert records_fingerprint(records[::-1]) != digest.hexdigest()


def _kilt_row(question, answer, alternatives, rephrases, title="T"):
    """One line of MEND's original zsRE files (structured_zeroshot-*-new_annotated_final.jsonl)."""
    provenance = [{"wikipedia_id": "1", "title": title, "start_paragraph_id": 6, "bleu_score": 0.95}]
    return {
        "id": f"id-{question}",
        "input": question,
        "output": [{"answer": answer, "provenance": provenance}],
        "meta": {"template_questions": [question]},
        "rephrases": rephrases + [question],
        "prediction": "Trinity College",
        "alternatives": alternatives,
        "filtered_rephrases": rephrases + [question],
    }


def test_mends_original_zsre_files_are_read_with_mends_filter_and_paired_locality(tmp_path, caplog):
    rows = [
        _kilt_row(
            "What university did Watts Humphrey attend?",
            "Illinois Institute of Technology",
            ["Yale University", "University of Michigan"],
            ["What university did Watts Humphrey take part in?"],
            "Watts Humphrey",
        ),
        _kilt_row(
            "Which river does the Elbe flow into?", "North Sea", ["Baltic Sea"], ["The Elbe flows into?"]
        ),
        _kilt_row("Who founded Nokia?", "Fredrik Idestam", [], ["Nokia was founded by?"]),  # no alternative
        _kilt_row("What is the capital of Peru?", "Lima", ["Cusco"], []),  # no rephrase but the question
        _kilt_row("Where is Pisa?", "Italy", ["Spain"], ["Pisa is located where?"]),
    ]
    path = tmp_path / "structured_zeroshot-dev-new_annotated_final.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert detect_format(rows[0], str(path)) == "zsre_kilt"
    with caplog.at_level(logging.WARNING):
        new = load_records(path, target="new")
    assert "dropped 2 record(s): no true answer, alternative answer or filtered rephrase" in caplog.text
    assert [(r.prompt, r.answer, r.rephrase) for r in new] == [
        (rows[0]["input"], "Yale University", "What university did Watts Humphrey take part in?"),
        (rows[1]["input"], "Baltic Sea", "The Elbe flows into?"),
        (rows[4]["input"], "Spain", "Pisa is located where?"),
    ]
    # each record's unrelated prompt is the record n/2 further on, with its true answer
    assert [(r.loc_prompt, r.loc_answer) for r in new] == [
        (rows[1]["input"], "North Sea"),
        (rows[4]["input"], "Italy"),
        (rows[0]["input"], rows[0]["output"][0]["answer"]),
    ]
    assert new[0].subject == "Watts Humphrey" and new[0].other_answer == ""
    true = load_records(path, target="true")  # true answers need no alternative: Nokia stays
    assert [r.answer for r in true] == [
        "Illinois Institute of Technology",
        "North Sea",
        "Fredrik Idestam",
        "Italy",
    ]
    rows[1]["output"] = "North Sea"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(
        DataFormatError, match=r"record 1: field 'output': expected a non-empty list of objects"
    ):
        load_records(path)


def test_the_config_offers_every_format_the_readers_know():
    from horse_dist.config import CHOICES
    from horse_dist.data import FORMATS, TARGETS

    assert CHOICES["data.format"] == ("auto", *FORMATS) and set(CHOICES["data.target"]) == set(TARGETS)
