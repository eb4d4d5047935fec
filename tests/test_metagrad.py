"""Analytic meta-gradients vs autograd through an explicit solve, gradcheck, finite differences."""

import pytest
import torch

from horse_dist.editor.hypernet import HyperNet, batch_moments
from horse_dist.editor.metagrad import (
    hypernet_vjp,
    log_lambda_grad,
    residual_grad,
    ridge_meta_direction,
)
from horse_dist.editor.residual import residual
from horse_dist.editor.solve import DualRidge, PrimalRidge

F64 = torch.float64


def _factor(form, keys, log_lambda, out_dtype=torch.float32):
    if form == "primal":
        return PrimalRidge.factor(keys.T @ keys, log_lambda, dtype=F64, out_dtype=out_dtype)
    return DualRidge.factor(keys, log_lambda, dtype=F64, out_dtype=out_dtype)


def _shift(form, ridge, keys, delta):
    return ridge.shift(keys.T @ delta if form == "primal" else delta)


def _explicit_shift(keys, delta, log_lambda):
    """S(D, λ) by a differentiable dense solve in float64."""
    a = keys.T @ keys + torch.exp(log_lambda) * torch.eye(keys.shape[1], dtype=F64)
    return torch.linalg.solve(a, keys.T @ delta)


def _data(n, d_in, d_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d_in, generator=g, dtype=F64),
        torch.randn(n, d_out, generator=g, dtype=F64),
        torch.randn(d_in, d_out, generator=g, dtype=F64),  # C: loss = ⟨S, C⟩, so g_S = C
    )


@pytest.mark.parametrize("form", ["primal", "dual"])
@pytest.mark.parametrize("n,d_in", [(9, 20), (30, 8)])
@pytest.mark.parametrize("lam0", [0.0, 1.2])
def test_meta_gradients_match_autograd(form, n, d_in, lam0):
    keys, delta, c = _data(n, d_in, 5)
    delta_ad = delta.clone().requires_grad_(True)
    lam_ad = torch.tensor(lam0, dtype=F64, requires_grad=True)
    (_explicit_shift(keys, delta_ad, lam_ad) * c).sum().backward()

    log_lambda = torch.tensor(lam0, dtype=F64)
    # float64 outputs: tight check of the formulas
    ridge = _factor(form, keys, log_lambda, out_dtype=F64)
    m = ridge_meta_direction(ridge, c)
    s = _shift(form, ridge, keys, delta)
    torch.testing.assert_close(residual_grad(keys, m), delta_ad.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(log_lambda_grad(log_lambda, m, s), lam_ad.grad, rtol=1e-9, atol=1e-11)
    # default float32 outputs: same up to fp32 rounding
    ridge32 = _factor(form, keys, log_lambda)
    m32 = ridge_meta_direction(ridge32, c)
    assert m32.dtype == torch.float32
    torch.testing.assert_close(residual_grad(keys.float(), m32).double(), delta_ad.grad, rtol=1e-4, atol=1e-5)
    g32 = log_lambda_grad(torch.tensor(lam0), m32, _shift(form, ridge32, keys, delta))
    assert g32.dtype == torch.float32 and g32.dim() == 0
    torch.testing.assert_close(g32.double(), lam_ad.grad, rtol=1e-4, atol=1e-6)


class _RidgeShift(torch.autograd.Function):
    """S(D, λ) forward through our Cholesky solve, backward through our analytic meta-gradients."""

    @staticmethod
    def forward(ctx, delta, log_lambda, keys, form):
        ridge = _factor(form, keys, log_lambda, out_dtype=F64)
        s = _shift(form, ridge, keys, delta)
        ctx.ridge, ctx.form = ridge, form
        ctx.save_for_backward(keys, log_lambda, s)
        return s

    @staticmethod
    def backward(ctx, grad_s):
        keys, log_lambda, s = ctx.saved_tensors
        m = ridge_meta_direction(ctx.ridge, grad_s)
        return residual_grad(keys, m), log_lambda_grad(log_lambda, m, s), None, None


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_gradcheck_of_solve(form):
    keys, delta, _ = _data(6, 4, 3, seed=1) if form == "primal" else _data(3, 5, 2, seed=1)
    delta = delta.requires_grad_(True)
    lam = torch.tensor(0.4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d, l_: _RidgeShift.apply(d, l_, keys, form), (delta, lam))


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_log_lambda_finite_differences(form):
    keys, delta, c = _data(12, 10, 4, seed=2)
    lam0, h = 0.25, 1e-5

    def loss(lam):
        ridge = _factor(form, keys, torch.tensor(lam, dtype=F64), out_dtype=F64)
        return float((_shift(form, ridge, keys, delta) * c).sum())

    fd = (loss(lam0 + h) - loss(lam0 - h)) / (2 * h)
    ridge = _factor(form, keys, torch.tensor(lam0, dtype=F64), out_dtype=F64)
    s = _shift(form, ridge, keys, delta)
    analytic = float(log_lambda_grad(torch.tensor(lam0, dtype=F64), ridge_meta_direction(ridge, c), s))
    assert abs(fd) > 1e-3  # the check must be able to fail
    assert analytic == pytest.approx(fd, rel=1e-7)


def _random_net(seed=0):
    torch.manual_seed(seed)
    net = HyperNet(d_in=6, d_out=4, n_layers=3, rank=3, n_blocks=2, eta_init=0.1)
    with torch.no_grad():  # move away from the identity init so every parameter gets a gradient
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(50, 10) * 2 + 1
    net.normalizer.update(*batch_moments(x))
    return net


def test_hypernet_vjp_matches_full_batch_autograd():
    net = _random_net()
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(23, 6, generator=g)
    grads = torch.randn(23, 4, generator=g)
    grad_delta = torch.randn(23, 4, generator=g)
    layer = 1

    net.zero_grad()
    pk, pg = net(keys, grads, layer)
    (grad_delta * residual(keys, pk, pg, net.eta[layer])).sum().backward()
    expected = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}

    net.zero_grad()
    hypernet_vjp(net, keys, grads, layer, grad_delta, chunk_rows=5)
    got = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}

    assert set(got) == set(expected)
    for name in ["blocks.0.A", "blocks.1.B", "blocks.0.bias", "blocks.1.scale.weight", "eta"]:
        assert got[name].abs().sum() > 0, name
    assert float(got["eta"][0]) == 0.0 and float(got["eta"][layer]) != 0.0
    assert net.log_lambda.grad is None
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


def test_hypernet_vjp_accumulates_and_validates():
    net = _random_net(1)
    keys, grads, gd = torch.randn(8, 6), torch.randn(8, 4), torch.randn(8, 4)
    net.zero_grad()
    hypernet_vjp(net, keys, grads, 0, gd, chunk_rows=3)
    once = net.blocks[0].A.grad.clone()
    hypernet_vjp(net, keys, grads, 0, gd, chunk_rows=100)
    torch.testing.assert_close(net.blocks[0].A.grad, 2 * once, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_rows"):
        hypernet_vjp(net, keys, grads, 0, gd, chunk_rows=0)
