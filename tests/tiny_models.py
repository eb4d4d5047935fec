"""Tiny random causal LMs (offline, deterministic, sub-second) for unit tests and smoke runs."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from horse_dist.lm.tiny_tokenizers import build_bpe_tokenizer, build_sentencepiece_tokenizer

TINY_ARCHS = ("llama", "gpt2", "gptj", "mistral")
_DEFAULT_TOKENIZER = {"llama": "sentencepiece", "mistral": "sentencepiece", "gpt2": "bpe", "gptj": "bpe"}
_N_HEADS = 4
_MAX_POSITIONS = 256


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def _tiny_config(
    arch: str, tokenizer: PreTrainedTokenizerBase, n_layers: int, hidden: int, intermediate: int
) -> PretrainedConfig:
    common = {"vocab_size": len(tokenizer), **_special_ids(tokenizer)}
    if arch in ("llama", "mistral"):
        kw = dict(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=n_layers,
            num_attention_heads=_N_HEADS,
            num_key_value_heads=_N_HEADS // 2,  # exercise grouped-query attention like SmolLM2
            max_position_embeddings=_MAX_POSITIONS,
            **common,
        )
        if arch == "mistral":
            return MistralConfig(sliding_window=64, **kw)
        return LlamaConfig(**kw)
    # GPT-2 / GPT-J: dropout off so even train-mode forwards are deterministic.
    kw = dict(
        n_embd=hidden,
        n_layer=n_layers,
        n_head=_N_HEADS,
        n_inner=intermediate,
        n_positions=_MAX_POSITIONS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **common,
    )
    if arch == "gptj":
        return GPTJConfig(rotary_dim=8, **kw)
    if arch == "gpt2":
        return GPT2Config(**kw)
    raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")


def build_tiny_model(
    arch: str,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    n_layers: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
) -> PreTrainedModel:
    """A randomly initialised causal LM of ``arch`` (eval mode) whose vocab matches ``tokenizer``."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    config = _tiny_config(arch, tokenizer, n_layers, hidden, intermediate)
    with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    tokenizer_style: str | None = None,
    seed: int = 0,
    **kw,
) -> Path:
    """Build a tokenizer + tiny model and save both, so ``load_frozen_lm(str(out_dir))`` works."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    style = tokenizer_style or _DEFAULT_TOKENIZER[arch]
    builders = {"bpe": build_bpe_tokenizer, "sentencepiece": build_sentencepiece_tokenizer}
    if style not in builders:
        raise ValueError(f"tokenizer_style must be one of {sorted(builders)}, got {style!r}")
    tokenizer = builders[style]()
    model = build_tiny_model(arch, tokenizer, seed=seed, **kw)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# Overrides for a fast run on a random tiny Llama: two edited layers, 8 edits of the bundled zsRE head, an
# evaluation pool split off the same slice (tests build engines from these and add their own keys).
TINY_RUN_OVERRIDES = (
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
)
