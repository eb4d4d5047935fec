"""FLOP counts of a meta-step and of an edit call, from shapes and token counts only (no model execution).

Conventions: a multiply-add is 2 FLOPs; an (m, k) @ (k, n) matmul is 2·m·k·n. Per phase the count is split
by the dtype it runs in (the LM passes in the model dtype, the shift hooks, hypernet and meta-gradient in
float32, the ridge solve in its solve dtype), so each part can be divided by the matmul rate of that dtype.
Elementwise work (norms, activations, softmax, Adam) is memory-bound; only the few elementwise terms that
scale with the cache (spread, residual coefficient, optimizer) are counted, at 2 FLOPs per multiply-add.

What the passes do (horse_dist/lm/passes.py, hooks.py), with l0 = the lowest edited layer:
- every pass runs the whole LM forward on the padded (B, T) tokens, and the LM head on the P answer
  positions only: per padded token 2·(matmul weights of a layer) + 4·T·q (scores QKᵀ and weights·V, q = the
  query width) per layer; 2·H·V per answer position;
- the backward of the cache pass starts at l0's edited-module output (the hook detaches there) and only
  input-gradients are formed (the LM is frozen): head input-grad 2·H·V per answer position; layers above l0
  cost their forward matmuls again (dx = dy Wᵀ) plus 8·T·q for attention (dS, dV, dQ, dK), at the answer
  positions only (the loss reaches them through answer positions alone: lm/answer_tail.py);
- the loss passes add x S_l (I×O, float32) in every edited layer: forward 2·I·O per padded token; backward
  S_l.grad (xᵀ dy, 2·I·O per token) in every edited layer and dx through S (2·I·O) in the layers above l0;
- locality "kl" adds a no-grad reference forward.
Legend: N key rows (answer positions of the edit prompts), I = d_in, O = d_out, F = I + O, R = hypernet rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from horse_dist.lm.shapes import LMShape

PHASES = (
    "cache",
    "hypernet_forward",
    "spread",
    "solve",
    "generalisation",
    "locality",
    "meta_gradient",
    "hypernet_backward",
    "optimizer",
    "communication",
)
EDIT_PHASES = ("cache", "hypernet_forward", "spread", "solve", "apply")
ADAM_FLOPS_PER_PARAM = 12  # moments, bias corrections, sqrt, division, update
CLIP_FLOPS_PER_PARAM = 3  # squared norm (2) + scale (1)

PhaseFlops = dict[str, dict[str, float]]  # phase -> dtype name -> FLOPs


@dataclass(frozen=True)
class BatchShape:
    """One micro-batch as the LM sees it: `rows` sequences padded to `length`, `answers` answer positions."""

    rows: int
    length: int
    answers: int

    @property
    def padded_tokens(self) -> int:
        return self.rows * self.length


def _add(total: PhaseFlops, phase: str, dtype: str, flops: float) -> None:
    parts = total.setdefault(phase, {})
    parts[dtype] = parts.get(dtype, 0.0) + float(flops)


def lm_forward_flops(shape: LMShape, batches: list[BatchShape], first_block: int = 0) -> float:
    """Blocks `first_block`.. (a pass resumed from cached block inputs skips the rest) on every padded
    token + the head at the answer positions."""
    total = 0.0
    for b in batches:
        blocks = shape.n_layers - first_block
        per_token = blocks * (2 * shape.layer_matmul_params() + 4 * b.length * shape.query_width)
        total += b.padded_tokens * per_token + b.answers * 2 * shape.hidden * shape.vocab
    return total


def lm_backward_flops(
    shape: LMShape, batches: list[BatchShape], lowest_edited: int, answers_only: bool = False
) -> float:
    """Input-gradients from the head down to (not into) block `lowest_edited`: the frozen LM's share, at
    every padded token, or with `answers_only` (the cache pass's need) at the answer positions."""
    layers_above = shape.n_layers - 1 - lowest_edited
    total = 0.0
    for b in batches:
        per_token = layers_above * (2 * shape.layer_matmul_params() + 8 * b.length * shape.query_width)
        positions = b.answers if answers_only else b.padded_tokens
        total += positions * per_token + b.answers * 2 * shape.hidden * shape.vocab
    return total


def shift_hook_flops(
    edited_shapes: list[tuple[int, int]], edited_layers: list[int], batches: list[BatchShape]
) -> float:
    """x S_l forward, S_l.grad in every edited layer, dx through S_l in the layers above the lowest one."""
    lowest = min(edited_layers)
    tokens = sum(b.padded_tokens for b in batches)
    total = 0.0
    for (d_in, d_out), layer in zip(edited_shapes, edited_layers):
        matmuls = 2 if layer == lowest else 3  # forward, weight-grad (+ input-grad above the lowest)
        total += matmuls * 2 * tokens * d_in * d_out
    return total


def hypernet_forward_flops(
    n_rows: int, d_in: int, d_out: int, rank: int, n_blocks: int, inference: bool = False
) -> float:
    """Per block y A B (4·N·F·R), plus the residual's row dot K·K̃ and scaling of G̃ (2·N·I + N·O). With
    `inference` (no graph) the cheaper of that and y (A B) (2·N·F², A B kept across calls: editor/hypernet.py)."""
    size = d_in + d_out
    per_row = min(4 * size * rank, 2 * size * size) if inference else 4 * size * rank
    return n_blocks * n_rows * per_row + 2 * n_rows * d_in + n_rows * d_out


def hypernet_backward_flops(
    n_rows: int, d_in: int, d_out: int, rank: int, n_blocks: int, recompute: bool = True
) -> float:
    """Per block dB, dz, dA (6·N·F·R) and dy (2·N·F·R) for every block but the first (its input, the
    normalised cache, needs no gradient); residual backward ∂c = ⟨g, G̃⟩ (2·N·O), ∂G̃ = c g (N·O),
    ∂K̃ = −η ∂c K (2·N·I); plus, when the rows exceed one chunk, the chunked VJP's second forward."""
    size = d_in + d_out
    blocks = n_blocks * 6 * n_rows * size * rank + max(n_blocks - 1, 0) * 2 * n_rows * size * rank
    residual = 3 * n_rows * d_out + 2 * n_rows * d_in
    forward = hypernet_forward_flops(n_rows, d_in, d_out, rank, n_blocks) if recompute else 0.0
    return forward + blocks + residual


def spread_forward_flops(n_rows: int, d_out: int, n_layers: int, mode: str) -> float:
    """Two inner products and one axpy of (N, O) per layer after the first."""
    return 0.0 if mode == "none" else max(n_layers - 1, 0) * 6 * n_rows * d_out


def spread_backward_flops(n_rows: int, d_out: int, n_layers: int, mode: str) -> float:
    """One inner product and one axpy of (N, O) per layer after the first."""
    return 0.0 if mode == "none" else max(n_layers - 1, 0) * 4 * n_rows * d_out


def solve_flops_by_dtype(n_rows: int, d_in: int, d_out: int, form: str, solve_dtype: str) -> dict[str, float]:
    """Gram + Cholesky (n³/3) + two triangular solves (2·n²·O) of the chosen form (editor/solve.py).

    primal: KᵀK (2·N·I²) and KᵀD̂ (2·N·I·O) in float32 (training/hypernet_bank.py), chol of I×I and the solve with O
            right-hand sides in the solve dtype.
    dual:   KKᵀ (2·N²·I), chol of N×N, the solve (2·N²·O) and Kᵀ(B⁻¹D̂) (2·N·I·O), all in the solve dtype.
    """
    if form == "primal":
        gram = 2 * n_rows * d_in * d_in + 2 * n_rows * d_in * d_out
        factor = d_in**3 / 3 + 2 * d_in**2 * d_out
        return _merge_parts({"float32": gram}, {solve_dtype: factor})
    if form == "dual":
        work = 2 * n_rows**2 * d_in + n_rows**3 / 3 + 2 * n_rows**2 * d_out + 2 * n_rows * d_in * d_out
        return {solve_dtype: work}
    raise ValueError(f"unknown solve form {form!r}; expected primal or dual")


def solve_flops(n_rows: int, d_in: int, d_out: int, form: str) -> float:
    return phase_total(solve_flops_by_dtype(n_rows, d_in, d_out, form, "float32"))


def _merge_parts(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    out = dict(a)
    for dtype, flops in b.items():
        out[dtype] = out.get(dtype, 0.0) + flops
    return out


def meta_gradient_flops_by_dtype(
    n_rows: int, d_in: int, d_out: int, form: str, learn_lambda: bool, solve_dtype: str
) -> dict[str, float]:
    """M = A⁻¹ g_S with the forward's factor (solve dtype), then ∂L/∂D̂ = K M (2·N·I·O) and ⟨M, S⟩ for λ
    (2·I·O) in float32. primal: two triangular solves (2·I²·O); dual (Woodbury): K r (2·N·I·O), B⁻¹
    (2·N²·O), Kᵀ(·) (2·N·I·O)."""
    if form == "primal":
        solve = 2 * d_in**2 * d_out
    elif form == "dual":
        solve = 4 * n_rows * d_in * d_out + 2 * n_rows**2 * d_out
    else:
        raise ValueError(f"unknown solve form {form!r}; expected primal or dual")
    rest = 2 * n_rows * d_in * d_out + (2 * d_in * d_out if learn_lambda else 0)
    return _merge_parts({solve_dtype: solve}, {"float32": rest})


def meta_gradient_flops(n_rows: int, d_in: int, d_out: int, form: str, learn_lambda: bool) -> float:
    return phase_total(meta_gradient_flops_by_dtype(n_rows, d_in, d_out, form, learn_lambda, "float32"))


def optimizer_flops(n_trainable: int) -> float:
    return (ADAM_FLOPS_PER_PARAM + CLIP_FLOPS_PER_PARAM) * n_trainable


@dataclass(frozen=True)
class EditorShape:
    """What the hypernetwork side of a step depends on."""

    edited_layers: list[int]  # block index of each edited module, list order
    edited_shapes: list[tuple[int, int]]  # (d_in, d_out) of each
    rank: int
    n_blocks: int
    spread: str
    learn_lambda: bool
    n_trainable: int  # hypernetwork parameters updated by Adam
    chunk_rows: int = 1024  # a meta-step with at most this many key rows keeps the forward's graph


def _editor_forward(
    total: PhaseFlops,
    editor: EditorShape,
    n_rows: int,
    forms: list[str],
    solve_dtype: str,
    inference: bool = False,
) -> None:
    for (d_in, d_out), form in zip(editor.edited_shapes, forms):
        forward = hypernet_forward_flops(n_rows, d_in, d_out, editor.rank, editor.n_blocks, inference)
        _add(total, "hypernet_forward", "float32", forward)
        for dtype, flops in solve_flops_by_dtype(n_rows, d_in, d_out, form, solve_dtype).items():
            _add(total, "solve", dtype, flops)
    d_out = editor.edited_shapes[0][1]
    _add(
        total,
        "spread",
        "float32",
        spread_forward_flops(n_rows, d_out, len(editor.edited_shapes), editor.spread),
    )


def meta_step_flops(
    shape: LMShape,
    editor: EditorShape,
    edit: list[BatchShape],
    equiv: list[BatchShape],
    unrel: list[BatchShape],
    forms: list[str],
    model_dtype: str,
    solve_dtype: str,
    locality: str = "ce",
    block_cache: str = "off",
) -> PhaseFlops:
    """FLOPs of one single-process meta-step (engine.meta_step), per phase and dtype. `block_cache`: off;
    first_visit (the prompts' lower blocks run once: KL's shifted pass resumes from its reference pass);
    revisit (every pass resumes at the lowest edited block)."""
    if block_cache not in ("off", "first_visit", "revisit"):
        raise ValueError(f"block_cache must be off, first_visit or revisit, got {block_cache!r}")
    total: PhaseFlops = {phase: {} for phase in PHASES}
    lowest = min(editor.edited_layers)
    first = lowest if block_cache == "revisit" else 0
    n_rows = sum(b.answers for b in edit)  # one key row per answer position of the edit prompts
    cache_backward = lm_backward_flops(shape, edit, lowest, answers_only=True)
    _add(total, "cache", model_dtype, lm_forward_flops(shape, edit, first) + cache_backward)
    _editor_forward(total, editor, n_rows, forms, solve_dtype)
    for phase, batches in (("generalisation", equiv), ("locality", unrel)):
        lm = lm_forward_flops(shape, batches, first) + lm_backward_flops(shape, batches, lowest)
        if phase == "locality" and locality == "kl":  # after the reference pass, the shifted one
            shifted_first = lowest if block_cache != "off" else 0
            lm += lm_forward_flops(shape, batches, shifted_first)
        _add(total, phase, model_dtype, lm)
        _add(total, phase, "float32", shift_hook_flops(editor.edited_shapes, editor.edited_layers, batches))
    for (d_in, d_out), form in zip(editor.edited_shapes, forms):
        grad = meta_gradient_flops_by_dtype(n_rows, d_in, d_out, form, editor.learn_lambda, solve_dtype)
        for dtype, flops in grad.items():
            _add(total, "meta_gradient", dtype, flops)
        recompute = n_rows > editor.chunk_rows
        backward = hypernet_backward_flops(n_rows, d_in, d_out, editor.rank, editor.n_blocks, recompute)
        _add(total, "hypernet_backward", "float32", backward)
    d_out = editor.edited_shapes[0][1]
    n_layers = len(editor.edited_shapes)
    _add(total, "meta_gradient", "float32", spread_backward_flops(n_rows, d_out, n_layers, editor.spread))
    _add(total, "optimizer", "float32", optimizer_flops(editor.n_trainable))
    return total


def edit_flops(
    shape: LMShape,
    editor: EditorShape,
    edit: list[BatchShape],
    forms: list[str],
    model_dtype: str,
    solve_dtype: str,
) -> PhaseFlops:
    """FLOPs of one edit call: cache pass, hypernet forward, spread, solve, W += Sᵀ (one add per weight)."""
    total: PhaseFlops = {phase: {} for phase in EDIT_PHASES}
    n_rows = sum(b.answers for b in edit)
    lowest = min(editor.edited_layers)
    cache_lm = lm_forward_flops(shape, edit) + lm_backward_flops(shape, edit, lowest, answers_only=True)
    _add(total, "cache", model_dtype, cache_lm)
    _editor_forward(total, editor, n_rows, forms, solve_dtype, inference=True)
    _add(total, "apply", "float32", sum(d_in * d_out for d_in, d_out in editor.edited_shapes))
    return total


def phase_total(parts: dict[str, float]) -> float:
    return float(sum(parts.values()))


def floor_seconds(parts: dict[str, float], rates: dict[str, float]) -> float:
    """Seconds at the probed matmul rate (FLOP/s) of each dtype."""
    missing = {dtype for dtype, flops in parts.items() if flops} - set(rates)
    if missing:
        raise KeyError(f"no probed matmul rate for dtype(s) {sorted(missing)}; probed {sorted(rates)}")
    return float(sum(flops / rates[dtype] for dtype, flops in parts.items() if flops))
