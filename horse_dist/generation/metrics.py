"""Scores of generated continuations: pure functions on token ids and strings (no model).

- `target_is_prefix`: live editing success, the target answer starts the continuation once both are
  whitespace- and case-normalised (EasyEdit / the live-decoding studies' "exact match of the generation").
- `token_prefix_fraction`: how many of the target's tokens the greedy continuation reproduces in order
  from its first token, over the target's length.
- `same_first_tokens`: locality under generation: the first k generated ids equal the reference's.
- `ngram_entropy`: ROME/MEMIT's generation entropy, the 2/3 : 4/3 weighted mean of the bi- and tri-gram
  entropies (bits) of a text's word sequence.
- `has_repeated_ngram`: a loop, the same n-gram twice within the first `window` generated ids.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORDS = re.compile(r"\w+|[^\w\s]")
ENTROPY_ORDERS = (2, 3)
ENTROPY_WEIGHTS = (2.0 / 3.0, 4.0 / 3.0)


def normalise(text: str) -> str:
    """Lower case, runs of whitespace collapsed to one space, stripped."""
    return " ".join(text.lower().split())


def target_is_prefix(continuation: str, target: str) -> bool:
    """Whether the normalised target starts the normalised continuation (an empty target never does)."""
    target = normalise(target)
    return bool(target) and normalise(continuation).startswith(target)


def token_prefix_fraction(generated: Sequence[int], target: Sequence[int]) -> float:
    """Length of the common prefix of the generated and target ids, over the target's length."""
    if not target:
        raise ValueError("the target answer has no tokens")
    matched = 0
    for produced, wanted in zip(generated, target):
        if produced != wanted:
            break
        matched += 1
    return matched / len(target)


def same_first_tokens(generated: Sequence[int], reference: Sequence[int], k: int) -> bool:
    """Whether the first k ids agree; a side that stopped early must have stopped at the same place."""
    return list(generated[:k]) == list(reference[:k])


def words(text: str) -> list[str]:
    """Word and punctuation tokens (the role nltk's word_tokenize plays in ROME's entropy)."""
    return _WORDS.findall(text.lower())


def _entropy_bits(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def ngram_entropy(text: str) -> float:
    """Σ_n w_n H_n / |n| over n = 2, 3 with weights 2/3, 4/3 (ROME's `compute_n_gram_entropy`, arithmetic
    mean), where H_n is the entropy in bits of the text's n-gram frequencies; 0 for too short a text."""
    tokens = words(text)
    entropies = [
        _entropy_bits(Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)))
        for n in ENTROPY_ORDERS
    ]
    return sum(w * h for w, h in zip(ENTROPY_WEIGHTS, entropies)) / len(ENTROPY_ORDERS)


def has_repeated_ngram(ids: Sequence[int], n: int = 3, window: int = 12) -> bool:
    """Whether some n-gram occurs twice among the first `window` ids (the edited model's loops)."""
    head = list(ids[:window])
    grams = [tuple(head[i : i + n]) for i in range(len(head) - n + 1)]
    return len(grams) != len(set(grams))
