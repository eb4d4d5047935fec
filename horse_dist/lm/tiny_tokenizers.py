"""Tiny offline tokenizers in the two styles that matter for label alignment (GPT-2 and Llama)."""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

_ZSRE_HEAD = Path(__file__).resolve().parents[2] / "data" / "zsre" / "zsre_mend_eval_head.json"
_CORPUS_RECORDS = 300
_FALLBACK_CORPUS = (
    "What is the capital of France? Paris",
    "The mother tongue of Danielle Darrieux is French",
    "Which university did Watts Humphrey attend? University of Michigan",
    "The Eiffel Tower is located in the city of Paris",
    "When was the company founded? In 1990, by two engineers from Berlin.",
    "nq question: who played the lead role in the film? Hugo Weaving",
    "Toko Yasuda plays the guitar and the piano.",
    "Which river flows through London? The Thames",
)


def default_corpus() -> list[str]:
    """A few hundred English lines from the bundled zsRE slice (questions with answers), if present."""
    if not _ZSRE_HEAD.is_file():
        return list(_FALLBACK_CORPUS)
    rows = json.loads(_ZSRE_HEAD.read_text(encoding="utf-8"))[:_CORPUS_RECORDS]
    lines = [f"{row['src']} {row['answers'][0]}" for row in rows]
    lines += [f"{row['rephrase']} {row['alt']}" for row in rows]
    lines += [f"{row['loc']}? {row['loc_ans']}" for row in rows]
    return lines + list(_FALLBACK_CORPUS)


def _wrap(tokenizer: Tokenizer, **special_tokens: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)


def build_bpe_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """GPT-2 style: byte-level BPE, a leading space is part of the word ('ĠParis'), no BOS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator(default_corpus() if texts is None else texts, trainer)
    return _wrap(tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>")


def build_sentencepiece_tokenizer(
    texts: Iterable[str] | None = None, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Llama style: '▁' word markers, BPE, BOS "<s>" prepended to every sequence.

    Like the Llama-2 tokenizer.json, the normalizer prepends '▁' and maps spaces to '▁' unconditionally, so
    " Paris" alone becomes ['▁', '▁Paris'] (the lone-'▁' quirk); a Metaspace pre-tokenizer with
    prepend_scheme "first"/"always" would hide that quirk, so splitting uses prepend_scheme "never".
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=list(string.printable.strip()) + ["▁"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(default_corpus() if texts is None else texts, trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return _wrap(tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
