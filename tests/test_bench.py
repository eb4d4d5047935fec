"""The benchmark harness: FLOP arithmetic (by hand and against torch's FLOP counter), random-weight models,
and a smoke run of `horse_dist.bench` on random:tiny_llama (seconds)."""

import json
import statistics

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from horse_dist import bench
from horse_dist.config import ConfigError, load_config
from horse_dist.editor.metagrad import hypernet_vjp
from horse_dist.editor.residual import residual
from horse_dist.lm.answer_tail import tail_layout
from horse_dist.lm.load import load_frozen_lm
from horse_dist.lm.passes import cache_pass, loss_pass
from horse_dist.lm.random_model import RANDOM_SHAPES
from horse_dist.lm.shapes import LMShape
from horse_dist.perf import flops
from horse_dist.perf.flops import BatchShape, EditorShape
from horse_dist.training.assembly import build_engine, load_data

pytestmark = pytest.mark.bench

# vocab V=10, hidden H=4, 3 layers, intermediate 6, 2 query heads + 1 kv head of width 2 (query width q=4).
SMALL = LMShape(vocab=10, hidden=4, n_layers=3, intermediate=6, n_heads=2, n_kv_heads=1, head_dim=2)
BATCH = [BatchShape(rows=2, length=5, answers=3)]  # 10 padded tokens, N = 3 key rows
EDITOR = EditorShape(
    edited_layers=[1, 2],
    edited_shapes=[(6, 4), (6, 4)],  # down_proj: I = 6, O = 4
    rank=2,
    n_blocks=2,
    spread="orthogonal",
    learn_lambda=True,
    n_trainable=100,
)

TINY_OVERRIDES = [
    "model.source=random:tiny_llama",
    "model.n_edit_layers=2",
    "method.rank=16",
    "method.chunk_rows=64",
    "data.n_edits=16",
    "data.batch_size=8",
    "data.max_train_records=40",
    "data.eval_path=''",
    "data.eval_size=8",
    "tracking.enabled=false",
]


def test_flops_equal_hand_count():
    # Layer matmul weights: q 4·4 + o 4·4 + k 4·2 + v 4·2 + MLP 3·4·6 = 16+16+8+8+72 = 120.
    assert SMALL.layer_matmul_params() == 120
    # Forward per padded token: 3 layers × (2·120 + 4·T·q = 4·5·4 = 80) = 960; × 10 tokens = 9600;
    # head at 3 answer positions: 3 · 2·4·10 = 240.
    assert flops.lm_forward_flops(SMALL, BATCH) == 9600 + 240
    # Backward from the head to above layer 1: layer 2 only, 2·120 + 8·5·4 = 400 per token -> 4000; head 240.
    assert flops.lm_backward_flops(SMALL, BATCH, lowest_edited=1) == 4000 + 240
    # The cache pass needs it at the 3 answer positions only: 3 · 400 + head 240.
    assert flops.lm_backward_flops(SMALL, BATCH, lowest_edited=1, answers_only=True) == 1200 + 240
    # Shift hooks, 10 tokens, 2·10·6·4 = 480 per matmul: lowest layer 2 matmuls, layer above 3 -> 5·480.
    assert flops.shift_hook_flops(EDITOR.edited_shapes, EDITOR.edited_layers, BATCH) == 2400
    # Hypernet N=3, F=10, R=2, 2 blocks: 2 · 4·3·10·2 = 480, + residual 2·3·6 + 3·4 = 48.
    assert flops.hypernet_forward_flops(3, 6, 4, 2, 2) == 528
    # Inference may multiply by A B instead: 2·N·F² = 600 per block > 4·N·F·R = 240, so the thin products.
    assert flops.hypernet_forward_flops(3, 6, 4, 2, 2, inference=True) == 528
    assert flops.hypernet_forward_flops(3, 6, 4, 8, 2, inference=True) == 2 * 600 + 48  # R = 8: A B
    # Backward: recompute 528 + dB,dz,dA 2·(6·3·10·2)=720 + dy of block 2 (2·3·10·2)=120 + residual 36+36.
    assert flops.hypernet_backward_flops(3, 6, 4, 2, 2) == 528 + 720 + 120 + 72
    # Primal: KᵀK 2·3·36=216, KᵀD 2·3·6·4=144, chol 6³/3=72, solves 2·36·4=288.
    assert flops.solve_flops(3, 6, 4, "primal") == 216 + 144 + 72 + 288
    # Dual: KKᵀ 2·9·6=108, chol 3³/3=9, solves 2·9·4=72, Kᵀ(·) 2·3·6·4=144.
    assert flops.solve_flops(3, 6, 4, "dual") == 108 + 9 + 72 + 144
    # Meta-gradient primal: solves 288 + K M 144 + ⟨M, S⟩ 2·6·4=48; dual: 288 + 72 + 144 + 48.
    assert flops.meta_gradient_flops(3, 6, 4, "primal", learn_lambda=True) == 480
    assert flops.meta_gradient_flops(3, 6, 4, "dual", learn_lambda=True) == 552
    # Embeddings 2·10·4 + 3 × (120 + 2 norms of 4) + final norm 4.
    assert SMALL.n_params() == 80 + 384 + 4

    step = flops.meta_step_flops(
        SMALL, EDITOR, BATCH, BATCH, BATCH, ["primal", "dual"], "bfloat16", "float64"
    )
    assert step["cache"] == {"bfloat16": 9840 + 1440}
    assert step["generalisation"] == {"bfloat16": 14080, "float32": 2400}
    assert step["hypernet_forward"] == {"float32": 2 * 528}
    assert step["spread"] == {"float32": 6 * 3 * 4}  # one layer pair: two dots + one axpy over (3, 4)
    assert step["solve"] == {"float32": 216 + 144, "float64": 72 + 288 + 333}
    assert step["meta_gradient"] == {"float64": 288 + 288 + 72, "float32": 2 * (144 + 48) + 4 * 3 * 4}
    assert step["hypernet_backward"] == {"float32": 2 * (1440 - 528)}  # 3 rows fit a chunk: no recompute
    assert step["optimizer"] == {"float32": 15 * 100}
    assert step["communication"] == {}
    rates = {"bfloat16": 1e3, "float32": 1e2, "float64": 1e1}
    assert flops.floor_seconds(step["generalisation"], rates) == pytest.approx(14080 / 1e3 + 2400 / 1e2)
    with pytest.raises(KeyError, match="float64"):
        flops.floor_seconds(step["solve"], {"float32": 1.0})


def test_llama2_shape_table_parameter_counts():
    # Known sizes of meta-llama/Llama-2-{7,13}b-hf, from the shape table alone (nothing allocated).
    assert RANDOM_SHAPES["llama2_7b"].n_params() == 6_738_415_616
    assert RANDOM_SHAPES["llama2_13b"].n_params() == 13_015_864_320


def test_random_tiny_llama_loads_with_table_shapes():
    model, tokenizer = load_frozen_lm("random:tiny_llama", dtype="float32", device="cpu")
    table = RANDOM_SHAPES["tiny_llama"]
    assert bench.lm_shape_of(model) == table
    assert sum(p.numel() for p in model.parameters()) == table.n_params()
    assert not any(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight.shape == (table.vocab, table.hidden)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (table.hidden, table.intermediate)
    ids = tokenizer(["What is the capital of France? Paris", "Toko Yasuda plays the guitar"])["input_ids"]
    assert max(max(row) for row in ids) < table.vocab and tokenizer.padding_side == "right"
    again, _ = load_frozen_lm("random:tiny_llama", dtype="float32", device="cpu")
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, again.model.layers[1].mlp.down_proj.weight)
    with pytest.raises(ValueError, match="unknown random model"):
        load_frozen_lm("random:llama9_1b")


@pytest.fixture(scope="module")
def tiny_engine():
    cfg = load_config(None, TINY_OVERRIDES)
    engine, tokenizer = build_engine(cfg)
    engine.model.config._attn_implementation = "eager"  # attention as plain matmuls the counter sees
    return engine, load_data(cfg, tokenizer)


def test_flops_match_torch_flop_counter(tiny_engine):
    """The matmul FLOPs of the real passes (torch's counter) equal the formulas exactly."""
    engine, pools = tiny_engine
    batches = engine.batches_for(pools.train, list(range(8)))
    shape, editor = bench.lm_shape_of(engine.model), bench.editor_shape(engine)
    lowest = min(editor.edited_layers)
    with FlopCounterMode(display=False) as counter:
        cache = cache_pass(engine.model, engine.hooks, batches.edit, 8, 8.0)
    edit = bench.batch_shapes(batches.edit)
    expected = flops.lm_forward_flops(shape, edit) + flops.lm_backward_flops(shape, edit, lowest)
    assert counter.get_total_flops() == expected

    # The answer-tail cache pass (engine default on a CPU): blocks below l0 on the (B, T) tokens, blocks from
    # l0 on the context slots (B, C) without a graph (the last one without its MLP), then on the tail slots
    # (B, Q) that see C + Q keys, and the backward at the tail slots only.
    assert engine.answer_tail
    with FlopCounterMode(display=False) as counter:
        tailed = engine.cache(batches)
    torch.testing.assert_close(tailed.grads[0], cache.grads[0], rtol=1e-4, atol=1e-6)
    params, q, head = shape.layer_matmul_params(), shape.query_width, 2 * shape.hidden * shape.vocab
    expected = 0
    for batch in batches.edit:
        layout = tail_layout(batch)
        (rows, t), c, k = batch.input_ids.shape, layout.context_BC.shape[1], layout.tail_BQ.shape[1]
        expected += rows * t * lowest * (2 * params + 4 * t * q)
        expected += rows * c * (shape.n_layers - lowest) * (2 * params + 4 * c * q)
        expected -= rows * c * 2 * 3 * shape.hidden * shape.intermediate  # the last block's MLP, skipped
        expected += rows * k * (shape.n_layers - lowest) * (2 * params + 4 * (c + k) * q)
        expected += rows * k * (shape.n_layers - 1 - lowest) * (2 * params + 8 * (c + k) * q)
        expected += 2 * batch.num_answer_tokens * head
    assert counter.get_total_flops() == expected

    shifts = [torch.zeros(d_in, d_out, requires_grad=True) for d_in, d_out in engine.shapes]
    with FlopCounterMode(display=False) as counter:
        loss_pass(engine.model, engine.hooks, batches.equiv, shifts, 8, "ce", 0.125)
    equiv = bench.batch_shapes(batches.equiv)
    expected = (
        flops.lm_forward_flops(shape, equiv)
        + flops.lm_backward_flops(shape, equiv, lowest)
        + flops.shift_hook_flops(editor.edited_shapes, editor.edited_layers, equiv)
    )
    assert counter.get_total_flops() == expected

    (d_in, d_out), n = engine.shapes[0], cache.keys[0].shape[0]
    net, index = engine.bank.net(0)
    with FlopCounterMode(display=False) as counter:
        hypernet_vjp(net, cache.keys[0], cache.grads[0], index, torch.randn(n, d_out), chunk_rows=7)
    # The counter sees matmuls only: take away the residual's elementwise terms of forward and backward.
    elementwise = (2 * n * d_in + n * d_out) + (3 * n * d_out + 2 * n * d_in)  # forward + backward
    matmul_only = flops.hypernet_backward_flops(n, d_in, d_out, editor.rank, editor.n_blocks) - elementwise
    assert counter.get_total_flops() == matmul_only
    # A meta-step whose rows fit one chunk keeps the forward's graph: the backward is the VJP alone.
    with torch.enable_grad():
        delta = residual(cache.keys[0], *net(cache.keys[0], cache.grads[0], index), net.step_size(index))
    with FlopCounterMode(display=False) as counter:
        delta.backward(torch.randn(n, d_out))
    kept = flops.hypernet_backward_flops(n, d_in, d_out, editor.rank, editor.n_blocks, recompute=False)
    assert counter.get_total_flops() == kept - (3 * n * d_out + 2 * n * d_in)


def test_timed_edit_leaves_the_model_unedited(tiny_engine):
    engine, pools = tiny_engine
    optimizer = engine.make_optimizer()
    engine.meta_step(engine.batches_for(pools.train, list(range(16))), optimizer)  # normaliser statistics
    before = [engine.model.get_submodule(n).weight.clone() for n in engine.module_names]
    seconds, batches, n_rows = bench.timed_edit(engine, bench.edit_examples(pools.train.edit, 50))
    assert sum(len(b.sequence_shapes()) for b in batches) == 50  # 40 records cycled to 50 facts
    assert n_rows == sum(b.num_answer_tokens for b in batches)
    assert seconds["seconds"] == pytest.approx(seconds["cache"] + seconds["predict"] + seconds["apply"])
    for name, weight in zip(engine.module_names, before):
        assert torch.equal(engine.model.get_submodule(name).weight, weight), name


def test_bench_smoke_report(tmp_path):
    out = tmp_path / "bench.json"
    overrides = TINY_OVERRIDES + [
        "bench.steps=3",
        "bench.warmup_steps=1",
        "bench.edit_sizes=[4,60]",
        "bench.edit_repeats=1",
        "bench.probe_sizes=[128,256]",
        f"bench.out={out}",
    ]
    printed = bench.main(overrides)
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(printed))
    assert set(report) >= {"device", "model", "probe", "meta_step", "edits", "memory", "config"}
    meta = report["meta_step"]
    assert set(meta["phases"]) == set(flops.PHASES)
    for phase in meta["phases"].values():
        assert set(phase) == {"seconds", "flops", "floor_seconds", "fraction"}
    assert len(meta["wall_seconds_all"]) == 3
    for wall, phase_sum in zip(meta["wall_seconds_all"], meta["phase_sum_seconds_all"]):
        assert abs(wall - phase_sum) <= 0.1 * wall, f"phases sum to {phase_sum:.4f}s of a {wall:.4f}s step"
    assert 0 < meta["fraction"] <= 1 and meta["flops"] > 0 and meta["comm_bytes"] == 0
    assert meta["phases"]["cache"]["flops"] > meta["phases"]["optimizer"]["flops"] > 0
    sizes = [row["n_facts"] for row in report["edits"]]
    assert sizes == [4, 16, 60]  # bench.edit_sizes plus data.n_edits
    assert [row["records_cycled"] for row in report["edits"]] == [False, False, True]  # 40 + 8 records
    for row in report["edits"]:
        assert set(row["phases"]) == set(flops.EDIT_PHASES)
        assert row["edits_per_s"] == pytest.approx(row["n_facts"] / row["seconds"])
    assert report["model"]["n_params"] == report["model"]["n_params_formula"]
    probe = report["probe"]
    assert (
        probe["flops_per_second"]["float32"] == max(probe["before"]["float32"], probe["after"]["float32"]) > 0
    )
    assert report["memory"]["peak_rss_gb"] > 0


def test_the_floor_counts_real_tokens_not_padding(tiny_engine):
    """useful_shapes: one unpadded sequence per row, so padding lowers the achieved fraction, never the floor."""
    engine, pools = tiny_engine
    batches = engine.batches_for(pools.train, list(range(8))).edit
    useful, padded = bench.useful_shapes(batches), bench.batch_shapes(batches)
    assert len(useful) == 8 and all(s.rows == 1 for s in useful)
    assert sum(s.length for s in useful) == sum(int(b.attention_mask.sum()) for b in batches)
    assert sum(s.answers for s in useful) == sum(s.answers for s in padded)
    shape = bench.lm_shape_of(engine.model)
    assert flops.lm_forward_flops(shape, useful) <= flops.lm_forward_flops(shape, padded)


def test_bench_ab_interleaves_variants_and_reports_paired_ratios(tmp_path):
    from horse_dist import bench_ab

    out = tmp_path / "ab.json"
    report = bench_ab.main(
        [
            "--variant",
            "data.packing=padded",
            "--variant=data.packing=packed,data.pack_row_tokens=32",
            *TINY_OVERRIDES,
            "bench.steps=2",
            "bench.edit_sizes=[8]",
            f"bench.out={out}",
        ]
    )
    first, second = report["variants"]
    assert first["variant"] == "data.packing=padded" and second["variant"].endswith("pack_row_tokens=32")
    assert first["meta_step_ratio"] == 1.0 and first["edit_ratio"] == 1.0
    assert len(second["meta_step_all"]) == 2 and report["edit_facts"] == 8
    expected = statistics.median(a / b for a, b in zip(second["meta_step_all"], first["meta_step_all"]))
    assert second["meta_step_ratio"] == pytest.approx(expected)
    assert json.loads(out.read_text())["rounds"] == 2
    with pytest.raises(ConfigError, match="at least two --variant"):
        bench_ab.main(["--variant", "data.packing=padded", *TINY_OVERRIDES])
