"""Ridge solve of DESIGN §1 step 5: S = (KᵀK + e^λ I)⁻¹ Kᵀ D̂, by Cholesky of the SPD system.

Shape legend: N = token rows, I = d_in (key size), O = d_out.

Two equivalent forms, A = KᵀK + e^λ I_I:
  primal (I×I): factor A from the (globally summed) gram KᵀK; S = A⁻¹ (KᵀD̂). Works on sharded rows.
  dual (N×N): factor B = KKᵀ + e^λ I_N; S = Kᵀ B⁻¹ D̂ (push-through identity (KᵀK+λI)⁻¹Kᵀ = Kᵀ(KKᵀ+λI)⁻¹),
      A⁻¹ r = (r − Kᵀ B⁻¹ K r) / e^λ (Woodbury). Cheaper when N < I; needs every key row in one place.
log_lambda is detached here: the meta-gradient for λ is analytic (metagrad.log_lambda_grad).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FORMS = ("auto", "primal", "dual")


class RidgeSolveError(RuntimeError):
    """A ridge system of an edited layer could not be solved (non-finite input or failed Cholesky)."""


def _where(name: str) -> str:
    return f"ridge solve for layer {name!r}" if name else "ridge solve"


def _check_finite(t: Tensor, what: str, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise RidgeSolveError(f"{_where(name)}: non-finite input ({n_bad} NaN/Inf entries in {what})")


def _ridge_strength(log_lambda: Tensor | float, name: str) -> float:
    lam = float(torch.exp(torch.as_tensor(log_lambda).detach().to(torch.float64)))
    if not (lam > 0.0 and lam < float("inf")):
        raise RidgeSolveError(f"{_where(name)}: non-finite input (e^log_lambda = {lam})")
    return lam


def _cholesky(a: Tensor, name: str, lam: float, size_what: str) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise RidgeSolveError(
            f"{_where(name)}: Cholesky of the {size_what} system failed at minor {int(info)}: matrix is "
            f"not positive definite; increase lambda (e^log_lambda = {lam:.3g}) or solve in float64"
        )
    return chol


def _factor_with_ridge(m_MM: Tensor, log_lambda: Tensor, name: str, form: str) -> tuple[Tensor, float]:
    """(Cholesky factor of m + e^λ I, e^λ); `m_MM` is a fresh matrix and gets the ridge in place."""
    lam = _ridge_strength(log_lambda, name)
    m_MM.diagonal().add_(lam)
    return _cholesky(m_MM, name, lam, f"{m_MM.shape[0]}x{m_MM.shape[0]} {form}"), lam


@dataclass
class _RidgeFactor:
    """`factor` checks its input and hands it, detached and in the solve dtype, to the form's `_build`."""

    ridge: float  # e^λ
    name: str
    out_dtype: torch.dtype
    INPUT = ""  # what the factored tensor is, for error messages

    @classmethod
    def factor(
        cls,
        rows: Tensor,
        log_lambda: Tensor,
        dtype: torch.dtype = torch.float32,
        name: str = "",
        *,
        out_dtype: torch.dtype = torch.float32,
    ):
        """Factor the form's system from `rows` in `dtype` (fp32 default; fp64 for ill-conditioned keys)."""
        _check_finite(rows, cls.INPUT, name)
        return cls._build(rows.detach().to(dtype), log_lambda, name, out_dtype)


@dataclass
class PrimalRidge(_RidgeFactor):
    """Cholesky factor of A = KᵀK + e^λ I (I×I), built from the globally summed gram KᵀK (`factor(gram_II, ...)`)."""

    chol_II: Tensor
    INPUT = "gram KᵀK"

    @classmethod
    def _build(cls, gram_II: Tensor, log_lambda: Tensor, name: str, out_dtype: torch.dtype) -> PrimalRidge:
        chol_II, lam = _factor_with_ridge(gram_II.clone(), log_lambda, name, "primal")
        return cls(lam, name, out_dtype, chol_II)

    def solve(self, rhs_IO: Tensor) -> Tensor:
        """A⁻¹ rhs, returned in out_dtype (float32 by default)."""
        _check_finite(rhs_IO, "right-hand side", self.name)
        return torch.cholesky_solve(rhs_IO.to(self.chol_II.dtype), self.chol_II).to(self.out_dtype)

    def shift(self, keys_T_delta_IO: Tensor) -> Tensor:
        """S = A⁻¹ KᵀD̂ given the (globally summed) KᵀD̂ (I, O)."""
        return self.solve(keys_T_delta_IO)


@dataclass
class DualRidge(_RidgeFactor):
    """Cholesky factor of B = KKᵀ + e^λ I_N (N×N) plus the keys (`factor(keys_NI, ...)`); all key rows must be
    local."""

    keys_NI: Tensor
    chol_NN: Tensor
    INPUT = "keys"

    @classmethod
    def _build(cls, keys_NI: Tensor, log_lambda: Tensor, name: str, out_dtype: torch.dtype) -> DualRidge:
        chol_NN, lam = _factor_with_ridge(keys_NI @ keys_NI.T, log_lambda, name, "dual")
        return cls(lam, name, out_dtype, keys_NI, chol_NN)

    def solve(self, rhs_IO: Tensor) -> Tensor:
        """A⁻¹ rhs = (rhs − Kᵀ B⁻¹ K rhs) / e^λ (Woodbury), returned in out_dtype."""
        _check_finite(rhs_IO, "right-hand side", self.name)
        r_IO = rhs_IO.to(self.chol_NN.dtype)
        inner_NO = torch.cholesky_solve(self.keys_NI @ r_IO, self.chol_NN)
        return ((r_IO - self.keys_NI.T @ inner_NO) / self.ridge).to(self.out_dtype)

    def shift(self, delta_NO: Tensor) -> Tensor:
        """S = Kᵀ B⁻¹ D̂ (I, O) from the local residual rows D̂ (N, O)."""
        _check_finite(delta_NO, "residual", self.name)
        if delta_NO.shape[0] != self.keys_NI.shape[0]:
            raise ValueError(
                f"{_where(self.name)}: residual has {delta_NO.shape[0]} rows, keys have {self.keys_NI.shape[0]}"
            )
        d_NO = delta_NO.to(self.chol_NN.dtype)
        return (self.keys_NI.T @ torch.cholesky_solve(d_NO, self.chol_NN)).to(self.out_dtype)


def choose_form(n_rows: int, d_in: int, form: str = "auto") -> str:
    """'primal' or 'dual'; auto picks the smaller system: dual iff n_rows < d_in."""
    if form not in FORMS:
        raise ValueError(f"unknown ridge form {form!r}; expected one of {FORMS}")
    if form != "auto":
        return form
    return "dual" if n_rows < d_in else "primal"


def ridge_shift_reference(keys_NI: Tensor, delta_NO: Tensor, log_lambda: Tensor | float) -> Tensor:
    """S = (KᵀK + e^λ I)⁻¹ KᵀD̂ by an explicit float64 inverse — for tests and documentation only."""
    k_NI = keys_NI.detach().to(torch.float64)
    lam = torch.exp(torch.as_tensor(log_lambda).detach().to(torch.float64))
    a_II = k_NI.T @ k_NI + lam * torch.eye(k_NI.shape[1], dtype=torch.float64, device=k_NI.device)
    return torch.linalg.inv(a_II) @ (k_NI.T @ delta_NO.detach().to(torch.float64))
