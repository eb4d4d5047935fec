"""AlphaEdit's projector and update against float64 references, autograd and an explicit null-space solve."""

import pytest
import torch

from horse_dist.editor.alphaedit import alphaedit_delta, null_space_projector

D_OUT, D_IN, N_EDITS = 12, 20, 3


def _preserved_keys(seed: int = 0, n0: int = 400) -> torch.Tensor:
    """K0 (I, n0) with a decaying spectrum: the last directions carry little energy, as real keys do."""
    g = torch.Generator().manual_seed(seed)
    scales_I = torch.logspace(0, -4, D_IN, dtype=torch.float64)
    basis_II, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))
    return basis_II @ (scales_I[:, None] * torch.randn(D_IN, n0, generator=g, dtype=torch.float64))


def _problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    earlier_IP = rand(D_IN, 5)
    return rand(D_OUT, D_IN), rand(D_IN, N_EDITS), rand(D_OUT, N_EDITS), earlier_IP @ earlier_IP.T


def test_projector_is_an_orthogonal_projector_holding_at_most_the_energy():
    k0 = _preserved_keys()
    c0 = k0 @ k0.T
    for energy in (1e-6, 1e-3, 0.1):
        p = null_space_projector(c0, energy)
        torch.testing.assert_close(p, p.T, rtol=0, atol=1e-12)
        torch.testing.assert_close(p @ p, p, rtol=0, atol=1e-10)
        assert (p @ k0).square().sum() <= energy * k0.square().sum() * (1 + 1e-9)
    ranks = [int(torch.linalg.matrix_rank(null_space_projector(c0, e))) for e in (1e-9, 1e-4, 1e-2, 0.5)]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1] < D_IN  # more energy allowed: a larger null space
    assert null_space_projector(c0, 0.0).abs().max() == 0  # C0 is full rank: no exact null space
    with pytest.raises(ValueError, match=r"energy must be in \[0, 1\)"):
        null_space_projector(c0, 1.0)


def _objective(delta, w, k, v, p, c_p, l2):
    d = delta @ p
    return ((w + d) @ k - v).square().sum() + l2 * d.square().sum() + torch.trace(d @ c_p @ d.T)


def test_delta_is_the_constrained_minimiser():
    w, k, v, c_p = _problem()
    k0 = _preserved_keys()
    p = null_space_projector(k0 @ k0.T, 1e-2)
    l2 = 0.7
    delta = alphaedit_delta(w, k, v, p, c_p, l2, torch.float64)
    assert delta.shape == (D_OUT, D_IN)
    torch.testing.assert_close(delta @ p, delta, rtol=0, atol=1e-10)  # the update lives in the null space
    # autograd: the objective's gradient vanishes at Δ
    x = delta.clone().requires_grad_(True)
    _objective(x, w, k, v, p, c_p, l2).backward()
    assert x.grad.abs().max() < 1e-9 * (1 + delta.abs().max())
    # an explicit solve over D = Y U0ᵀ (U0 an orthonormal basis of the null space) gives the same update
    evals, evecs = torch.linalg.eigh(p)
    u0 = evecs[:, evals > 0.5]
    gram = u0.T @ (k @ k.T + c_p + l2 * torch.eye(D_IN, dtype=torch.float64)) @ u0
    y = torch.linalg.solve(gram, (u0.T @ k @ (v - w @ k).T)).T
    torch.testing.assert_close(delta, y @ u0.T, rtol=1e-9, atol=1e-10)
    # no nearby update does better
    g = torch.Generator().manual_seed(3)
    best = _objective(delta, w, k, v, p, c_p, l2)
    for _ in range(5):
        nudge = 1e-3 * torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
        assert _objective(delta + nudge, w, k, v, p, c_p, l2) >= best - 1e-12


def test_preserved_keys_outputs_unchanged_and_fp32_close_to_fp64():
    w, k, v, c_p = _problem()
    k0 = _preserved_keys()
    p = null_space_projector(k0 @ k0.T, 1e-8)
    delta = alphaedit_delta(w, k, v, p, c_p, 1.0, torch.float64)
    assert delta.norm() > 1e-3  # the edit moves the weight ...
    # ... yet the preserved keys' outputs move by at most √energy of what an unconstrained update could
    assert (delta @ k0).norm() <= 1e-4 * torch.linalg.matrix_norm(delta, 2) * k0.norm()
    single = alphaedit_delta(*(t.float() for t in (w, k, v, p, c_p)), 1.0, torch.float32)
    torch.testing.assert_close(single.double(), delta, rtol=1e-4, atol=1e-5)


def test_delta_shape_errors_name_the_operand():
    w, k, v, c_p = _problem()
    p = torch.eye(D_IN, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"P has shape \(3, 3\)"):
        alphaedit_delta(w, k, v, torch.eye(3), c_p, 1.0, torch.float64)
    with pytest.raises(ValueError, match="do not fit W"):
        alphaedit_delta(w, k[:, :2], v, p, c_p, 1.0, torch.float64)
    with pytest.raises(ValueError, match="l2 must be positive"):
        alphaedit_delta(w, k, v, p, c_p, 0.0, torch.float64)
