"""Packing's row search (FirstFit, SharedRows) against the plain scans it replaced, on shared-prefix data."""

import random

import pytest

from horse_dist.data import TokenizedExample
from horse_dist.data.packing import FirstFit, PrefixTree, pack_rows, pack_shared_rows, prefix_groups


def _scan_pack_rows(lengths, row_tokens):
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, space in enumerate(free) if lengths[i] <= space), None)
        if r is None:
            rows.append([i])
            free.append(row_tokens - lengths[i])
        else:
            rows[r].append(i)
            free[r] -= lengths[i]
    return rows


def _scan_pack_shared_rows(examples, row_tokens):
    """Every open row tried for every placement: the quadratic reference."""
    groups, sizes = prefix_groups(examples, row_tokens)
    trees, rows = [], []

    def place_cheapest(i):
        fits = [(t.cost(examples[i]), r) for r, t in enumerate(trees)]
        fits = [(c, r) for c, r in fits if len(trees[r]) + c <= row_tokens]
        r = min(fits)[1] if fits else None
        if r is None:
            trees.append(PrefixTree())
            rows.append([])
            r = len(trees) - 1
        trees[r].add(i, examples[i])
        rows[r].append(i)

    for g in sorted(range(len(groups)), key=lambda g: -sizes[g]):
        r = next((r for r, t in enumerate(trees) if len(t) + sizes[g] <= row_tokens), None)
        if r is None and trees and sizes[g] > row_tokens // 2:
            for i in groups[g]:
                place_cheapest(i)
            continue
        if r is None:
            trees.append(PrefixTree())
            rows.append([])
            r = len(trees) - 1
        for i in groups[g]:
            trees[r].add(i, examples[i])
            rows[r].append(i)
    return rows


def _examples(n, seed):
    """Prompts from a few templates (shared prefixes, as zsRE's), answers of 1-4 tokens."""
    rng = random.Random(seed)
    templates = [[rng.randrange(5, 50) for _ in range(rng.randrange(2, 6))] for _ in range(4)]
    out = []
    for _ in range(n):
        prompt = rng.choice(templates) + [rng.randrange(50, 90) for _ in range(rng.randrange(1, 12))]
        answer = [rng.randrange(90, 99) for _ in range(rng.randrange(1, 5))]
        ids = prompt + answer[:-1]
        out.append(TokenizedExample(ids, [-100] * (len(prompt) - 1) + answer))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("row_tokens", [16, 32, 64])
def test_packing_equals_the_scans_it_replaced(seed, row_tokens):
    examples = _examples(300, seed)
    assert pack_shared_rows(examples, row_tokens) == _scan_pack_shared_rows(examples, row_tokens)
    lengths = [len(e.input_ids) for e in examples]
    assert pack_rows(lengths, row_tokens) == _scan_pack_rows(lengths, row_tokens)


def test_first_fit_finds_the_lowest_row_with_room():
    free = FirstFit()
    for space in (3, 9, 2, 9, 5):  # grows past its initial size
        free.append(space)
    assert [free.find(need) for need in (1, 4, 6, 9, 10)] == [0, 1, 1, 1, None]
    free.update(1, 0)
    assert [free.find(need) for need in (4, 6, 9)] == [3, 3, 3]
