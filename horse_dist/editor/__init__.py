"""Pure tensor math of the editors: hypernet, residual, spread, ridge solve, meta-gradient, losses."""

from .hypernet import HyperNet, LowRankBlock, RunningNormalizer, batch_moments
from .losses import per_example_accuracy, per_example_agreement, per_example_ce, per_example_kl
from .metagrad import hypernet_vjp, log_lambda_grad, residual_grad, ridge_meta_direction
from .residual import residual
from .solve import DualRidge, PrimalRidge, RidgeSolveError, choose_form, ridge_shift_reference
from .spread import SPREAD_MODES, Reducer, SpreadState, spread_backward, spread_forward

__all__ = [
    "SPREAD_MODES",
    "DualRidge",
    "HyperNet",
    "LowRankBlock",
    "PrimalRidge",
    "Reducer",
    "RidgeSolveError",
    "RunningNormalizer",
    "SpreadState",
    "batch_moments",
    "choose_form",
    "hypernet_vjp",
    "log_lambda_grad",
    "per_example_accuracy",
    "per_example_agreement",
    "per_example_ce",
    "per_example_kl",
    "residual",
    "residual_grad",
    "ridge_meta_direction",
    "ridge_shift_reference",
    "spread_backward",
    "spread_forward",
]
