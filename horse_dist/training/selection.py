"""Model selection on a validation split (train.val_size): keep the editor with the best validation score.

The split is carved from the training pool (never the evaluation pool) and never trained on. Every
train.eval_every steps and at the last step the editor is scored on it; the best-scoring editor is what the
run's final evaluation reports and what <run>/best.pt holds. The score weighs edit success, locality and
fluency alike, so that selection cannot buy success with leaks or degenerate text:

    score = mean(ES, GS, agreement [, live ES, live GS, unrelated kept, entropy_edit ratio, entropy_unrel ratio])

the bracketed terms where live scores are measured, each entropy as min(1, edited / unedited).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from horse_dist.config import ConfigError
from horse_dist.data import TokenizedRecords, select_records, train_eval_split
from horse_dist.training.assembly import DataPools

BEST_NAME = "best.pt"
TEACHER_FORCED_TERMS = ("ES", "GS", "loc_agreement")
LIVE_TERMS = ("live_ES", "live_GS", "loc_gen_same")
FLUENCY_TERMS = ("entropy_edit", "entropy_unrel")


def hold_out_validation(pools: DataPools, size: int, seed: int) -> tuple[DataPools, TokenizedRecords]:
    """(the pools without the validation records, the validation pool); a seeded random `size` of the
    training records, the rest still train in record order."""
    n_train = len(pools.train_records)
    if size >= n_train:
        raise ConfigError(
            f"train.val_size={size} leaves no training records (the training pool holds {n_train})"
        )
    keep, held = train_eval_split(n_train, size, seed)
    train = DataPools(
        [pools.train_records[i] for i in keep],
        pools.eval_records,
        select_records(pools.train, keep),
        pools.eval,
    )
    return train, select_records(pools.train, held)


def validation_score(result: dict[str, float]) -> float:
    """The selection score of an `evaluate_pool` result (see the module docstring)."""
    terms = [result[f"edited/{m}"] for m in TEACHER_FORCED_TERMS]
    if "edited/live_ES" in result:
        terms += [result[f"edited/{m}"] for m in LIVE_TERMS]
        for metric in FLUENCY_TERMS:
            unedited = result[f"unedited/{metric}"]
            terms.append(min(1.0, result[f"edited/{metric}"] / unedited) if unedited > 0 else 1.0)
    return sum(terms) / len(terms)


class ModelSelection:
    """The best validation score so far, its step and a copy of that step's hypernetwork state."""

    def __init__(self) -> None:
        self.score = -math.inf
        self.step = 0
        self.hypernet: dict[str, torch.Tensor] | None = None

    def offer(self, score: float, step: int, hypernet: torch.nn.Module) -> bool:
        """Keep `hypernet`'s state if `score` beats the best so far (a non-finite score never does)."""
        if not math.isfinite(score) or score <= self.score:
            return False
        self.score, self.step = score, step
        self.hypernet = {k: v.detach().clone() for k, v in hypernet.state_dict().items()}
        return True

    def restore_best(self, hypernet: torch.nn.Module) -> None:
        if self.hypernet is None:
            raise RuntimeError("no validation score was recorded: nothing to select")
        hypernet.load_state_dict(self.hypernet)

    def state_dict(self) -> dict[str, Any]:
        return {"score": self.score, "step": self.step, "hypernet": self.hypernet}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.score, self.step, self.hypernet = state["score"], state["step"], state["hypernet"]
