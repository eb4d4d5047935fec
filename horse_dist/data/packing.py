"""Padding-free micro-batches: several sequences per row, shared prompt prefixes computed once.

On a CPU a pass costs its padded token count. Rectangular batches of zsRE prompts (7 to 60 tokens) carry
20-30 % padding even sorted by length; rows of 64 tokens packed first-fit-decreasing carry a few percent,
and attention over 64 positions costs ~2 % of a SmolLM2 block's matmuls.

Prompts also start alike (zsRE: "What is the ...", every locality prompt "nq question: ..."). A row is a
prefix tree laid out depth-first: sequences with the same leading tokens share those positions, each token
sees its ancestors only and sits at its depth, so every sequence's logits are what it would get alone. Only
positions no loss reads are shared (a prompt minus its last token): answer positions, hence key and
gradient rows, stay one per sequence, and a shared token's gradient is the sum its sequences would give it.
On 100 random zsRE records that drops 12 % of the edit prompts' tokens and 28 % of the locality prompts'.
Which positions see a token travels as `visible_until`; `lm.passes.model_inputs` makes it a 4-D mask.
"""

from __future__ import annotations

import torch

from horse_dist.data.batching import TokenBatch, check_min_batches
from horse_dist.data.tokenize import IGNORE_INDEX, TokenizedExample

Plan = list[list[list[int]]]  # micro-batches -> rows -> example indices


def shareable_length(example: TokenizedExample) -> int:
    """Leading positions whose output no loss reads (their labels are IGNORE_INDEX)."""
    for t, label in enumerate(example.labels):
        if label != IGNORE_INDEX:
            return t
    return len(example.labels)


class PrefixTree:
    """Sequences as root-to-leaf paths; the shareable leading tokens of a sequence reuse existing nodes."""

    def __init__(self, share: bool = True) -> None:
        self.share = share
        self.nodes: list[tuple[int, int, int, int]] = []  # (token, label, sequence that added it, depth)
        self.children: dict[int, list[int]] = {}  # parent (-1: root) -> children in insertion order
        self._shared: dict[tuple[int, int], int] = {}  # (parent, token) -> shareable node

    def __len__(self) -> int:
        return len(self.nodes)

    def _walk(self, input_ids: list[int], limit: int) -> tuple[int, int]:
        """(depth reached, node there) along existing shareable nodes, at most `limit` deep."""
        node, depth = -1, 0
        while depth < limit and (node, input_ids[depth]) in self._shared:
            node = self._shared[(node, input_ids[depth])]
            depth += 1
        return depth, node

    def _limit(self, example: TokenizedExample) -> int:
        return shareable_length(example) if self.share else 0

    def shares_root(self, token: int) -> bool:
        """Whether a sequence starting with `token` would reuse a node (its cost is below its length)."""
        return (-1, token) in self._shared

    def cost(self, example: TokenizedExample, limit: int | None = None) -> int:
        """Nodes that adding `example` would create (`limit`: its shareable length, if already known)."""
        limit = self._limit(example) if limit is None else limit
        return len(example.input_ids) - self._walk(example.input_ids, limit)[0]

    def add(self, index: int, example: TokenizedExample) -> None:
        ids, labels, limit = example.input_ids, example.labels, self._limit(example)
        depth, parent = self._walk(ids, limit)
        for t in range(depth, len(ids)):
            node = len(self.nodes)
            self.nodes.append((ids[t], labels[t], index, t))
            self.children.setdefault(parent, []).append(node)
            if t < limit:
                self._shared[(parent, ids[t])] = node
            parent = node

    def layout(self) -> tuple[list[int], list[int]]:
        """Nodes in depth-first pre-order, and for each (in that order) the end of its subtree: the
        positions p..end-1 are the node and its descendants, i.e. exactly the tokens that see it."""
        order: list[int] = []
        stack = list(reversed(self.children.get(-1, [])))
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(self.children.get(node, [])))
        size = [1] * len(order)
        for node in reversed(range(len(order))):  # children are created after their parents
            for child in self.children.get(node, []):
                size[node] += size[child]
        position = {node: p for p, node in enumerate(order)}
        return order, [position[node] + size[node] for node in order]


def prefix_groups(examples: list[TokenizedExample], row_tokens: int) -> tuple[list[list[int]], list[int]]:
    """Examples in token order, cut into groups that share a leading token and fit `row_tokens` as one
    tree (a single longer sequence gets its own), with each group's tree size."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].input_ids)
    groups: list[list[int]] = []
    sizes: list[int] = []
    tree = PrefixTree()
    for i in order:
        cost = tree.cost(examples[i])
        if groups and cost < len(examples[i].input_ids) and sizes[-1] + cost <= row_tokens:
            groups[-1].append(i)
            sizes[-1] += cost
        else:
            tree = PrefixTree()
            groups.append([i])
            sizes.append(len(examples[i].input_ids))
        tree.add(i, examples[i])
    return groups, sizes


class FirstFit:
    """Free space of the open rows; the lowest-index row with at least `need` free in O(log rows) (a max
    segment tree), where scanning every row made packing quadratic: 9 s for 2,000 locality prompts."""

    def __init__(self) -> None:
        self.n, self.size, self.tree = 0, 1, [-1, -1]

    def append(self, free: int) -> int:
        """Open a row with `free` space; returns its index."""
        if self.n == self.size:  # double the leaves, rebuild
            leaves = self.tree[self.size : self.size + self.n]
            self.size *= 2
            self.tree = [-1] * (2 * self.size)
            self.tree[self.size : self.size + self.n] = leaves
            for node in range(self.size - 1, 0, -1):
                self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])
        self.n += 1
        self.update(self.n - 1, free)
        return self.n - 1

    def update(self, row: int, free: int) -> None:
        node = self.size + row
        self.tree[node] = free
        while node > 1:
            node //= 2
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])

    def find(self, need: int) -> int | None:
        if self.tree[1] < need:
            return None
        node = 1
        while node < self.size:
            node = 2 * node if self.tree[2 * node] >= need else 2 * node + 1
        return node - self.size


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing: item indices per row, each row at most `row_tokens` long (a longer item gets
    a row of its own). Deterministic: ties keep index order."""
    rows: list[list[int]] = []
    free = FirstFit()
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = free.find(lengths[i])
        if r is None:
            rows.append([i])
            free.append(row_tokens - lengths[i])
        else:
            rows[r].append(i)
            free.update(r, free.tree[free.size + r] - lengths[i])
    return rows


SHARED_ROWS_SCANNED = 16


class SharedRows:
    """Rows as prefix trees, with their free space and, per leading token, the rows that could share it."""

    def __init__(self, row_tokens: int) -> None:
        self.row_tokens = row_tokens
        self.trees: list[PrefixTree] = []
        self.rows: list[list[int]] = []
        self.free = FirstFit()
        self.by_root: dict[int, list[int]] = {}  # leading token -> rows holding a shareable node for it

    def open(self) -> int:
        self.trees.append(PrefixTree())
        self.rows.append([])
        return self.free.append(self.row_tokens)

    def add(self, r: int, index: int, example: TokenizedExample) -> None:
        tree, first = self.trees[r], example.input_ids[0]
        shared_before = tree.shares_root(first)
        tree.add(index, example)
        self.rows[r].append(index)
        self.free.update(r, self.row_tokens - len(tree))
        if not shared_before and tree.shares_root(first):
            self.by_root.setdefault(first, []).append(r)

    def place_cheapest(self, index: int, example: TokenizedExample) -> None:
        """Add a sequence to the row where it adds the fewest tokens and fits (the lowest such row on a
        tie), or to a new row. A row that shares no leading token costs the whole sequence, so only the
        rows sharing its first token and the first row with room for all of it are candidates."""
        candidates, limit = [], shareable_length(example)
        least = len(example.input_ids) - limit  # what it costs even where all its shareable part exists
        # the newest rows sharing its first token, where the room is: scanning all of them made packing
        # quadratic where every prompt starts alike (zsRE's "nq question:": 1.3 s for 2,000 of them)
        for r in self.by_root.get(example.input_ids[0], [])[-SHARED_ROWS_SCANNED:]:
            room = self.row_tokens - len(self.trees[r])
            if room < least:
                continue
            cost = self.trees[r].cost(example, limit)
            if cost <= room:
                candidates.append((cost, r))
        first_fit = self.free.find(len(example.input_ids))
        if first_fit is not None:
            candidates.append((len(example.input_ids), first_fit))
        self.add(min(candidates)[1] if candidates else self.open(), index, example)


def pack_shared_rows(examples: list[TokenizedExample], row_tokens: int) -> list[list[int]]:
    """Prefix groups packed first-fit decreasing by tree size; a group of more than half a row that fits no
    open row is broken up, each sequence going where it adds the fewest tokens (whole large groups pack
    badly: on zsRE this saves ~2 % of the rows)."""
    groups, sizes = prefix_groups(examples, row_tokens)
    packed = SharedRows(row_tokens)
    for g in sorted(range(len(groups)), key=lambda g: -sizes[g]):
        r = packed.free.find(sizes[g])
        if r is None and packed.trees and sizes[g] > row_tokens // 2:
            for i in groups[g]:
                packed.place_cheapest(i, examples[i])
            continue
        if r is None:
            r = packed.open()
        for i in groups[g]:
            packed.add(r, i, examples[i])
    return packed.rows


# Row lengths tried when none is configured, and the price of attending over longer rows: measured on
# SmolLM2 on 2 CPU cores, a token in a 128-position row costs 5 % more than in a 64-position one.
ROW_CANDIDATES = (64, 80, 96, 112, 128)
ATTENTION_COST_PER_POSITION = 1 / 1200
# Examples the row length is chosen on (2,000 prompts: 5 packings of 256 and one of 2,000, against 5 of
# 2,000; the rows' cost within 0.9 % on zsRE's three views, docs/scaling.md)
LENGTH_SAMPLE = 256


def _pack(examples: list[TokenizedExample], length: int, share: bool) -> list[list[int]]:
    if share:
        return pack_shared_rows(examples, length)
    return pack_rows([len(example.input_ids) for example in examples], length)


def packed_rows(
    examples: list[TokenizedExample], row_tokens: int, share: bool
) -> tuple[list[list[int]], int]:
    """Rows of example indices and the row length: `row_tokens` (the longest sequence, if longer), or with
    0 the candidate length whose rows cost least. Longer rows leave less of a row empty and let more
    prompts share prefixes; they cost a little more attention per token. Above LENGTH_SAMPLE examples the
    length is chosen on an evenly strided sample of that many, and only it packs them all."""
    longest = max(len(example.input_ids) for example in examples)
    if row_tokens > 0:
        length = max(row_tokens, longest)
        return _pack(examples, length, share), length
    sample = examples[:: -(-len(examples) // LENGTH_SAMPLE)]
    options = []
    for length in ROW_CANDIDATES:
        length = max(length, longest)
        rows = _pack(sample, length, share)
        cost = len(rows) * length * (1 + length * ATTENTION_COST_PER_POSITION)
        options.append((cost, length, rows))
    _, length, rows = min(options, key=lambda option: option[:2])
    return (rows if len(sample) == len(examples) else _pack(examples, length, share)), length


def packed_plan(
    examples: list[TokenizedExample],
    max_rows: int,
    max_tokens: int = 0,
    min_batches: int = 0,
    row_tokens: int = 0,
    share: bool = True,
) -> Plan:
    """`packed_rows` (prefix trees with `share`, else one sequence after another; `row_tokens` 0: the
    cheapest candidate length) grouped into micro-batches of at most `max_rows` rows
    and `max_tokens` padded tokens (0: no limit). `min_batches` splits the largest micro-batches (by rows,
    then a lone row by its sequences) until there are that many: ZeRO-3 workers must run equal numbers of
    passes."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    check_min_batches(len(examples), min_batches)
    if not examples:
        return []
    rows, row_tokens = packed_rows(examples, row_tokens, share)
    plan: Plan = []
    for row in rows:
        if plan:
            batch = plan[-1]
            fits_tokens = max_tokens <= 0 or row_tokens * (len(batch) + 1) <= max_tokens
            if fits_tokens and len(batch) < max_rows:
                batch.append(row)
                continue
        plan.append([row])
    while len(plan) < min_batches:
        largest = max(range(len(plan)), key=lambda b: (len(plan[b]), sum(map(len, plan[b]))))
        batch = plan.pop(largest)
        if len(batch) == 1:  # one row: split its sequences into two rows
            row = batch[0]
            halves = [[row[: len(row) // 2]], [row[len(row) // 2 :]]]
        else:
            halves = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
        plan[largest:largest] = halves
    return plan


def collate_packed(
    examples: list[TokenizedExample], rows: list[list[int]], pad_id: int, share: bool = True
) -> TokenBatch:
    """One packed micro-batch; `rows` holds indices into `examples`, which are also the edit indices."""
    if not rows or not all(rows):
        raise ValueError("a packed micro-batch needs at least one row and no empty rows")
    trees = []
    for row in rows:
        tree = PrefixTree(share)
        for i in row:
            tree.add(i, examples[i])
        trees.append(tree)
    length = max(map(len, trees))
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    example_ids = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    visible_until = torch.arange(1, length + 1).repeat(len(rows), 1)  # a pad sees itself only
    for r, tree in enumerate(trees):
        order, ends = tree.layout()
        n = len(order)
        tokens, row_labels, sequences, depths = zip(*(tree.nodes[node] for node in order))
        input_ids[r, :n] = torch.tensor(tokens)
        labels[r, :n] = torch.tensor(row_labels)
        attention_mask[r, :n] = 1
        example_ids[r, :n] = torch.tensor(sequences)
        position_ids[r, :n] = torch.tensor(depths)
        visible_until[r, :n] = torch.tensor(ends)
    return TokenBatch(input_ids, attention_mask, labels, example_ids, visible_until, position_ids)


def packed_micro_batches(
    examples: list[TokenizedExample],
    max_rows: int,
    pad_id: int,
    max_tokens: int = 0,
    min_batches: int = 0,
    row_tokens: int = 0,
    share: bool = True,
) -> list[TokenBatch]:
    plan = packed_plan(examples, max_rows, max_tokens, min_batches, row_tokens, share)
    return [collate_packed(examples, rows, pad_id, share) for rows in plan]
