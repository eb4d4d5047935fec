"""Edits as a user sees them: greedy decoding with a KV cache, the text scores, and the live evaluation."""

import math

import pytest
import torch
from tiny_models import TINY_RUN_OVERRIDES, build_tiny_model

from horse_dist.config import load_config
from horse_dist.data import tokenize_example, tokenize_examples
from horse_dist.editor.losses import per_example_accuracy
from horse_dist.generation import metrics
from horse_dist.generation.decode import Continuations, greedy_continuations
from horse_dist.generation.live import LIVE_METRICS, LiveEval, LiveRequests, prompt_ids
from horse_dist.lm.tiny_tokenizers import build_sentencepiece_tokenizer
from horse_dist.training.assembly import build_engine, load_data
from horse_dist.training.evaluation import evaluate_pool, format_table, live_eval_for
from horse_dist.training.hypernet_bank import HyperNetBank, untrained_bank

TINY = [*TINY_RUN_OVERRIDES, "data.eval_size=8", "train.eval_new_tokens=6", "train.eval_loc_tokens=4"]


# ---- text scores ---------------------------------------------------------------------------------------
def test_target_is_prefix_normalises_case_and_space():
    assert metrics.target_is_prefix("  Paris,\n France", "paris")
    assert metrics.target_is_prefix("Zaha  Hadid was", "zaha hadid")
    assert not metrics.target_is_prefix("The answer is Paris", "Paris")
    assert not metrics.target_is_prefix("", "Paris")  # the model ended at once
    assert not metrics.target_is_prefix("Paris", "   ")  # no target, no success


def test_token_prefix_fraction_and_first_tokens():
    assert metrics.token_prefix_fraction([5, 6, 9, 7], [5, 6, 7]) == pytest.approx(2 / 3)
    assert metrics.token_prefix_fraction([5, 6, 7, 8], [5, 6, 7]) == 1.0
    assert metrics.token_prefix_fraction([], [5, 6]) == 0.0
    with pytest.raises(ValueError, match="no tokens"):
        metrics.token_prefix_fraction([1], [])
    assert metrics.same_first_tokens([1, 2, 3, 9], [1, 2, 3, 4], 3)
    assert not metrics.same_first_tokens([1, 2], [1, 2, 3], 3)  # one side ended early


def test_ngram_entropy_by_hand():
    # words a b a b: bigrams ab, ba, ab (2/3, 1/3); trigrams aba, bab (1/2, 1/2)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert metrics.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert metrics.ngram_entropy("tumor tumor tumor tumor") == 0.0  # one bigram, one trigram
    assert metrics.ngram_entropy("one") == 0.0
    assert metrics.words("Paris, France.") == ["paris", ",", "france", "."]


def test_repeated_ngram_within_the_window():
    assert metrics.has_repeated_ngram([1, 2, 3, 1, 2, 3])
    assert not metrics.has_repeated_ngram([1, 2, 3, 4, 5, 6])
    assert not metrics.has_repeated_ngram([1, 2, 3, 4, 1, 2, 3], n=3, window=6)  # the repeat ends at id 7
    assert metrics.has_repeated_ngram([7, 7, 7, 7])


# ---- decoding --------------------------------------------------------------------------------------------
def _naive_greedy(model, prompt: list[int], steps: int, banned: set[int]) -> list[int]:
    """Full forwards without a cache or padding: the reference for the batched decoder."""
    ids = list(prompt)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].clone()
        logits[list(banned)] = float("-inf")
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def test_batched_decoding_equals_naive_greedy_and_stops_where_plain_greedy_would():
    tokenizer = build_sentencepiece_tokenizer()
    model = build_tiny_model("llama", tokenizer, seed=0).eval()
    prompts = [
        tokenizer(t)["input_ids"] for t in ("The capital of France is", "x", "Who wrote the play Hamlet?")
    ]
    free = [_naive_greedy(model, p, 5, set()) for p in prompts]
    stop = free[0][2]  # declare prompt 0's third greedy token the end-of-text
    got = greedy_continuations(model, prompts, 5, tokenizer.pad_token_id or 0, [stop], batch_size=2)
    for prompt, ids, live in zip(prompts, got.ids, got.live):
        want = _naive_greedy(model, prompt, 5, {stop})
        assert ids == want  # the free generation: end-of-text kept out, left padding invisible
        plain = _naive_greedy(model, prompt, 5, set())
        ended = plain.index(stop) if stop in plain else 5
        assert live == plain[:ended]  # exactly what plain greedy decoding returns
    assert len(got.live[0]) == 2


# ---- live scores -----------------------------------------------------------------------------------------
def test_live_scores_of_a_hand_made_case():
    """A continuation that matches, one that does not, and an empty one (the model ended at once)."""
    tokenizer = build_sentencepiece_tokenizer()
    examples = tokenize_examples(tokenizer, ["Capital of France?"] * 3, ["Paris"] * 3)
    target = examples[0].answer_ids
    other = tokenize_example(tokenizer, "Capital?", "Rome").answer_ids
    requests = LiveRequests(
        [prompt_ids(e) for e in examples], [prompt_ids(e) for e in examples], [[1]] * 3, [target] * 3
    )
    match, miss = target + other, other + target
    generated = {
        "edit": Continuations([match, miss, other * 2], [match, miss, []]),
        "equiv": Continuations([miss, miss, miss], [miss, target[:1], []]),
        "unrel": Continuations([[4, 5, 6, 7], [4, 5, 9, 9], [4, 5, 6, 7]], [[4, 5, 6, 7], [4, 5, 9, 9], []]),
    }
    reference = Continuations([[4, 5, 6, 1], [4, 5, 6, 7], [4, 5, 6, 7]], [])
    live = LiveEval(tokenizer, new_tokens=4, loc_tokens=3, loop_window=12)
    scores = live.scores(requests, generated, reference)
    assert set(scores) == set(LIVE_METRICS)
    assert scores["live_ES"].tolist() == [1.0, 0.0, 0.0]
    assert scores["live_ES_tokens"].tolist() == [1.0, 0.0, 0.0]
    assert scores["live_GS"].tolist() == [0.0, 0.0, 0.0]
    assert scores["live_GS_tokens"].tolist() == pytest.approx([0.0, 1 / len(target), 0.0])
    assert scores["loc_gen_same"].tolist() == [1.0, 0.0, 1.0]  # first 3 ids of the free generation
    assert scores["loops_edit"][2] == 0.0  # the empty plain continuation cannot loop


def test_prompt_ids_stop_before_the_first_answer_token():
    tokenizer = build_sentencepiece_tokenizer()
    example = tokenize_example(tokenizer, "The capital of France is", "Paris")
    assert prompt_ids(example) == tokenizer("The capital of France is")["input_ids"]


# ---- the evaluation --------------------------------------------------------------------------------------
def _trained_engine(*overrides: str):
    cfg = load_config(None, [*TINY, *overrides])
    torch.manual_seed(0)
    engine, tokenizer = build_engine(cfg)
    pools = load_data(cfg, tokenizer)
    optimizer = engine.make_optimizer()
    for start in (0, 8):
        engine.meta_step(engine.batches_for(pools.train, list(range(start, start + 8))), optimizer)
    return cfg, engine, tokenizer, pools


def test_untrained_row_equals_an_explicit_identity_hypernetwork():
    cfg, engine, tokenizer, pools = _trained_engine()
    untrained = untrained_bank(engine.bank, cfg.method)
    editors = {"untrained": untrained, "edited": engine.bank}
    _, shifts = engine.evaluate_batch(engine.batches_for(pools.eval, list(range(8))), editors)
    assert not torch.allclose(shifts["untrained"][0], shifts["edited"][0])  # training changed the editor
    result = evaluate_pool(engine, pools.eval, 8, 1, 0, False, live_eval_for(cfg, tokenizer), untrained)

    # An explicit identity hypernetwork: the normalised [K, G] split back, eta and lambda at their init.
    identity = HyperNetBank(engine.bank.shapes, cfg.method)
    identity.load_state_dict(engine.bank.state_dict())
    for net in identity.nets.values():
        net.eta.data.fill_(cfg.method.eta_init)
        net.log_lambda.data.fill_(cfg.method.log_lambda_init)
        net.forward = lambda k, g, layer, net=net: net.normalizer(torch.cat([k, g], -1)).split(
            [net.d_in, net.d_out], -1
        )
    engine.bank = identity
    explicit = evaluate_pool(engine, pools.eval, 8, 1, 0, False, live_eval_for(cfg, tokenizer))
    for metric in ("ES", "GS", "LS", "loc_agreement", *LIVE_METRICS):
        assert result[f"untrained/{metric}"] == pytest.approx(explicit[f"edited/{metric}"], abs=1e-6), metric


def test_evaluation_reports_live_scores_beside_the_unedited_model():
    cfg, engine, tokenizer, pools = _trained_engine()
    result = evaluate_pool(engine, pools.eval, 8, 1, 0, False, live_eval_for(cfg, tokenizer))
    for row in ("unedited", "edited"):
        for metric in LIVE_METRICS:
            value = result[f"{row}/{metric}"]
            assert 0.0 <= value <= (10.0 if metric.startswith("entropy") else 1.0), (row, metric)
    assert result["unedited/loc_gen_same"] == 1.0  # the reference is the unedited model itself
    table = format_table(result)
    assert "live_ES" in table and table.count("unedited") == 2 and "untrained" not in table
    off = evaluate_pool(engine, pools.eval, 8, 1, 0, False, None)
    assert not any(k.endswith("live_ES") for k in off)
    assert off["edited/ES"] == result["edited/ES"]  # live scoring leaves the teacher-forced scores alone


def test_answer_end_teaches_the_stop_but_never_scores_it():
    tokenizer = build_sentencepiece_tokenizer()
    plain = tokenize_example(tokenizer, "Capital of France?", "Paris")
    stopped = tokenize_example(tokenizer, "Capital of France?", "Paris", tokenizer.eos_token_id)
    assert stopped.labels == [*plain.labels, tokenizer.eos_token_id]
    assert stopped.input_ids == plain.input_ids + plain.answer_ids[-1:]
    assert stopped.answer_ids == plain.answer_ids and stopped.ends_with_stop
    # accuracy over 3 positions: answer tokens right, right; the stop wrong -> 1.0, not 2/3
    logits = torch.zeros(3, 10)
    logits[0, 4] = logits[1, 5] = logits[2, 1] = 1.0
    labels, ids = torch.tensor([4, 5, 2]), torch.zeros(3, dtype=torch.long)
    assert per_example_accuracy(logits, labels, ids, 1).item() == pytest.approx(2 / 3)
    assert per_example_accuracy(logits, labels, ids, 1, unscored_label=2).item() == 1.0


def test_answer_end_runs_through_training_and_evaluation():
    cfg, engine, tokenizer, pools = _trained_engine("data.answer_end=eos")
    assert engine.stop_id == tokenizer.eos_token_id
    assert all(e.labels[-1] == tokenizer.eos_token_id for e in pools.train.edit + pools.eval.equiv)
    assert all(e.labels[-1] != tokenizer.eos_token_id for e in pools.eval.unrel)
    result = evaluate_pool(engine, pools.eval, 8, 1, 0, False, live_eval_for(cfg, tokenizer))
    assert 0.0 <= result["edited/ES"] <= 1.0 and result["unedited/loc_gen_same"] == 1.0
