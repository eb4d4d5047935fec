"""MOSE's Procrustes update, layer selection (paper Eq. 17-22) and MEMIT's update, against fp64 references."""

import pytest
import torch

from horse_dist.editor.mose import (
    frobenius_and_condition,
    layer_scores,
    memit_delta,
    mose_rotation,
    procrustes_cross_moment,
    procrustes_objective,
    procrustes_rotation,
    select_layer,
    unreached_share,
    with_neighbours,
)

D_OUT, D_IN, N_EDITS, N_KEEP = 24, 40, 3, 200


def _problem(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_OI = torch.randn(D_OUT, D_IN, generator=g, dtype=dtype)
    k0_IM = torch.randn(D_IN, N_KEEP, generator=g, dtype=dtype)
    keys_IN = torch.randn(D_IN, N_EDITS, generator=g, dtype=dtype)
    values_ON = w_OI @ keys_IN + torch.randn(D_OUT, N_EDITS, generator=g, dtype=dtype)
    return w_OI, k0_IM, keys_IN, values_ON


def _loss(rot_OO, w_OI, k0_IM, keys_IN, values_ON, lam):
    """Paper Eq. 17 with explicit K0."""
    keep = w_OI @ k0_IM
    return lam * ((rot_OO @ keep - keep) ** 2).sum() + ((rot_OO @ w_OI @ keys_IN - values_ON) ** 2).sum()


def _random_orthogonal(n, g, scale=None):
    if scale is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))
    skew = torch.randn(n, n, generator=g, dtype=torch.float64) * scale
    return torch.linalg.matrix_exp(skew - skew.T)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_rotation_is_orthogonal(dtype, tol):
    w, k0, k, v = _problem(dtype)
    rot = procrustes_rotation(procrustes_cross_moment(w, k0 @ k0.T, k, v, lam=0.5))
    eye = torch.eye(D_OUT, dtype=dtype)
    assert (rot.T @ rot - eye).abs().max() < tol
    assert (rot @ rot.T - eye).abs().max() < tol


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_norm_and_condition_number_unchanged(dtype, rel):
    w, k0, k, v = _problem(dtype)
    rot = mose_rotation(w, k0 @ k0.T, k, v, lam=0.1, dtype=dtype)
    edited = rot @ w
    assert not torch.allclose(edited, w, atol=1e-3)  # the edit did something
    norm0, cond0 = frobenius_and_condition(w)
    norm1, cond1 = frobenius_and_condition(edited)
    assert norm1 == pytest.approx(norm0, rel=rel)
    assert cond1 == pytest.approx(cond0, rel=rel)
    # and over 50 sequential edits
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        k = torch.randn(D_IN, N_EDITS, generator=g, dtype=torch.float64).to(dtype)
        v = edited @ k + torch.randn(D_OUT, N_EDITS, generator=g, dtype=torch.float64).to(dtype)
        edited = mose_rotation(edited, k0 @ k0.T, k, v, lam=0.1, dtype=torch.float64).to(dtype) @ edited
    norm2, cond2 = frobenius_and_condition(edited)
    assert norm2 == pytest.approx(norm0, rel=rel * 10)
    assert cond2 == pytest.approx(cond0, rel=rel * 10)


def test_statistics_form_equals_explicit_k0_form():
    w, k0, k, v = _problem()
    lam = 0.3
    a = torch.cat([lam**0.5 * w @ k0, w @ k], dim=1)  # paper Eq. 18
    b = torch.cat([lam**0.5 * w @ k0, v], dim=1)
    m_explicit = b @ a.T
    m_stats = procrustes_cross_moment(w, k0 @ k0.T, k, v, lam)
    torch.testing.assert_close(m_stats, m_explicit, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(
        procrustes_rotation(m_stats), procrustes_rotation(m_explicit), rtol=0, atol=1e-9
    )
    # ‖RA − B‖² = ‖A‖² + ‖B‖² − 2⟨R, M⟩ for any orthogonal R
    rot = _random_orthogonal(D_OUT, torch.Generator().manual_seed(3))
    lhs = ((rot @ a - b) ** 2).sum()
    rhs = (a**2).sum() + (b**2).sum() - 2 * procrustes_objective(rot, m_stats)
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-10)


def test_procrustes_solution_minimises_the_objective():
    w, k0, k, v = _problem()
    lam = 0.2
    rot = mose_rotation(w, k0 @ k0.T, k, v, lam, torch.float64)
    best = _loss(rot, w, k0, k, v, lam)
    assert best < _loss(torch.eye(D_OUT, dtype=torch.float64), w, k0, k, v, lam)
    g = torch.Generator().manual_seed(7)
    for scale in (1e-4, 1e-2, None):  # near the optimum, and anywhere on O(d)
        for _ in range(20):
            other = _random_orthogonal(D_OUT, g, scale) @ rot
            assert _loss(other, w, k0, k, v, lam) >= best - 1e-9 * best
    # the float32 solve lands on the float64 optimum
    rot32 = mose_rotation(*(t.float() for t in (w, k0 @ k0.T, k, v)), lam, torch.float32)
    assert float(_loss(rot32.double(), w, k0, k, v, lam)) == pytest.approx(float(best), rel=1e-4)


def test_no_edit_pressure_gives_identity():
    w, k0, k, _ = _problem()
    rot = mose_rotation(w, k0 @ k0.T, k, w @ k, lam=1.0, dtype=torch.float64)  # values already produced
    torch.testing.assert_close(rot, torch.eye(D_OUT, dtype=torch.float64), rtol=0, atol=1e-8)


def test_memit_delta_solves_normal_equations():
    w, k0, k, v = _problem()
    lam = 0.7
    c0 = k0 @ k0.T
    delta = memit_delta(w, c0, k, v, lam, torch.float64)
    lhs = delta @ (lam * c0 + k @ k.T)
    rhs = (v - w @ k) @ k.T
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-9)
    # it minimises λ‖ΔW K0‖² + ‖(W + ΔW) K_E − V_E‖² (gradient zero, by autograd)
    d = delta.clone().requires_grad_(True)
    loss = lam * ((d @ k0) ** 2).sum() + (((w + d) @ k - v) ** 2).sum()
    loss.backward()
    assert d.grad.abs().max() < 1e-7 * float(loss.detach())
    # and the additive update moves the norm, the drift MOSE avoids
    assert frobenius_and_condition(w + delta)[0] != pytest.approx(frobenius_and_condition(w)[0], rel=1e-6)


def test_unreached_share_of_updates():
    w, k0, k, v = _problem()
    assert unreached_share(w, w, k, v) == pytest.approx(1.0)  # nothing changed: all of it left
    # MEMIT with λ → 0 and fewer edits than key dimensions reaches every value
    reached = w + memit_delta(w, k0 @ k0.T, k, v, 1e-9, torch.float64)
    assert unreached_share(w, reached, k, v) < 1e-6
    halfway = w + 0.5 * (reached - w)  # ΔW linear in the residual: half the change is made
    assert unreached_share(w, halfway, k, v) == pytest.approx(0.5, rel=1e-6)
    # a rotation keeps ‖W k‖: with nothing to preserve (λ 0) it turns W k onto v's direction, and what stays
    # undone is exactly the length it cannot change, |‖v‖ − ‖Wk‖| / ‖v − Wk‖
    k1, v1 = k[:, :1], 1.7 * v[:, :1]
    rot = mose_rotation(w, k0 @ k0.T, k1, v1, lam=0.0, dtype=torch.float64)
    bound = abs(float(v1.norm() - (w @ k1).norm())) / float((v1 - w @ k1).norm())
    assert unreached_share(w, rot @ w, k1, v1) == pytest.approx(bound, rel=1e-9)
    with pytest.raises(ValueError, match="differ in shape"):
        unreached_share(w, w[:, :3], k, v)


def test_layer_selection_by_eq22():
    # Layer 5 needs the largest residual, but its weight and key norms are large: scaled, it is the cheapest.
    resid = [torch.full((2, 2), 1.0), torch.full((2, 2), 4.0), torch.full((2, 2), 2.0)]
    spectral = torch.tensor([1.0, 10.0, 1.0])
    key_norms = torch.tensor([[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]])
    scores = layer_scores(resid, spectral, key_norms)
    torch.testing.assert_close(scores, torch.tensor([2.0, 0.4, 4.0]))  # ‖·‖_F of 2x2 constant / scale
    assert select_layer([3, 5, 7], scores) == 5
    # per-edit scaling: the column of an edit with a large key counts less
    scores = layer_scores([torch.tensor([[3.0, 4.0]])], torch.tensor([1.0]), torch.tensor([[3.0, 4.0]]))
    assert float(scores[0]) == pytest.approx(2**0.5)
    assert with_neighbours(5, 30, 1) == [4, 5, 6]
    assert with_neighbours(0, 30, 1) == [0, 1]
    assert with_neighbours(29, 30, 2) == [27, 28, 29]


def test_bad_shapes_are_named():
    w, k0, k, v = _problem()
    with pytest.raises(ValueError, match="C0 has shape"):
        procrustes_cross_moment(w, k0[:5] @ k0[:5].T, k, v, 1.0)
    with pytest.raises(ValueError, match="values V_E"):
        procrustes_cross_moment(w, k0 @ k0.T, k, v[:, :2], 1.0)
