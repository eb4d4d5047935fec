"""Forward shortcuts against the plain passes: packed rows, resuming at a block, the block-input cache."""

import pytest
import torch

from horse_dist.build import build_engine, load_data
from horse_dist.config import ConfigError, load_config
from horse_dist.data import micro_batches, tokenize_examples
from horse_dist.data.packing import collate_packed, pack_rows, packed_micro_batches, packed_plan
from horse_dist.lm.fast_forward import PACKABLE, RESUMABLE, blocks_from, capturing_block_input, use_packing
from horse_dist.lm.hooks import EditHooks
from horse_dist.lm.passes import answer_logits, cache_pass, loss_pass
from horse_dist.lm.registry import default_edit_modules, module_shape
from horse_dist.tiny.models import TINY_ARCHS, build_tiny_model
from horse_dist.tiny.tokenizers import build_bpe_tokenizer, build_sentencepiece_tokenizer

PROMPTS = [
    "The capital of France is",
    "Who wrote Hamlet?",
    "x",
    "Which river flows through the city that hosted the first modern Olympic games?",
    "Name the author of",
    "What is the native language of the person who founded it",
]
ANSWERS = ["Paris", "William Shakespeare", "y z", "the Ilisos river", "War and Peace", "Greek"]


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
    plan = packed_plan(examples, max_rows=32, max_tokens=2 * longest, row_tokens=1)
    assert all(len(batch) <= 2 for batch in plan)
    assert sorted(i for batch in plan for row in batch for i in row) == list(range(len(examples)))
    assert all(sum(len(examples[i].input_ids) for i in row) <= longest for batch in plan for row in batch)
    assert all(len(batch) == 1 for batch in packed_plan(examples, max_rows=1, row_tokens=1))
    assert len(packed_plan(examples, max_rows=32, row_tokens=1000)) == 1  # one row holds them all
    split = packed_plan(examples, max_rows=32, min_batches=len(examples))
    assert len(split) == len(examples) and all(sum(map(len, batch)) == 1 for batch in split)
    with pytest.raises(ValueError, match="cannot make 7 micro-batches of 6 examples"):
        packed_plan(examples, 32, min_batches=7)


def test_collate_packed_layout():
    tokenizer, _, examples = _setup("llama")
    batch = collate_packed(examples, [[3], [0, 2]], pad_id=0)
    n3, n0, n2 = (len(examples[i].input_ids) for i in (3, 0, 2))
    assert batch.input_ids.shape == (2, max(n3, n0 + n2))
    assert batch.segment_ids[1, : n0 + n2].tolist() == [0] * n0 + [1] * n2
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
    with torch.no_grad(), capturing_block_input(model, 2) as captured:
        full = answer_logits(model, batch)
    assert len(captured) == 1 and captured[0].shape == (*batch.input_ids.shape, model.config.hidden_size)
    with torch.no_grad(), blocks_from(model, 2):
        resumed = answer_logits(model, batch, captured[0])
    torch.testing.assert_close(resumed, full, rtol=1e-5, atol=1e-5)
    assert len(_blocks_of(model)) == model.config.num_hidden_layers  # restored


def _blocks_of(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def test_resuming_is_refused_where_embeddings_are_transformed():
    _, model, _ = _setup("gpt2")  # adds position embeddings to inputs_embeds
    with pytest.raises(ValueError, match="not supported for model_type 'gpt2'"):
        with blocks_from(model, 1):
            pass


BLOCK_CACHE_CFG = [
    "model.source=random:tiny_llama",
    "model.n_edit_layers=2",
    "method.rank=16",
    "method.chunk_rows=64",
    "data.n_edits=8",
    "data.batch_size=4",
    "data.max_train_records=24",
    "data.eval_path=''",
    "data.eval_size=4",
    "tracking.enabled=false",
]


@pytest.mark.parametrize("locality", ["ce", "kl"])
def test_block_cache_meta_steps_equal_uncached(locality):
    """Two visits of the same meta-batch: with the cache the second skips the lower blocks, same results."""
    runs = {}
    for budget in ("0", "1"):
        cfg = load_config(
            None, [*BLOCK_CACHE_CFG, f"method.locality={locality}", f"train.block_cache_gb={budget}"]
        )
        torch.manual_seed(0)
        engine, tokenizer = build_engine(cfg)
        pools = load_data(cfg, tokenizer)
        optimizer = engine.make_optimizer()
        metrics = [
            engine.meta_step(engine.batches_for(pools.train, list(range(8))), optimizer) for _ in range(2)
        ]
        runs[budget] = (engine, metrics)
    plain, cached = runs["0"][0], runs["1"][0]
    assert plain.block_cache is None and cached.block_cache.block == 2  # tiny_llama: 4 blocks, last 2 edited
    n_batches = cached.block_cache.misses + cached.block_cache.hits
    # Visit 1 computes (KL: its shifted pass resumes from the reference pass's states); visit 2 only resumes.
    assert cached.block_cache.hits >= n_batches // 2 and len(cached.block_cache) == 3 * 8
    for a, b in zip(runs["0"][1], runs["1"][1]):
        for key in ("gen_loss_sum", "loc_loss_sum", "cache_loss_sum", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    for p, q in zip(plain.bank.parameters(), cached.bank.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


def test_block_cache_respects_its_budget():
    cfg = load_config(None, [*BLOCK_CACHE_CFG, "train.block_cache_gb=0.0000001"])  # ~107 bytes
    engine, tokenizer = build_engine(cfg)
    pools = load_data(cfg, tokenizer)
    engine.meta_step(engine.batches_for(pools.train, list(range(8))), engine.make_optimizer())
    assert engine.block_cache.bytes <= 107 and len(engine.block_cache) == 0


def test_block_cache_is_bypassed_under_zero3_and_without_records():
    cfg = load_config(None, [*BLOCK_CACHE_CFG, "train.block_cache_gb=1"])
    engine, tokenizer = build_engine(cfg)
    batches = engine.batches_for(load_data(cfg, tokenizer).train, list(range(8)))
    assert all(fn is not None for fn in engine.training_logits(batches).values())
    batches.records = None  # edit calls and evaluation carry no record keys
    assert all(fn is None for fn in engine.training_logits(batches).values())

    class ZeRO3:
        zero_stage = 3

    engine.deepspeed = ZeRO3()  # partitioned blocks are gathered in traced module order: no resuming
    batches.records = [(0, i) for i in range(8)]
    assert all(fn is None for fn in engine.training_logits(batches).values())
