"""Forward shortcuts against the plain passes: packed rows, resuming at a block, the block-input cache."""

import pytest
import torch
from tiny_models import TINY_ARCHS, TINY_RUN_OVERRIDES, build_tiny_model

from horse_dist.config import ConfigError, load_config
from horse_dist.data import micro_batches, tokenize_examples
from horse_dist.data.packing import (
    PrefixTree,
    collate_packed,
    pack_rows,
    packed_micro_batches,
    packed_plan,
    packed_rows,
    shareable_length,
)
from horse_dist.data.tokenize import IGNORE_INDEX, TokenizedExample, TokenizedRecords
from horse_dist.lm.answer_tail import last_block_tail_logits, tail_answer_logits, tail_layout
from horse_dist.lm.block_cache import BlockInputCache, once_per_batch
from horse_dist.lm.fast_forward import (
    PACKABLE,
    RESUMABLE,
    blocks_from,
    hidden_entering_block,
    packed_attention_mask,
    use_answer_tail,
    use_packing,
)
from horse_dist.lm.hooks import EditHooks
from horse_dist.lm.passes import answer_logits, cache_pass, loss_pass, model_inputs, resumed_answer_logits
from horse_dist.lm.registry import default_edit_modules, layer_index, module_shape
from horse_dist.lm.tiny_tokenizers import build_bpe_tokenizer, build_sentencepiece_tokenizer
from horse_dist.training.assembly import build_engine, load_data

# Shared prefixes (rows share them when packed), a repeated prompt with another answer (its last prompt
# token is an answer position, never shared), and a one-token prompt.
PROMPTS = [
    "The capital of France is",
    "Who wrote Hamlet?",
    "x",
    "Which river flows through the city that hosted the first modern Olympic games?",
    "Name the author of",
    "What is the native language of the person who founded it",
    "The capital of Italy is",
    "Who wrote Macbeth?",
    "The capital of France is",
]
ANSWERS = [
    "Paris",
    "William Shakespeare",
    "y z",
    "the Ilisos river",
    "War and Peace",
    "Greek",
    "Rome",
    "Shakespeare",
    "Lyon",
]


def _setup(arch: str):
    tokenizer = build_bpe_tokenizer() if arch in ("gpt2", "gptj") else build_sentencepiece_tokenizer()
    model = build_tiny_model(arch, tokenizer, seed=0).eval().requires_grad_(False)
    examples = tokenize_examples(tokenizer, PROMPTS, ANSWERS)
    return tokenizer, model, examples


def _by_example(logits_PV: torch.Tensor, batches) -> dict[int, torch.Tensor]:
    """Answer logits grouped per edit, in position order (comparable across batch layouts)."""
    ids = torch.cat([b.answer_positions()[2] for b in batches])
    return {int(i): logits_PV[ids == i] for i in ids.unique()}


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 3, 8, 2, 4], 8) == [[2], [0, 1], [4, 3]]
    assert pack_rows([9, 2], 8) == [[0], [1]]  # a sequence longer than a row gets its own


def test_packed_plan_limits_rows_tokens_and_splits_for_lockstep():
    tokenizer, _, examples = _setup("llama")
    longest = max(len(e.input_ids) for e in examples)
    n = len(examples)
    for share in (False, True):
        plan = packed_plan(examples, max_rows=32, max_tokens=2 * longest, row_tokens=1, share=share)
        assert all(len(batch) <= 2 for batch in plan)
        assert sorted(i for batch in plan for row in batch for i in row) == list(range(n))
        assert all(tree_size(examples, row, share) <= longest for batch in plan for row in batch)
        assert all(len(batch) == 1 for batch in packed_plan(examples, max_rows=1, row_tokens=1, share=share))
        assert len(packed_plan(examples, max_rows=32, row_tokens=1000, share=share)) == 1  # one row
        split = packed_plan(examples, max_rows=32, min_batches=n, share=share)
        assert len(split) == n and all(sum(map(len, batch)) == 1 for batch in split)
    with pytest.raises(ValueError, match=f"cannot make {n + 1} micro-batches of {n} examples"):
        packed_plan(examples, 32, min_batches=n + 1)


def tree_size(examples: list[TokenizedExample], indices: list[int], share: bool = True) -> int:
    tree = PrefixTree(share)
    for i in indices:
        tree.add(i, examples[i])
    return len(tree)


def _example(input_ids: list[int], n_answer: int) -> TokenizedExample:
    return TokenizedExample(input_ids, [IGNORE_INDEX] * (len(input_ids) - n_answer) + [100] * n_answer)


def test_packed_rows_picks_the_cheapest_row_length():
    examples = [_example([10 + i] * 40, 1) for i in range(5)]  # nothing shared: 40 tokens each
    rows, length = packed_rows(examples, 0, share=False)
    # 64: 5 rows (320 positions); 80: 3 rows (240); 96: 3 (288); 112: 3 (336); 128: 2 (256, dearer attention)
    assert length == 80 and sorted(map(len, rows)) == [1, 2, 2]
    rows, length = packed_rows(examples, 64, share=False)
    assert length == 64 and len(rows) == 5
    assert packed_rows(examples, 30, share=False)[1] == 40  # the longest sequence, if longer


def test_prefix_tree_shares_only_positions_no_loss_reads():
    a = _example([1, 2, 3, 4, 5], 2)  # positions 0-2 shareable
    b = _example([1, 2, 3, 9], 1)  # positions 0-2 shareable
    c = _example([1, 2, 3, 4, 5], 2)  # a repeated prompt: its answer positions get their own tokens
    d = _example([1, 2], 2)  # nothing shareable: its first token is an answer position
    long = _example(list(range(1, 12)), 1)  # a second row of 11 tokens: row 0 gets one pad
    assert [shareable_length(e) for e in (a, b, c, d)] == [3, 3, 3, 0]
    batch = collate_packed([a, b, c, d, long], [[0, 1, 2, 3], [4]], pad_id=0)
    # tree: 1-2-3 shared by a, b, c; then a's 4-5, b's 9, c's 4-5; d alone
    assert batch.input_ids[0].tolist() == [1, 2, 3, 4, 5, 9, 4, 5, 1, 2, 0]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 0, 1, 0]
    assert batch.visible_until[0].tolist() == [8, 8, 8, 5, 5, 6, 8, 8, 10, 10, 11]
    assert batch.example_ids[0, :10].tolist() == [0, 0, 0, 0, 0, 1, 2, 2, 3, 3]
    assert batch.labels[0, :10].tolist() == [IGNORE_INDEX] * 3 + [100, 100, 100, 100, 100, 100, 100]
    paths = [(r, p.tolist(), e) for r, p, e in batch.sequence_positions()]
    assert paths[:4] == [
        (0, [0, 1, 2, 3, 4], 0),
        (0, [0, 1, 2, 5], 1),
        (0, [0, 1, 2, 6, 7], 2),
        (0, [8, 9], 3),
    ]
    assert paths[4] == (1, list(range(11)), 4)
    assert batch.sequence_shapes() == [(5, 2), (1, 1), (2, 2), (2, 2), (11, 1)]  # tokens each adds, answers
    mask = packed_attention_mask(batch.visible_until, torch.float32)[0, 0] == 0
    assert mask[5].nonzero().flatten().tolist() == [0, 1, 2, 5]  # b's answer position sees its own path
    assert mask[10].nonzero().flatten().tolist() == [10]  # a pad sees itself only
    unshared = collate_packed([a, b, c, d], [[0, 1, 2, 3]], pad_id=0, share=False)
    assert unshared.input_ids.shape == (1, 16) and unshared.sequence_shapes() == [
        (5, 2),
        (4, 1),
        (5, 2),
        (2, 2),
    ]
    assert tree_size([a, b, c, d], [0, 1, 2, 3]) == 10 and tree_size([a, b, c, d], [0, 1, 2, 3], False) == 16


def test_collate_packed_layout():
    tokenizer, _, examples = _setup("llama")
    batch = collate_packed(examples, [[3], [0, 2]], pad_id=0, share=False)
    n3, n0, n2 = (len(examples[i].input_ids) for i in (3, 0, 2))
    assert batch.input_ids.shape == (2, max(n3, n0 + n2))
    assert batch.visible_until[1, : n0 + n2].tolist() == [n0] * n0 + [n0 + n2] * n2
    assert batch.position_ids[1, n0 : n0 + n2].tolist() == list(range(n2))
    assert batch.example_ids[1, n0].item() == 2 and batch.attention_mask[1].sum().item() == n0 + n2
    assert batch.sequence_shapes() == [(n3, len(examples[3].answer_ids))] + [
        (len(examples[i].input_ids), len(examples[i].answer_ids)) for i in (0, 2)
    ]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_packed_logits_equal_padded(arch):
    assert arch in PACKABLE
    tokenizer, model, examples = _setup(arch)
    padded = micro_batches(examples, 32, tokenizer.pad_token_id or 0)
    packed = packed_micro_batches(examples, 32, tokenizer.pad_token_id or 0)
    assert sum(b.input_ids.numel() for b in packed) < sum(b.input_ids.numel() for b in padded)
    real_tokens = sum(len(e.input_ids) for e in examples)
    assert sum(int(b.attention_mask.sum()) for b in packed) < real_tokens  # shared prefixes computed once
    with torch.no_grad():
        want = _by_example(torch.cat([answer_logits(model, b) for b in padded]), padded)
        got = _by_example(torch.cat([answer_logits(model, b) for b in packed]), packed)
    assert want.keys() == got.keys() == set(range(len(examples)))
    for i in want:
        torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_cache_and_loss_pass_equal_padded(arch):
    tokenizer, model, examples = _setup(arch)
    names = default_edit_modules(model, n_last=2)
    hooks = EditHooks(model, names)
    pad, n = tokenizer.pad_token_id or 0, len(examples)
    results = {}
    for layout, batches in (
        ("padded", micro_batches(examples, 4, pad)),
        ("packed", packed_micro_batches(examples, 4, pad)),
    ):
        cache = cache_pass(model, hooks, batches, n, loss_scale=4.0)
        order = torch.argsort(cache.example_ids, stable=True)  # rows grouped by edit, in position order
        torch.manual_seed(0)
        shifts = [(0.01 * torch.randn(module_shape(model.get_submodule(m)))).requires_grad_() for m in names]
        loss = loss_pass(model, hooks, batches, shifts, n, "ce", 0.25)
        results[layout] = (
            [k[order] for k in cache.keys],
            [g[order] for g in cache.grads],
            cache.loss,
            loss.loss,
            [s.grad for s in shifts],
        )
    want, got = results["padded"], results["packed"]
    for a, b in zip(want, got):
        for x, y in zip(a, b) if isinstance(a, list) else [(a, b)]:
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)
    hooks.remove()


def test_use_packing_setting():
    _, model, _ = _setup("llama")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_packing("auto", model, cpu) and not use_packing("auto", model, cuda)
    assert use_packing("packed", model, cuda) and not use_packing("padded", model, cpu)
    model.config.model_type = "bloom"
    assert not use_packing("auto", model, cpu)
    with pytest.raises(ConfigError, match="data.packing=packed: not supported for model_type 'bloom'"):
        use_packing("packed", model, cpu)


# ---- resuming at a block, the block-input cache ----------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(RESUMABLE))
def test_resuming_at_a_block_equals_the_full_pass(arch):
    tokenizer, model, examples = _setup(arch)
    batch = packed_micro_batches(examples, 32, tokenizer.pad_token_id or 0)[0]
    with torch.no_grad():
        full = answer_logits(model, batch)
    hidden = hidden_entering_block(model, model_inputs(model, batch), 2)
    assert hidden.shape == (*batch.input_ids.shape, model.config.hidden_size)
    with torch.no_grad():
        resumed = resumed_answer_logits(model, batch, hidden, 2)
    torch.testing.assert_close(resumed, full, rtol=1e-5, atol=1e-5)
    assert len(_blocks_of(model)) == model.config.num_hidden_layers  # restored


def _blocks_of(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _block_calls(model) -> list[int]:
    """A counter of the first decoder block's forwards (one per pass that runs the lower blocks)."""
    calls = [0]
    _blocks_of(model)[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_resuming_is_refused_where_embeddings_are_transformed():
    _, model, _ = _setup("gpt2")  # adds position embeddings to inputs_embeds
    with pytest.raises(ValueError, match="not supported for model_type 'gpt2'"):
        with blocks_from(model, 1):
            pass


# ---- the cache pass's answer tail ---------------------------------------------------------------------------
def test_tail_layout_of_two_prompts_sharing_a_prefix():
    tokenizer, _, examples = _setup("llama")
    first, second = examples[0], examples[8]  # the same prompt, answers "Paris" and "Lyon"
    context = shareable_length(first)
    assert first.input_ids[:context] == second.input_ids[:context]
    batch = collate_packed(examples, [[0, 8]], pad_id=0)
    layout = tail_layout(batch)
    tail_first, tail_second = len(first.labels) - context, len(second.labels) - context
    assert layout.context_BC.tolist() == [list(range(context))]  # the shared prefix, once
    assert layout.tail_BQ.tolist() == [list(range(context, context + tail_first + tail_second))]
    assert layout.tail_real_BQ.all() and layout.context_real_BC.all()
    seen = layout.tail_seen_BQK[0]  # (Q, C + Q)
    assert seen[:, :context].all()  # every answer position sees the shared prefix
    own_first = torch.arange(tail_first)
    assert seen[tail_first:, context + own_first].any().item() is False  # ... not the other answer
    causal = torch.ones(tail_second, tail_second, dtype=torch.bool).tril()
    assert seen[tail_first:, context + tail_first :].equal(causal)  # its own earlier positions
    assert layout.context_seen_BCC[0].equal(torch.ones(context, context, dtype=torch.bool).tril())


@pytest.mark.parametrize("arch", sorted(RESUMABLE))
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_answer_tail_cache_pass_equals_the_full_pass(arch, layout):
    tokenizer, model, examples = _setup(arch)
    names = default_edit_modules(model, n_last=2)
    hooks, block = EditHooks(model, names), layer_index(names[0])
    pad, n = tokenizer.pad_token_id or 0, len(examples)
    batching = packed_micro_batches if layout == "packed" else micro_batches
    batches = batching(examples, 4, pad)
    shapes = []  # what the lowest edited module computes on: context without a graph, then the tail

    def tail(batch):
        hidden = hidden_entering_block(model, model_inputs(model, batch), block)
        return tail_answer_logits(model, hooks, batch, hidden, block)

    full = cache_pass(model, hooks, batches, n, loss_scale=4.0)
    handle = model.get_submodule(names[0]).register_forward_hook(
        lambda module, args, out: shapes.append((tuple(out.shape[:2]), torch.is_grad_enabled()))
    )
    tailed = cache_pass(model, hooks, batches, n, 4.0, tail)
    handle.remove()
    assert len(shapes) == 2 * len(batches)
    for batch, context_run, tail_run in zip(batches, shapes[::2], shapes[1::2]):
        answers_BT = batch.labels != IGNORE_INDEX
        context_BT = batch.attention_mask.bool() & ~answers_BT
        rows = len(batch.input_ids)
        assert context_run == ((rows, max(int(context_BT.sum(1).max()), 1)), False)
        assert tail_run == ((rows, int(answers_BT.sum(1).max())), True)
    assert tailed.example_ids.equal(full.example_ids)
    torch.testing.assert_close(tailed.loss, full.loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(tailed.keys + tailed.grads, full.keys + full.grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    hooks.remove()


@pytest.mark.parametrize("arch", sorted(RESUMABLE))
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("n_edited", [1, 2])  # 1: the last block is the lowest edited one
def test_last_block_tail_loss_pass_equals_the_full_pass(arch, layout, n_edited):
    tokenizer, model, examples = _setup(arch)
    names = default_edit_modules(model, n_last=n_edited)
    hooks, block = EditHooks(model, names), layer_index(names[0])
    batching = packed_micro_batches if layout == "packed" else micro_batches
    batches, n = batching(examples, 4, tokenizer.pad_token_id or 0), len(examples)

    def split(batch):
        with torch.no_grad():
            hidden = hidden_entering_block(model, model_inputs(model, batch), block)
        return last_block_tail_logits(model, batch, hidden, block)

    results = []
    for logits_fn in (None, split):
        torch.manual_seed(0)
        shifts = [(0.01 * torch.randn(module_shape(model.get_submodule(m)))).requires_grad_() for m in names]
        result = loss_pass(model, hooks, batches, shifts, n, "ce", 0.25, logits_fn)
        results.append((result.loss, result.accuracy, [s.grad for s in shifts]))
    (loss, accuracy, grads), (split_loss, split_accuracy, split_grads) = results
    torch.testing.assert_close(split_loss, loss, rtol=1e-5, atol=1e-6)
    assert split_accuracy.equal(accuracy)
    for got, want in zip(split_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    hooks.remove()


def test_use_answer_tail_setting():
    _, model, _ = _setup("llama")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_answer_tail("auto", model, cpu, 0) and not use_answer_tail("auto", model, cuda, 0)
    assert use_answer_tail("split", model, cuda, 0) and not use_answer_tail("full", model, cpu, 0)
    assert not use_answer_tail("auto", model, cpu, 3)
    with pytest.raises(
        ConfigError, match="answer_tail=split: not supported .* 'llama' with ZeRO stage 3 .* auto or full"
    ):
        use_answer_tail("split", model, cpu, 3)
    model.config.model_type = "gpt2"
    assert not use_answer_tail("auto", model, cpu, 0)


BLOCK_CACHE_CFG = list(TINY_RUN_OVERRIDES)


@pytest.mark.parametrize("locality", ["ce", "kl"])
def test_block_cache_and_answer_tail_meta_steps_equal_plain(locality):
    """Two visits of the same meta-batch: the answer-tail cache pass, and with the block cache the second
    visit skipping the lower blocks, give the plain passes' results. Without the block cache, the lower
    blocks run once per micro-batch (KL: its reference and shifted passes share them)."""
    runs, lower_block_runs = {}, {}
    variants = {
        "plain": ["train.block_cache_gb=0", "model.answer_tail=full"],
        "tail": ["train.block_cache_gb=0", "model.answer_tail=split"],
        "cached": ["train.block_cache_gb=1", "model.answer_tail=split"],
    }
    for name, overrides in variants.items():
        cfg = load_config(None, [*BLOCK_CACHE_CFG, f"method.locality={locality}", *overrides])
        torch.manual_seed(0)
        engine, tokenizer = build_engine(cfg)
        pools = load_data(cfg, tokenizer)
        optimizer = engine.make_optimizer()
        if name == "plain":
            engine.shared_hidden = lambda source=None: None
        calls = _block_calls(engine.model)
        batches = engine.batches_for(pools.train, list(range(8)))
        metrics = [engine.meta_step(batches, optimizer) for _ in range(2)]
        runs[name] = (engine, metrics)
        lower_block_runs[name] = calls[0]
    n_per_step = len(batches.edit) + len(batches.equiv) + len(batches.unrel)
    kl_reference = len(batches.unrel) if locality == "kl" else 0
    assert lower_block_runs["plain"] == 2 * (n_per_step + kl_reference)
    assert lower_block_runs["tail"] == 2 * n_per_step
    plain, cached = runs["plain"][0], runs["cached"][0]
    assert not plain.answer_tail and runs["tail"][0].answer_tail and plain.block_cache is None
    assert cached.block_cache.block == 2  # tiny_llama: 4 blocks, last 2 edited
    n_batches = cached.block_cache.misses + cached.block_cache.hits
    # Visit 1 computes (KL: its shifted pass resumes from the reference pass's states); visit 2 only resumes.
    assert cached.block_cache.hits >= n_batches // 2 and len(cached.block_cache) == 3 * 8
    for name in ("tail", "cached"):
        engine, metrics = runs[name]
        for a, b in zip(runs["plain"][1], metrics):
            for key in ("gen_loss_sum", "loc_loss_sum", "cache_loss_sum", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (name, key)
        for p, q in zip(plain.bank.parameters(), engine.bank.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


def test_block_cache_resumes_a_prompt_in_another_tree():
    """States stored from one row layout (prefixes shared with some prompts) resume another layout."""
    tokenizer, model, examples = _setup("llama")
    pad, records = tokenizer.pad_token_id or 0, [(0, i) for i in range(len(examples))]
    first = collate_packed(examples, [list(range(len(examples)))], pad)  # one tree of all
    second = collate_packed(examples, [[8, 3, 1], [6, 2, 5], [0, 7, 4]], pad)  # other companions
    cache = BlockInputCache(block=2, budget_bytes=2**30)
    hidden = cache.hidden_fn(model, "edit", records)
    with torch.no_grad():
        hidden(first)
        resumed = resumed_answer_logits(model, second, hidden(second), 2)
        want = answer_logits(model, second)
    assert (cache.misses, cache.hits) == (1, 1)
    torch.testing.assert_close(resumed, want, rtol=1e-5, atol=1e-5)


def test_block_cache_respects_its_budget():
    cfg = load_config(None, [*BLOCK_CACHE_CFG, "train.block_cache_gb=0.0000001"])  # ~107 bytes
    engine, tokenizer = build_engine(cfg)
    pools = load_data(cfg, tokenizer)
    engine.meta_step(engine.batches_for(pools.train, list(range(8))), engine.make_optimizer())
    assert engine.block_cache.bytes <= 107 and len(engine.block_cache) == 0


def test_block_cache_keys_name_the_pool():
    """Two pools never share a key, also where the first is gone and id() would name the second alike."""
    cfg = load_config(None, [*BLOCK_CACHE_CFG, "train.block_cache_gb=1"])
    engine, tokenizer = build_engine(cfg)
    pool = load_data(cfg, tokenizer).train
    engine.evaluate_batch(engine.batches_for(pool, [0, 1, 2, 3]))
    hits = engine.block_cache.hits
    reordered = TokenizedRecords(
        *(list(reversed(getattr(pool, kind))) for kind in ("edit", "equiv", "unrel"))
    )
    engine.evaluate_batch(engine.batches_for(reordered, [0, 1, 2, 3]))
    assert engine.block_cache.hits == hits  # other prompts at the same indices: computed, not served
    engine.evaluate_batch(engine.batches_for(pool, [0, 1, 2, 3]))
    assert engine.block_cache.hits == hits + 3  # one micro-batch per prompt kind
    assert TokenizedRecords([], [], []).uid != TokenizedRecords([], [], []).uid


def test_block_cache_is_bypassed_under_zero3_and_without_records():
    cfg = load_config(None, [*BLOCK_CACHE_CFG, "train.block_cache_gb=1"])
    engine, tokenizer = build_engine(cfg)
    batches = engine.batches_for(load_data(cfg, tokenizer).train, list(range(8)))
    assert all(fn is not None for fn in engine.block_cache_sources(batches).values())
    batches.records = None  # edit calls and evaluation carry no record keys
    assert all(fn is None for fn in engine.block_cache_sources(batches).values())

    class ZeRO3:
        zero_stage = 3

    engine.deepspeed = ZeRO3()  # partitioned blocks are gathered in traced module order: no resuming
    batches.records = [(0, i) for i in range(8)]
    assert all(fn is None for fn in engine.block_cache_sources(batches).values())


def test_evaluation_runs_the_lower_blocks_once_per_batch():
    """The unedited, cache and edited passes of an evaluation share what enters the lowest edited block:
    the same scores as the plain passes, the lower blocks run once per micro-batch (none on a revisit
    with the block-input cache)."""
    results = {}
    for name, budget in (("plain", 0), ("shared", 0), ("cached", 1)):
        cfg = load_config(None, [*BLOCK_CACHE_CFG, f"train.block_cache_gb={budget}"])
        torch.manual_seed(0)
        engine, tokenizer = build_engine(cfg)
        pools = load_data(cfg, tokenizer)
        engine.meta_step(engine.batches_for(pools.train, list(range(8))), engine.make_optimizer())
        if name == "plain":
            engine.shared_hidden = lambda source=None: None
        calls = _block_calls(engine.model)
        batches = engine.batches_for(pools.eval, list(range(4)))
        results[name], _ = engine.evaluate_batch(batches)
        n_batches = len(batches.edit) + len(batches.equiv) + len(batches.unrel)
        if name == "plain":  # the edit prompts: unedited, cache and edited passes; the others: two passes
            assert calls[0] == 3 * len(batches.edit) + 2 * (len(batches.equiv) + len(batches.unrel))
        else:
            assert calls[0] == n_batches
        if name == "cached":
            again, _ = engine.evaluate_batch(engine.batches_for(pools.eval, list(range(4))))
            assert calls[0] == n_batches  # every prompt's states came from the block-input cache
            assert again.keys() == results[name].keys()
            for key in again:
                torch.testing.assert_close(again[key], results[name][key], rtol=0, atol=0)
    plain = results["plain"]
    assert plain["edited/loc_agreement"].shape == (4,)
    assert not torch.equal(plain["edited/ES"], plain["unedited/ES"])  # the edits change the scores
    for name in ("shared", "cached"):
        assert results[name].keys() == plain.keys()
        for key, want in plain.items():
            torch.testing.assert_close(results[name][key], want, rtol=0, atol=0, msg=f"{name} {key}")


def test_shared_hidden_is_off_where_passes_cannot_resume():
    cfg = load_config(None, [*BLOCK_CACHE_CFG, "train.block_cache_gb=0"])
    engine, _ = build_engine(cfg)
    assert engine.shared_hidden() is not None and engine.resumed_logits(None) is None

    class ZeRO3:
        zero_stage = 3

    engine.deepspeed = ZeRO3()
    assert engine.shared_hidden() is None
    engine.deepspeed, engine.lowest_block = None, 0  # what a family without resumable blocks sets
    assert engine.shared_hidden() is None


def test_once_per_batch_computes_each_batch_once():
    tokenizer, model, examples = _setup("llama")
    first, second = micro_batches(examples, 5, tokenizer.pad_token_id or 0)
    seen = []

    def hidden_fn(batch):
        seen.append(batch)
        return torch.full((1,), float(len(seen)))

    hidden = once_per_batch(hidden_fn)
    assert [float(hidden(b)) for b in (first, second, first, second)] == [1.0, 2.0, 1.0, 2.0]
    assert seen[0] is first and seen[1] is second and len(seen) == 2
