"""Randomly initialised Llama-shaped LMs for timing without downloads: `model.source=random:<name>`.

The weights are built directly on the target device in the target dtype (normal(0, 0.02), seeded); the
tokenizer is a Llama-style BPE trained on the bundled zsRE texts, its ids below the table's vocab.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from horse_dist.lm.shapes import LMShape
from horse_dist.lm.tiny_tokenizers import build_sentencepiece_tokenizer, default_corpus

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
_ZSRE_DIR = Path(__file__).resolve().parents[2] / "data" / "zsre"

# Real LLaMA-2 shapes (HF configs of meta-llama/Llama-2-{7,13}b-hf); tiny_llama is a few MB, for tests.
RANDOM_SHAPES: dict[str, LMShape] = {
    "llama2_7b": LMShape(
        vocab=32000, hidden=4096, n_layers=32, intermediate=11008, n_heads=32, n_kv_heads=32, head_dim=128
    ),
    "llama2_13b": LMShape(
        vocab=32000, hidden=5120, n_layers=40, intermediate=13824, n_heads=40, n_kv_heads=40, head_dim=128
    ),
    "tiny_llama": LMShape(
        vocab=1024, hidden=128, n_layers=4, intermediate=256, n_heads=4, n_kv_heads=2, head_dim=32
    ),
}
_TOKENIZER_VOCAB = 8000  # at most this many BPE tokens: the corpus is a few thousand lines
_MAX_POSITIONS = 4096  # LLaMA-2's context


def random_shape(name: str) -> LMShape:
    if name not in RANDOM_SHAPES:
        raise ValueError(f"unknown random model {name!r}; choose from {sorted(RANDOM_SHAPES)}")
    return RANDOM_SHAPES[name]


def bundled_texts() -> list[str]:
    """Every prompt and answer of the bundled zsRE slices (the tiny tokenizers' corpus if they are missing)."""
    lines: list[str] = []
    for path in sorted(_ZSRE_DIR.glob("*.json")):
        for row in json.loads(path.read_text(encoding="utf-8")):
            lines += [row["src"], row["rephrase"], row["loc"], row["loc_ans"], row["alt"], *row["answers"]]
    return lines or default_corpus()


def build_random_tokenizer(shape: LMShape) -> PreTrainedTokenizerBase:
    tokenizer = build_sentencepiece_tokenizer(bundled_texts(), vocab_size=min(shape.vocab, _TOKENIZER_VOCAB))
    if len(tokenizer) > shape.vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model's vocab {shape.vocab}")
    return tokenizer


def llama_config(shape: LMShape, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=_MAX_POSITIONS,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=shape.tied_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_random_model(
    shape: LMShape,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> PreTrainedModel:
    """Allocated and initialised on `device` in `dtype` (no CPU copy of a 7B model), in eval mode."""
    config = llama_config(shape, tokenizer)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):  # seed locally
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load_random_lm(
    name: str, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A frozen random LM of the named shape and its right-padding tokenizer (as load_frozen_lm returns)."""
    shape = random_shape(name)
    tokenizer = build_random_tokenizer(shape)
    log.info("random %s: %.3g parameters, %s on %s", name, shape.n_params(), dtype, device)
    model = build_random_model(shape, tokenizer, dtype, device, seed)
    model.requires_grad_(False)
    tokenizer.padding_side = "right"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
