"""CounterFact's contrast scores (ROME's efficacy / paraphrase / neighbourhood score and magnitude)."""

import contextlib
import math
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_RUN_OVERRIDES, build_tiny_model

from horse_dist.config import load_config
from horse_dist.data import EditRecord, concat_records, select_records, tokenize_example, tokenize_records
from horse_dist.data.formats import load_records
from horse_dist.generation.contrast import (
    CONTRAST_METRICS,
    answer_nll,
    contrast_scores,
    contrast_views,
    counterfact_scores,
    without_stop,
)
from horse_dist.lm.tiny_tokenizers import build_sentencepiece_tokenizer
from horse_dist.training.assembly import build_engine, load_data
from horse_dist.training.evaluation import evaluate_pool, format_table, live_eval_for

DATA = Path(__file__).resolve().parent.parent / "data"
CF_RECORD = load_records(DATA / "counterfact/counterfact_head.json", limit=1)[
    0
]  # Darrieux: French -> English


def test_contrast_scores_by_hand():
    nll_prefer = torch.tensor([0.1, 2.0, 1.0], dtype=torch.float64)
    nll_other = torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)
    out = contrast_scores(nll_prefer, nll_other, "efficacy")
    assert out["cf_efficacy"].tolist() == [1.0, 0.0, 0.0]  # a tie is not a success
    expected = [math.exp(-0.1) - math.exp(-1.0), math.exp(-2.0) - math.exp(-0.5), 0.0]
    assert out["cf_efficacy_mag"].tolist() == pytest.approx(expected, abs=1e-12)


def test_answer_nll_equals_one_sequence_at_a_time_and_skips_the_stop():
    tokenizer = build_sentencepiece_tokenizer()
    model = build_tiny_model("llama", tokenizer).eval()
    stop = tokenizer.eos_token_id
    stopped = tokenize_example(tokenizer, "Who wrote it?", "Victor Hugo of Besancon", stop)
    examples = [
        tokenize_example(tokenizer, "The capital of France is", "Paris"),
        without_stop(stopped),
        tokenize_example(tokenizer, "x", "y"),
    ]
    assert examples[1].labels == [*stopped.labels[:-1], -100] and stopped.labels[-1] == stop
    batched = answer_nll(model, examples, pad_id=0, chunk=2)  # padding and two chunks
    for example, original, value in zip(examples, [examples[0], stopped, examples[2]], batched):
        with torch.no_grad():
            logits = model(torch.tensor([example.input_ids])).logits[0].double()
        labels = torch.tensor(original.labels)
        scored = (labels != -100).nonzero()[:, 0]
        if original.ends_with_stop:
            scored = scored[:-1]
        nll = -torch.log_softmax(logits[scored], -1).gather(-1, labels[scored][:, None])
        assert value.item() == pytest.approx(nll.mean().item(), abs=1e-5)


def test_counterfact_records_name_the_replaced_answer_both_ways():
    path = DATA / "counterfact/counterfact_head.json"
    new = load_records(path, target="new", limit=3)
    true = load_records(path, target="true", limit=3)
    assert (new[0].answer, new[0].other_answer) == ("English", "French")
    assert (true[0].answer, true[0].other_answer) == ("French", "English")
    tokenizer = build_sentencepiece_tokenizer()
    for records in (new, true):  # on a neighbour prompt the contrast is the counterfactual object either way
        views = tokenize_records(tokenizer, records).contrast
        expected = tokenize_example(tokenizer, records[0].loc_prompt, "English")
        assert views.unrel_other[0] == expected
    assert (
        tokenize_records(tokenizer, load_records(DATA / "zsre/zsre_mend_eval_head.json", limit=3)).contrast
        is None
    )


def test_selection_and_concatenation_keep_the_contrast_views_aligned():
    tokenizer = build_sentencepiece_tokenizer()
    other = EditRecord("Paris is in", "Italy", "Paris lies in", "Rome is in", "Italy", other_answer="France")
    pool = tokenize_records(tokenizer, [CF_RECORD, other])
    picked = select_records(pool, [1])
    assert picked.edit == pool.edit[1:] and picked.contrast.edit_other == pool.contrast.edit_other[1:]
    both = concat_records(picked, pool)
    assert both.contrast.equiv_other == [pool.contrast.equiv_other[1], *pool.contrast.equiv_other]
    assert len(both.contrast.unrel_other) == len(both.edit) == 3


def test_evaluation_reports_contrast_scores_on_counterfact_only():
    overrides = [
        *TINY_RUN_OVERRIDES,
        "data=counterfact",
        "data.eval_size=8",
        "train.eval_new_tokens=4",
        "train.eval_loc_tokens=4",
    ]
    cfg = load_config(None, overrides)
    assert cfg.data.format == "counterfact_flat" and cfg.data.n_edits == 8
    torch.manual_seed(0)
    engine, tokenizer = build_engine(cfg)
    pools = load_data(cfg, tokenizer)
    live = live_eval_for(cfg, tokenizer)
    result = evaluate_pool(engine, pools.eval, 8, 1, 0, False, live)
    indices = list(range(8))
    _, shifts = engine.evaluate_batch(engine.batches_for(pools.eval, indices))
    # the engine's pass (packed rows, lower blocks run once for all rows) equals one plain forward per view
    engine_nll = engine.answer_nll(contrast_views(pools.eval, indices), {"unedited": None, **shifts})
    for row, row_shifts in (("unedited", None), ("edited", shifts["edited"])):
        with engine.hooks.shifted(row_shifts) if row_shifts else contextlib.nullcontext():
            direct = counterfact_scores(engine.model, pools.eval, indices, live.pad_id)
        for view, views in contrast_views(pools.eval, indices).items():
            with engine.hooks.shifted(row_shifts) if row_shifts else contextlib.nullcontext():
                plain = answer_nll(engine.model, views, live.pad_id)
            torch.testing.assert_close(engine_nll[row][view], plain, rtol=1e-5, atol=1e-5)
        for metric in CONTRAST_METRICS:
            assert result[f"{row}/{metric}"] == pytest.approx(direct[metric].mean().item(), abs=1e-5)
    assert "cf_efficacy" in format_table(result)

    zsre = load_config(
        None, [*TINY_RUN_OVERRIDES, "data.eval_size=8", "train.eval_new_tokens=4", "train.eval_loc_tokens=4"]
    )
    engine, tokenizer = build_engine(zsre)
    result = evaluate_pool(
        engine, load_data(zsre, tokenizer).eval, 8, 1, 0, False, live_eval_for(zsre, tokenizer)
    )
    assert not any(key.endswith("cf_efficacy") for key in result)
    with pytest.raises(ValueError, match="name the answer an edit replaces"):
        counterfact_scores(engine.model, load_data(zsre, tokenizer).eval, [0], 0)
