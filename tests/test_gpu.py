"""The CUDA paths of local mode: a meta-step, the cache spill with paging, evaluation and editing on a GPU.

Skipped without CUDA (conftest). They import nothing beyond torch, transformers, omegaconf and the package, so they
run on a bare GPU machine too: `python -m pytest tests/test_gpu.py -m gpu`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from horse_dist.config import load_config

pytestmark = pytest.mark.gpu


def tiny_gpu_config(model_dir: Path, out_dir: Path, device: str, *extra: str):
    return load_config(
        None,
        [
            f"model.source={model_dir}",
            f"model.device={device}",
            "model.n_edit_layers=2",
            "method.rank=16",
            "data.n_edits=8",
            "data.batch_size=4",
            "data.max_train_records=64",
            "train.meta_lr=1e-3",
            f"train.out_dir={out_dir}",
            "tracking.enabled=false",
            *extra,
        ],
    )


def one_meta_step(cfg) -> tuple[torch.Tensor, dict[str, float], object, object]:
    """The hypernetwork's flat parameters after one meta-step, the step's metrics, the engine and data pools."""
    from horse_dist.data import meta_batch_indices
    from horse_dist.training.assembly import build_engine, load_data

    engine, tokenizer = build_engine(cfg)
    pools = load_data(cfg, tokenizer)
    optimizer = engine.make_optimizer()
    indices = meta_batch_indices(len(pools.train.edit), cfg.data.n_edits, cfg.train.seed, 0)
    metrics = engine.meta_step(engine.batches_for(pools.train, indices), optimizer)
    flat = torch.cat([p.detach().reshape(-1).cpu() for p in engine.bank.parameters()])
    return flat, metrics, engine, pools


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("gpu") / "llama", "llama")


def test_meta_step_on_cuda_matches_cpu(tiny_llama, tmp_path):
    cpu_params, cpu_metrics, _, _ = one_meta_step(tiny_gpu_config(tiny_llama, tmp_path, "cpu"))
    gpu_params, gpu_metrics, engine, _ = one_meta_step(tiny_gpu_config(tiny_llama, tmp_path, "cuda"))
    assert {p.device.type for p in engine.bank.parameters()} == {"cuda"}
    assert {p.device.type for p in engine.model.parameters()} == {"cuda"}
    # TF32 is off by default in PyTorch for matmuls, so fp32 CPU and GPU agree to rounding.
    torch.testing.assert_close(gpu_params, cpu_params, rtol=1e-4, atol=1e-5)
    for key in ("gen_loss_sum", "loc_loss_sum", "cache_loss_sum"):
        assert gpu_metrics[key] == pytest.approx(cpu_metrics[key], rel=1e-4)


def test_cuda_cache_spill_pages_layers_back(tiny_llama, tmp_path):
    from horse_dist.data import meta_batch_indices
    from horse_dist.dist.cache_store import PagedLayers

    resident, _, _, _ = one_meta_step(tiny_gpu_config(tiny_llama, tmp_path, "cuda"))
    spilled_cfg = tiny_gpu_config(tiny_llama, tmp_path, "cuda", "dist.cache_budget_gb=1e-7")
    spilled, _, engine, pools = one_meta_step(spilled_cfg)
    torch.testing.assert_close(spilled, resident, rtol=0, atol=0)

    batches = engine.batches_for(pools.train, meta_batch_indices(len(pools.train.edit), 8, 0, 1))
    cache = engine.cache(batches)
    assert isinstance(cache.keys, PagedLayers) and isinstance(cache.grads, PagedLayers)
    assert {t.device.type for t in cache.keys.layers} == {"cpu"}  # every layer left device memory
    assert cache.keys.resident_bytes() == 0
    assert all(k.device.type == "cuda" for k in cache.keys)  # and comes back on the device when read
    assert cache.keys[0].shape == (cache.example_ids.numel(), engine.shapes[0][0])


def test_evaluate_and_edit_on_cuda(tiny_llama, tmp_path):
    from horse_dist.lm.export import apply_shifts_
    from horse_dist.lm.passes import score_pass
    from horse_dist.training.assembly import build_engine, load_data
    from horse_dist.training.edit_call import apply_edits

    cfg = tiny_gpu_config(
        tiny_llama, tmp_path, "cuda", "method.eta_init_mode=key_energy", "method.eta_init=6"
    )
    engine, tokenizer = build_engine(cfg)
    pools = load_data(cfg, tokenizer)
    batches = engine.batches_for(pools.eval, list(range(8)))
    scores, _ = engine.evaluate_batch(batches)
    assert all(v.shape == (8,) for v in scores.values())
    assert float(scores["edited/ES"].mean()) >= float(scores["unedited/ES"].mean())

    requests = [(r.prompt, r.answer) for r in pools.eval_records[:8]]
    shifts, timings = apply_edits(engine, tokenizer, requests)
    assert all(s.device.type == "cuda" for s in shifts)
    merged_before = score_pass(engine.model, engine.hooks, batches.edit, 8, shifts).accuracy
    apply_shifts_(engine.model, dict(zip(engine.module_names, shifts)))
    merged_after = score_pass(engine.model, engine.hooks, batches.edit, 8).accuracy
    # Merging S into W gives the same predictions as applying it through the hooks.
    torch.testing.assert_close(merged_after, merged_before)
    assert timings["edit_success"] == pytest.approx(float(merged_after.mean()))


def test_torch_world_over_nccl_runs_a_meta_step(tiny_llama, tmp_path):
    """A one-process NCCL group: host-side tensors (metric vectors) go through the device and come back, and a
    meta-step through TorchWorld equals the local one."""
    import torch.distributed as dist

    from horse_dist.data import meta_batch_indices
    from horse_dist.dist.world import TorchWorld
    from horse_dist.training.assembly import build_engine, load_data

    local, _, _, _ = one_meta_step(tiny_gpu_config(tiny_llama, tmp_path, "cuda"))
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        world = TorchWorld()
        assert world.comm_device.type == "cuda"
        host = torch.tensor([1.0, 2.0], dtype=torch.float64)
        assert world.all_reduce_sum(host) is host and host.tolist() == [1.0, 2.0]
        cfg = tiny_gpu_config(tiny_llama, tmp_path, "cuda")
        engine, tokenizer = build_engine(cfg, world=world)
        pools = load_data(cfg, tokenizer)
        indices = meta_batch_indices(len(pools.train.edit), cfg.data.n_edits, cfg.train.seed, 0)
        engine.meta_step(engine.batches_for(pools.train, indices), engine.make_optimizer())
        distributed = torch.cat([p.detach().reshape(-1).cpu() for p in engine.bank.parameters()])
        assert world.bytes_moved["all_reduce"] > 0
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(distributed, local, rtol=0, atol=0)


def test_key_statistics_on_cuda_match_cpu(tiny_llama):
    """The sums live on the model's device (a GPU run found them on the host, beside CUDA keys)."""
    from horse_dist.keystats.accumulate import accumulate_texts
    from horse_dist.lm.load import load_frozen_lm
    from horse_dist.lm.registry import resolve_edit_modules

    texts = ["The capital of France is Paris.", "Watts Humphrey attended Trinity College.", "a b c"]
    results = []
    for device in ("cpu", "cuda"):
        model, tokenizer = load_frozen_lm(str(tiny_llama), device=device)
        names = resolve_edit_modules(model, None, 2)
        results.append(accumulate_texts(model, tokenizer, names, texts, max_length=32, batch_size=2))
    for name, on_cpu in results[0].items():
        on_gpu = results[1][name]
        assert on_gpu.count == on_cpu.count > 0 and on_gpu.second_moment.device.type == "cpu"
        torch.testing.assert_close(on_gpu.second_moment, on_cpu.second_moment, rtol=1e-4, atol=1e-6)
