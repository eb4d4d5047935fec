"""Ridge solves vs float64 explicit inverse and lstsq of the augmented system."""

import pytest
import torch

from horse_dist.editor.solve import (
    DualRidge,
    PrimalRidge,
    RidgeSolveError,
    choose_form,
    ridge_shift_reference,
)


def _problem(n: int, d_in: int, d_out: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    delta = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    return keys, delta


def _lstsq_shift(keys, delta, log_lambda):
    """argmin_S ‖K S − D‖² + e^λ ‖S‖² as least squares of [K; √e^λ I] S = [D; 0]."""
    d_in = keys.shape[1]
    root = torch.exp(torch.as_tensor(log_lambda, dtype=torch.float64) / 2)
    a = torch.cat([keys, root * torch.eye(d_in, dtype=torch.float64)])
    b = torch.cat([delta, torch.zeros(d_in, delta.shape[1], dtype=torch.float64)])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("n,d_in", [(12, 40), (60, 20)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-5), (torch.float64, 1e-11)])
@pytest.mark.parametrize("log_lambda", [0.0, -1.5])
def test_shift_matches_references(n, d_in, dtype, tol, log_lambda):
    keys, delta = _problem(n, d_in, 7)
    lam = torch.tensor(log_lambda)
    ref = ridge_shift_reference(keys, delta, lam)
    assert ref.dtype == torch.float64
    assert _rel(ref, _lstsq_shift(keys, delta, log_lambda)) < 1e-10

    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    primal = PrimalRidge.factor(keys.T @ keys, lam, dtype=dtype, name="l0", out_dtype=out_dtype)
    dual = DualRidge.factor(keys, lam, dtype=dtype, name="l0", out_dtype=out_dtype)
    s_primal = primal.shift(keys.T @ delta)
    s_dual = dual.shift(delta)
    assert s_primal.shape == s_dual.shape == (d_in, 7)
    assert s_primal.dtype == s_dual.dtype == out_dtype
    assert _rel(s_primal, ref) < tol
    assert _rel(s_dual, ref) < tol


def test_default_output_is_float32_even_for_fp64_factor():
    keys, delta = _problem(10, 6, 3)
    r = PrimalRidge.factor(keys.T @ keys, torch.tensor(0.0), dtype=torch.float64)
    assert r.shift(keys.T @ delta).dtype == torch.float32
    d = DualRidge.factor(keys, torch.tensor(0.0), dtype=torch.float64)
    assert d.shift(delta).dtype == torch.float32


@pytest.mark.parametrize("n,d_in", [(8, 30), (50, 12)])
@pytest.mark.parametrize("form", ["primal", "dual"])
def test_solve_matches_explicit_inverse(n, d_in, form):
    keys, _ = _problem(n, d_in, 1, seed=3)
    rhs = torch.randn(d_in, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    log_lambda = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)  # the factor must detach it
    a = keys.T @ keys + torch.exp(torch.tensor(0.3, dtype=torch.float64)) * torch.eye(
        d_in, dtype=torch.float64
    )
    expected = torch.linalg.inv(a) @ rhs
    if form == "primal":
        ridge = PrimalRidge.factor(keys.T @ keys, log_lambda, dtype=torch.float64, out_dtype=torch.float64)
    else:
        ridge = DualRidge.factor(keys, log_lambda, dtype=torch.float64, out_dtype=torch.float64)
    got = ridge.solve(rhs)
    assert not got.requires_grad
    assert _rel(got, expected) < 1e-10
    got32 = (PrimalRidge if form == "primal" else DualRidge).factor(
        keys.T @ keys if form == "primal" else keys, log_lambda
    )
    assert got32.solve(rhs).dtype == torch.float32
    assert _rel(got32.solve(rhs), expected) < 1e-4


def test_choose_form():
    assert choose_form(100, 1536) == "dual"
    assert choose_form(40000, 11008) == "primal"
    assert choose_form(1536, 1536) == "primal"
    assert choose_form(100, 1536, "primal") == "primal"
    assert choose_form(40000, 11008, "dual") == "dual"
    with pytest.raises(ValueError, match="unknown ridge form"):
        choose_form(1, 2, "woodbury")


def test_nan_keys_raise_with_layer_name():
    keys, _ = _problem(5, 8, 2)
    keys[2, 3] = float("nan")
    with pytest.raises(RidgeSolveError, match=r"model\.layers\.29\.mlp\.down_proj.*non-finite"):
        DualRidge.factor(keys, torch.tensor(0.0), name="model.layers.29.mlp.down_proj")
    with pytest.raises(RidgeSolveError, match=r"layers\.29.*non-finite.*gram"):
        PrimalRidge.factor(keys.T @ keys, torch.tensor(0.0), name="layers.29")


def test_nan_rhs_raises():
    keys, _ = _problem(5, 4, 2)
    ridge = PrimalRidge.factor(keys.T @ keys, torch.tensor(0.0), name="L3")
    rhs = torch.ones(4, 2)
    rhs[0, 0] = float("inf")
    with pytest.raises(RidgeSolveError, match="L3.*non-finite"):
        ridge.solve(rhs)


def test_non_pd_gram_raises():
    # Indefinite "gram" (eigenvalues −1, ...) plus a tiny ridge: Cholesky must fail.
    gram = torch.diag(torch.tensor([-1.0, 2.0, 3.0]))
    with pytest.raises(RidgeSolveError, match="L5.*not positive definite; increase lambda"):
        PrimalRidge.factor(gram, torch.tensor(-30.0), name="L5")
    # A rank-deficient true gram (n < d_in) with e^λ far below fp32 resolution is singular in fp32.
    keys, _ = _problem(3, 64, 1)
    keys = keys * 1e3
    with pytest.raises(RidgeSolveError, match="not positive definite"):
        PrimalRidge.factor((keys.T @ keys).float(), torch.tensor(-80.0), name="L6")
    # ... and solvable once lambda is reasonable.
    PrimalRidge.factor(keys.T @ keys, torch.tensor(0.0), dtype=torch.float64, name="L6")
