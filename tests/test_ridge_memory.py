"""Ridge memory (editor/memory.py): a stream of solves equals the float64 solve of all its edits at once."""

from __future__ import annotations

import math

import pytest
import torch

from horse_dist.editor.memory import RidgeMemory, remembered_step
from horse_dist.editor.prior import layer_shift, prior_whitening, whiten_keys
from horse_dist.editor.solve import PrimalRidge, ridge_shift_reference

D_IN, D_OUT = 12, 5
LOG_LAMBDA = torch.tensor(math.log(0.3), dtype=torch.float64)  # a float would be rounded to float32
RIDGE = float(LOG_LAMBDA.exp())


def _stream(n_steps: int, rows: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys_NI, wanted output change from W_0, Y_NO) per step."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(rows, D_IN, generator=gen, dtype=torch.float64),
            torch.randn(rows, D_OUT, generator=gen, dtype=torch.float64),
        )
        for _ in range(n_steps)
    ]


def test_a_stream_with_memory_applies_the_solve_of_all_its_edits_at_once():
    steps = _stream(3, rows=4)
    memory, applied_IO = RidgeMemory.empty(D_IN, D_OUT), torch.zeros(D_IN, D_OUT, dtype=torch.float64)
    for index, (keys_NI, wanted_NO) in enumerate(steps):
        own_IO = ridge_shift_reference(keys_NI, wanted_NO, LOG_LAMBDA)  # the step's own solve, from W_0
        memory, increment_IO = remembered_step(memory, keys_NI, own_IO, RIDGE)
        if index == 0:  # one step: the plain solve
            torch.testing.assert_close(increment_IO, own_IO, rtol=1e-10, atol=1e-12)
        applied_IO = applied_IO + increment_IO
    all_keys = torch.cat([k for k, _ in steps])
    all_wanted = torch.cat([y for _, y in steps])
    at_once_IO = ridge_shift_reference(all_keys, all_wanted, LOG_LAMBDA)
    torch.testing.assert_close(applied_IO, at_once_IO, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(memory.total_IO, at_once_IO, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(memory.gram_II, all_keys.T @ all_keys, rtol=1e-12, atol=1e-12)


def test_with_a_key_prior_the_memory_in_whitened_space_applies_the_c0_solve_of_all_edits():
    # lifelong/editors.py: the memory takes whitened keys K W and the solve's own S' and applies W x its increment
    gen = torch.Generator().manual_seed(5)
    prior_keys_MI = torch.randn(300, D_IN, generator=gen, dtype=torch.float64) @ torch.randn(
        D_IN, D_IN, generator=gen, dtype=torch.float64
    )
    damping = 1e-2
    w_II = prior_whitening(prior_keys_MI.T @ prior_keys_MI, 300, damping).double()
    c0_II = prior_keys_MI.T @ prior_keys_MI / 300
    c0_II = c0_II + damping * c0_II.trace() / D_IN * torch.eye(D_IN, dtype=torch.float64)
    steps = _stream(3, rows=4, seed=4)
    memory, applied_IO = RidgeMemory.empty(D_IN, D_OUT), torch.zeros(D_IN, D_OUT, dtype=torch.float64)
    for keys_NI, wanted_NO in steps:
        white_NI = whiten_keys(keys_NI, w_II)
        own_IO = ridge_shift_reference(white_NI, wanted_NO, LOG_LAMBDA)  # S' of the whitened solve
        memory, increment_IO = remembered_step(memory, white_NI, own_IO, RIDGE)
        applied_IO = applied_IO + layer_shift(increment_IO, w_II)
    all_keys = torch.cat([k for k, _ in steps])
    all_wanted = torch.cat([y for _, y in steps])
    c0_solve_IO = torch.linalg.solve(all_keys.T @ all_keys + RIDGE * c0_II, all_keys.T @ all_wanted)
    torch.testing.assert_close(applied_IO, c0_solve_IO, rtol=1e-6, atol=1e-6)


def test_memory_keeps_earlier_edits_that_independent_steps_overwrite():
    # the second step's keys are correlated with the first's: its own shift moves the first edits' outputs
    (keys_NI, wanted_NO), (fresh_NI, other_NO) = _stream(2, rows=3, seed=1)
    overlapping_NI = fresh_NI + keys_NI
    first_IO = ridge_shift_reference(keys_NI, wanted_NO, LOG_LAMBDA)
    memory, _ = remembered_step(RidgeMemory.empty(D_IN, D_OUT), keys_NI, first_IO, RIDGE)
    second_own_IO = ridge_shift_reference(overlapping_NI, other_NO, LOG_LAMBDA)
    _, increment_IO = remembered_step(memory, overlapping_NI, second_own_IO, RIDGE)

    def errors(shift_IO: torch.Tensor) -> tuple[float, float]:
        first = (keys_NI @ shift_IO - wanted_NO).norm() / wanted_NO.norm()
        second = (overlapping_NI @ shift_IO - other_NO).norm() / other_NO.norm()
        return float(first), float(second)

    independent, remembered = errors(first_IO + second_own_IO), errors(first_IO + increment_IO)
    assert independent[0] > 0.3 and independent[1] > 0.3, independent  # each step undoes part of the other
    assert remembered[0] < 0.1 and remembered[1] < 0.1, remembered  # both fit (rows < d_in; ridge residual)


def test_memory_in_float32_matches_the_float64_solve_via_the_production_ridge():
    keys_NI, wanted_NO = _stream(1, rows=6, seed=3)[0]
    ridge = PrimalRidge.factor((keys_NI.T @ keys_NI).float(), LOG_LAMBDA)
    own_IO = ridge.shift((keys_NI.T @ wanted_NO).float())
    _, increment_IO = remembered_step(RidgeMemory.empty(D_IN, D_OUT), keys_NI.float(), own_IO, RIDGE)
    assert increment_IO.dtype == torch.float32
    torch.testing.assert_close(
        increment_IO.double(), ridge_shift_reference(keys_NI, wanted_NO, LOG_LAMBDA), rtol=1e-4, atol=1e-5
    )


def test_memory_names_mismatched_shapes_and_a_bad_ridge():
    memory = RidgeMemory.empty(D_IN, D_OUT)
    with pytest.raises(
        ValueError,
        match=r"keys \(4, 11\) and shift \(12, 5\) do not fit a memory of \(d_in, d_out\) = \(12, 5\)",
    ):
        remembered_step(memory, torch.zeros(4, 11), torch.zeros(D_IN, D_OUT), 1.0)
    with pytest.raises(ValueError, match="ridge strength must be positive, got 0.0"):
        remembered_step(memory, torch.zeros(4, D_IN), torch.zeros(D_IN, D_OUT), 0.0)
