"""Key statistics (issue 6 item 2): accumulation against a float64 reference, fixed shards, cache, resume, Ray."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model

from horse_dist.config import load_config
from horse_dist.keystats import job as job_module
from horse_dist.keystats.accumulate import KeyStats, accumulate_texts, key_capture, token_counts
from horse_dist.keystats.corpus import build_corpus, plan_shards
from horse_dist.keystats.job import FAULT_AFTER_ENV, FAULT_MARKER_ENV, load_stats_file, plan_job, run_job
from horse_dist.lm.load import load_frozen_lm

TEXTS = [
    "The capital of France is Paris",
    "Danielle Darrieux speaks French",
    "a",
    "What university did Watts Humphrey attend? Illinois Institute of Technology",
    "nq question: who played desmond doss father in hacksaw ridge? Hugo Weaving",
    "The mother tongue of Danielle Darrieux is French",
    "Michel Rocard is a native speaker of French",
]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keystats_models")
    return {arch: save_tiny_model(root / arch, arch) for arch in ("llama", "gpt2")}


def _cfg(cache_dir: Path, *extra: str):
    overrides = [
        f"keystats.cache_dir={cache_dir}",
        "keystats.num_workers=0",
        "keystats.max_tokens=1500",
        "keystats.shard_tokens=300",
        "keystats.batch_size=4",
        "model.n_edit_layers=2",
        *extra,
    ]
    return load_config(None, overrides)


def _direct_stats(
    model, tokenizer, names: list[str], texts: list[str], max_length: int
) -> dict[str, KeyStats]:
    """Reference: each text alone (no padding), a plain forward hook keeps the whole module input."""
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: kept[name].append(i[0][0]))
        for name in names
    ]
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")[
                    "input_ids"
                ]
                model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name in names:
        keys_NI = torch.cat(kept[name]).double()
        out[name] = KeyStats(keys_NI.T @ keys_NI, keys_NI.sum(0), keys_NI.shape[0])
    return out


def _assert_stats_close(got: dict[str, KeyStats], want: dict[str, KeyStats], rtol: float) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].count == want[name].count, name
        scale = want[name].second_moment.abs().max().item()
        err = (got[name].second_moment - want[name].second_moment).abs().max().item()
        assert err <= rtol * scale, f"{name}: second moment max error {err:.3e} vs scale {scale:.3e}"
        sum_err = (got[name].key_sum - want[name].key_sum).abs().max().item()
        assert sum_err <= rtol * max(want[name].key_sum.abs().max().item(), 1.0), f"{name}: key sum {sum_err}"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_accumulation_equals_float64_reference(tiny_dirs, arch):
    model, tokenizer = load_frozen_lm(str(tiny_dirs[arch]))
    model = copy.deepcopy(
        model
    ).double()  # the whole forward in float64: differences are summation order only
    names = job_module.resolve_module_names(str(tiny_dirs[arch]), [], 2, model)
    max_length = 12  # truncates the longer texts
    got = accumulate_texts(model, tokenizer, names, TEXTS, max_length=max_length, batch_size=3)
    want = _direct_stats(model, tokenizer, names, TEXTS, max_length)
    assert got[names[0]].count == sum(token_counts(tokenizer, TEXTS, max_length))
    assert (
        got[names[0]].second_moment.shape == (128, 128) and got[names[0]].second_moment.dtype == torch.float64
    )
    _assert_stats_close(got, want, rtol=1e-12)


def test_fp32_model_padding_and_stop_early(tiny_dirs):
    """The fp32 model in padded batches matches per-text forwards to fp32 tolerance; stopping the forward after
    the last edited module changes nothing; float32 accumulation is close."""
    model, tokenizer = load_frozen_lm(str(tiny_dirs["llama"]))
    names = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    kw = {"max_length": 64, "batch_size": 4}
    early = accumulate_texts(model, tokenizer, names, TEXTS, stop_early=True, **kw)
    full = accumulate_texts(model, tokenizer, names, TEXTS, stop_early=False, **kw)
    for name in names:
        assert torch.equal(early[name].second_moment, full[name].second_moment)
    _assert_stats_close(early, _direct_stats(model, tokenizer, names, TEXTS, 64), rtol=1e-5)
    fp32 = accumulate_texts(model, tokenizer, names, TEXTS, dtype=torch.float32, **kw)
    assert fp32[names[0]].second_moment.dtype == torch.float32
    _assert_stats_close(
        {n: KeyStats(s.second_moment.double(), s.key_sum.double(), s.count) for n, s in fp32.items()},
        early,
        1e-5,
    )


def test_hooks_removed_on_exception(tiny_dirs):
    model, tokenizer = load_frozen_lm(str(tiny_dirs["llama"]))
    names = ["model.layers.1.mlp.down_proj"]
    module = model.get_submodule(names[0])
    stats = {
        names[0]: KeyStats(
            torch.zeros(128, 128, dtype=torch.float64), torch.zeros(128, dtype=torch.float64), 0
        )
    }
    with pytest.raises(RuntimeError, match="boom"):
        with key_capture(model, names, stats, stop_early=True):
            assert len(module._forward_pre_hooks) == 1
            raise RuntimeError("boom")
    assert len(module._forward_pre_hooks) == 0
    bad = ["hello"] * 3
    with pytest.raises(ValueError, match="batch_size"):
        accumulate_texts(model, tokenizer, names, bad, max_length=8, batch_size=0)
    assert len(module._forward_pre_hooks) == 0


def test_plan_shards_fixed_and_bounded():
    texts = [f"t{i}" for i in range(10)]
    counts = [5, 3, 9, 1, 1, 12, 2, 2, 2, 4]
    shards = plan_shards(counts, texts, shard_tokens=8, max_tokens=0)
    assert [(s.start, s.stop) for s in shards] == [(0, 2), (2, 3), (3, 5), (5, 6), (6, 9), (9, 10)]
    assert [s.n_tokens for s in shards] == [8, 9, 2, 12, 6, 4]  # over 8 only for a single long text
    capped = plan_shards(counts, texts, shard_tokens=8, max_tokens=20)
    assert capped[-1].stop == 5 and sum(s.n_tokens for s in capped) == 19  # the prefix within 20 tokens
    assert capped[:2] == shards[:2]  # a cap never moves earlier shard boundaries
    with pytest.raises(ValueError, match="shard_tokens"):
        plan_shards(counts, texts, shard_tokens=0, max_tokens=0)


def test_bundled_corpus_and_shards_independent_of_workers(tiny_dirs, tmp_path):
    corpus = build_corpus("bundled")
    assert len(corpus.texts) > 10000 and len(set(corpus.texts)) == len(corpus.texts)
    assert corpus.texts[0] == "What university did Watts Humphrey attend? Illinois Institute of Technology"
    assert build_corpus("bundled").digest() == corpus.digest()  # stable order
    head = corpus.texts[:9]  # round-robin over zsRE head, zsRE tail, CounterFact records
    assert head[6].startswith("The mother tongue of Danielle Darrieux is") and "Albert Kautz" in head[3]
    plans = [
        plan_job(_cfg(tmp_path, f"keystats.num_workers={n}"), str(tiny_dirs["llama"]), []) for n in (0, 1, 2)
    ]
    assert plans[0].shards == plans[1].shards == plans[2].shards
    assert plans[0].content_hash == plans[1].content_hash == plans[2].content_hash
    assert len(plans[0].shards) >= 5
    assert plans[0].module_names == ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"]
    other = plan_job(_cfg(tmp_path, "keystats.max_length=16"), str(tiny_dirs["llama"]), [])
    assert other.content_hash != plans[0].content_hash


def test_local_job_cache_and_provenance(tiny_dirs, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    stats, prov, report = run_job(cfg, str(tiny_dirs["llama"]))
    plan = plan_job(cfg, str(tiny_dirs["llama"]), [])
    assert not report.reused and report.computed == list(range(len(plan.shards))) and report.skipped == []
    texts = plan.corpus.texts[: plan.shards[-1].stop]
    model, tokenizer = load_frozen_lm(str(tiny_dirs["llama"]))
    direct = accumulate_texts(model, tokenizer, plan.module_names, texts, max_length=128, batch_size=4)
    _assert_stats_close(stats, direct, rtol=1e-6)  # different batching than the shards: fp32 forward noise
    n_tokens = sum(s.n_tokens for s in plan.shards)
    assert prov["n_tokens"] == n_tokens <= 1500 and all(s.count == n_tokens for s in stats.values())
    assert prov["layer_indices"] == [2, 3] and prov["module_names"] == plan.module_names
    assert prov["corpus"] == "bundled" and prov["n_texts"] == len(texts) and prov["dtype"] == "float64"
    assert (plan.root / "provenance.json").is_file() and (plan.root / "stats.pt").is_file()
    saved, saved_prov = load_stats_file(plan.stats_path)
    assert torch.equal(saved[plan.module_names[0]].second_moment, stats[plan.module_names[0]].second_moment)

    # Reuse: nothing runs (accumulation would raise), the file is not rewritten.
    mtime = plan.stats_path.stat().st_mtime_ns

    def no_compute(*args, **kwargs):
        raise AssertionError("recomputed a cached result")

    monkeypatch.setattr(job_module, "accumulate_texts", no_compute)
    again, _, report = run_job(cfg, str(tiny_dirs["llama"]))
    assert report.reused and report.computed == [] and plan.stats_path.stat().st_mtime_ns == mtime
    assert torch.equal(again[plan.module_names[1]].second_moment, stats[plan.module_names[1]].second_moment)


def test_resume_recomputes_only_missing_shards(tiny_dirs, tmp_path):
    cfg = _cfg(tmp_path)
    first, _, _ = run_job(cfg, str(tiny_dirs["llama"]))
    plan = plan_job(cfg, str(tiny_dirs["llama"]), [])
    # An interrupted run: no stats.pt, two shards never written, one torn file.
    plan.stats_path.unlink()
    plan.shard_path(1).unlink()
    plan.shard_path(3).unlink()
    plan.shard_path(4).write_bytes(b"not a torch file")
    kept = {i: plan.shard_path(i).stat().st_mtime_ns for i in (0, 2)}
    second, _, report = run_job(cfg, str(tiny_dirs["llama"]))
    assert sorted(report.computed) == [1, 3, 4]
    assert report.skipped == [i for i in range(len(plan.shards)) if i not in (1, 3, 4)]
    assert {i: plan.shard_path(i).stat().st_mtime_ns for i in (0, 2)} == kept
    for name in plan.module_names:  # same shards, same order: bit-identical
        assert torch.equal(first[name].second_moment, second[name].second_moment)


def test_in_process_model_api(tiny_dirs, tmp_path):
    model, tokenizer = load_frozen_lm(str(tiny_dirs["gpt2"]))
    cfg = _cfg(tmp_path, "keystats.num_workers=2")  # a given model always runs in this process
    names = ["transformer.h.1.mlp.c_proj"]
    stats = job_module.load_or_compute_stats(
        cfg, str(tiny_dirs["gpt2"]), names, model=model, tokenizer=tokenizer
    )
    assert list(stats) == names and stats[names[0]].second_moment.shape == (128, 128)  # Conv1D (in, out)
    eig = torch.linalg.eigvalsh(stats[names[0]].second_moment)
    assert eig.min() > -1e-9 * eig.max()  # a Gram matrix: symmetric positive semi-definite


def test_bad_corpus_and_settings(tiny_dirs, tmp_path):
    source = str(tiny_dirs["llama"])
    with pytest.raises(FileNotFoundError, match="keystats.corpus=.*no such file"):
        run_job(_cfg(tmp_path, f"keystats.corpus={tmp_path}/missing.txt"), source)
    bad_column = tmp_path / "corpus.json"
    bad_column.write_text('{"body": "some text"}\n{"body": "more text"}\n')
    with pytest.raises(ValueError, match="no column 'text'"):
        run_job(_cfg(tmp_path, f"keystats.corpus={bad_column}"), source)
    with pytest.raises(ValueError, match="keystats.dtype"):
        run_job(_cfg(tmp_path, "keystats.dtype=float16"), source)
    with pytest.raises(ValueError, match="does not exist"):
        run_job(_cfg(tmp_path), source, ["model.layers.9.mlp.down_proj"])


def test_text_file_corpus(tiny_dirs, tmp_path):
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(TEXTS + ["", TEXTS[0]]) + "\n")  # an empty line and a duplicate
    corpus = build_corpus(str(corpus_file))
    assert corpus.texts == TEXTS
    _, prov, report = run_job(_cfg(tmp_path, f"keystats.corpus={corpus_file}"), str(tiny_dirs["llama"]))
    assert prov["n_texts"] == len(TEXTS) and str(corpus_file) in prov["corpus"] and not report.reused


# ---------------------------------------------------------------- real Ray (one local Ray for the module)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_one_vs_two_workers(ray_session, tiny_dirs, tmp_path):
    source = str(tiny_dirs["llama"])
    one, prov_one, rep_one = run_job(_cfg(tmp_path / "w1", "keystats.num_workers=1"), source)
    two, prov_two, rep_two = run_job(_cfg(tmp_path / "w2", "keystats.num_workers=2"), source)
    assert prov_one["content_hash"] == prov_two["content_hash"]
    assert sorted(rep_one.computed) == sorted(rep_two.computed) == list(range(prov_one["n_shards"]))
    for name in one:
        assert torch.allclose(one[name].second_moment, two[name].second_moment, rtol=1e-6, atol=0)
        assert torch.equal(one[name].second_moment, two[name].second_moment)  # reduced in fixed shard order
        assert one[name].count == two[name].count == prov_one["n_tokens"]


@pytest.mark.slow
def test_ray_resume_after_killed_worker(ray_session, tiny_dirs, tmp_path, monkeypatch):
    source = str(tiny_dirs["llama"])
    reference, _, _ = run_job(_cfg(tmp_path / "local"), source)  # uninterrupted, in process
    # The only worker exits hard (os._exit) after writing its second shard: the job fails, says how to resume.
    cfg = _cfg(tmp_path / "kill", "keystats.num_workers=1")
    monkeypatch.setenv(FAULT_AFTER_ENV, "2")
    monkeypatch.setenv(FAULT_MARKER_ENV, str(tmp_path / "fault_marker"))
    with pytest.raises(RuntimeError, match="rerun the same command to resume"):
        run_job(cfg, source)
    plan = plan_job(cfg, source, [])
    written = {s.index for s in plan.shards if plan.shard_path(s.index).is_file()}
    assert written == {0, 1} and len(plan.shards) > 2 and not plan.stats_path.exists()
    monkeypatch.delenv(FAULT_AFTER_ENV)
    resumed, _, report = run_job(cfg, source)
    assert sorted(report.skipped) == [0, 1]
    assert sorted(report.computed) == list(range(2, len(plan.shards)))
    for name in reference:
        assert torch.equal(resumed[name].second_moment, reference[name].second_moment)
        assert resumed[name].count == reference[name].count


def test_smollm2_keystats_config_loads():
    from horse_dist.config import CONFIG_DIR

    cfg = load_config(CONFIG_DIR / "keystats_smollm2.yaml", ["keystats.num_workers=1"])
    assert cfg.model.source == "smollm2-135m" and cfg.model.n_edit_layers == 6
    assert (cfg.keystats.corpus, cfg.keystats.shard_tokens, cfg.keystats.num_workers) == ("bundled", 2048, 1)
