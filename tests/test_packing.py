"""Packing's row search (FirstFit, SharedRows) against the plain scans it replaced, on shared-prefix data."""

import random

import pytest

from horse_dist.data import TokenizedExample, packing
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
def test_packing_equals_the_scans_it_replaced(seed, row_tokens, monkeypatch):
    examples = _examples(300, seed)
    scanned = _scan_pack_shared_rows(examples, row_tokens)
    capped = pack_shared_rows(examples, row_tokens)
    monkeypatch.setattr(packing, "SHARED_ROWS_SCANNED", len(examples))  # every row that shares a root
    assert pack_shared_rows(examples, row_tokens) == scanned
    lengths = [len(e.input_ids) for e in examples]
    assert pack_rows(lengths, row_tokens) == _scan_pack_rows(lengths, row_tokens)
    # scanning only the newest rows that share a root: every example once, rows within their length (a longer
    # sequence alone), and within 1 % of the scan's tokens (the trees' sizes)
    assert sorted(i for row in capped for i in row) == list(range(len(examples)))

    def tokens(rows):
        sizes = []
        for row in rows:
            tree = PrefixTree()
            for i in row:
                tree.add(i, examples[i])
            sizes.append(len(tree))
        assert all(size <= row_tokens or len(row) == 1 for size, row in zip(sizes, rows))  # or one longer
        return sum(sizes)

    assert tokens(capped) <= 1.01 * tokens(scanned)


def test_first_fit_finds_the_lowest_row_with_room():
    free = FirstFit()
    for space in (3, 9, 2, 9, 5):  # grows past its initial size
        free.append(space)
    assert [free.find(need) for need in (1, 4, 6, 9, 10)] == [0, 1, 1, 1, None]
    free.update(1, 0)
    assert [free.find(need) for need in (4, 6, 9)] == [3, 3, 3]


def test_the_row_length_chosen_on_a_sample_costs_within_a_percent_of_trying_every_length():
    examples = _examples(1500, 0)
    rows, length = packing.packed_rows(examples, 0, share=True)
    longest = max(len(e.input_ids) for e in examples)

    def cost(n_rows, length):
        return n_rows * length * (1 + length * packing.ATTENTION_COST_PER_POSITION)

    tried = {
        max(c, longest): len(pack_shared_rows(examples, max(c, longest))) for c in packing.ROW_CANDIDATES
    }
    assert length in tried and len(rows) == tried[length]  # the sample picks the length, all are packed
    assert cost(len(rows), length) <= 1.01 * min(cost(n, c) for c, n in tried.items())
    few = examples[: packing.LENGTH_SAMPLE]  # up to the sample's size, every length is tried on all of them
    best = min((cost(len(pack_shared_rows(few, c)), c), c) for c in packing.ROW_CANDIDATES)[1]
    assert packing.packed_rows(few, 0, share=True)[1] == best
