"""Target values v_e: the edited layer's output that makes the model produce the new answer (MEMIT's z).

A residual vector δ_e is added to the edited module's output at the subject's last token of every prompt of
edit e (all prefixes, and the essence prompt), and optimised with Adam on
  NLL(answer | prefix + prompt)  +  kl_factor · KL(p_δ ‖ p_0) at the subject's last token of "{subject} is a"
  +  weight_decay · ‖δ_e‖² / ‖h_e‖²,
with ‖δ_e‖ clamped to clamp_factor · ‖h_e‖, h_e the residual stream after the block at the subject's last
token of the plain prompt. z_e = h_e + δ_e is then the layer's target (MEMIT §4.3). The N edits are optimised
together: their δ are independent, so summing their losses is the same as N separate runs.
Legend: B rows, T positions, N edits, O = d_out (hidden size), V vocabulary, M answer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from horse_dist.data.tokenize import IGNORE_INDEX
from horse_dist.locate.keys import forward_hook, mean_per_edit, run_base, subject_block_outputs
from horse_dist.locate.prompts import LocateBatch


@dataclass(frozen=True)
class ValueOptions:
    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_factor: float = 0.75
    min_nll: float = 0.05  # stop once every edit's mean answer NLL is below this


@dataclass
class ValueResult:
    delta_NO: Tensor  # optimised δ (float32)
    hidden_NO: Tensor  # h_e: residual stream after the block, plain prompt, subject's last token
    nll_before_N: Tensor  # answer NLL per edit (mean over prefixes) with δ = 0
    nll_after_N: Tensor  # and with the optimised δ
    steps: int  # Adam steps taken

    @property
    def target_NO(self) -> Tensor:
        return self.hidden_NO + self.delta_NO


def first_row_per_edit(batch: LocateBatch) -> Tensor:
    rows_B = torch.arange(batch.edit_of_row_B.shape[0])
    first_N = torch.full((batch.n_edits,), -1, dtype=torch.long)
    first_N.scatter_reduce_(0, batch.edit_of_row_B, rows_B, reduce="amin", include_self=False)
    return first_N


def answer_nll(model: nn.Module, hidden_BTO: Tensor, batch: LocateBatch) -> Tensor:
    """Mean answer-token NLL per row, averaged over each edit's rows: (N,) float32."""
    labels_BT = batch.labels_BT.to(hidden_BTO.device)
    mask_BT = labels_BT != IGNORE_INDEX
    logits_MV = model.get_output_embeddings()(hidden_BTO[mask_BT]).float()
    nll_M = F.cross_entropy(logits_MV, labels_BT[mask_BT], reduction="none")
    row_M = mask_BT.nonzero()[:, 0]
    n_rows = labels_BT.shape[0]
    sums_B = torch.zeros(n_rows, device=nll_M.device).index_add(0, row_M, nll_M)
    per_row_B = sums_B / mask_BT.sum(1).clamp_min(1)
    return mean_per_edit(per_row_B[:, None], batch.edit_of_row_B, batch.n_edits)[:, 0]


def subject_log_probs(model: nn.Module, hidden_BTO: Tensor, batch: LocateBatch) -> Tensor:
    """Next-token log-probabilities at each row's subject position: (B, V) float32."""
    rows_B = torch.arange(hidden_BTO.shape[0], device=hidden_BTO.device)
    at_subject_BO = hidden_BTO[rows_B, batch.subject_pos_B.to(hidden_BTO.device)]
    return torch.log_softmax(model.get_output_embeddings()(at_subject_BO).float(), dim=-1)


class _DeltaAdder:
    """Forward hook adding δ[edit of row] to the module output at each row's subject position."""

    def __init__(self, delta_NO: Tensor) -> None:
        self.delta_NO = delta_NO
        self.batch: LocateBatch | None = None

    def __call__(self, _module, _inputs, output: Tensor) -> Tensor:
        batch = self.batch
        if batch is None:
            return output
        device = output.device
        rows_B = torch.arange(output.shape[0], device=device)
        index = (rows_B, batch.subject_pos_B.to(device))
        add_BTO = torch.zeros(output.shape, dtype=self.delta_NO.dtype, device=device)
        add_BTO = add_BTO.index_put(index, self.delta_NO[batch.edit_of_row_B.to(device)])
        return output + add_BTO.to(output.dtype)

    def run(self, model: nn.Module, batch: LocateBatch) -> Tensor:
        self.batch = batch
        try:
            return run_base(model, batch)
        finally:
            self.batch = None


def optimise_values(
    model: nn.Module,
    module_name: str,
    block_name: str,
    rewrite: LocateBatch,
    essence: LocateBatch,
    options: ValueOptions,
) -> ValueResult:
    """Find δ (N, O) for the edits of `rewrite` at `module_name`'s output (see the module docstring)."""
    n = rewrite.n_edits
    hidden_NO = subject_block_outputs(model, block_name, rewrite)[first_row_per_edit(rewrite)]
    norm_N = hidden_NO.norm(dim=1).clamp_min(1e-6)
    device = next(model.parameters()).device
    with torch.no_grad():
        logp0_NV = subject_log_probs(model, run_base(model, essence), essence)
    delta_NO = torch.zeros(n, hidden_NO.shape[1], device=device, requires_grad=True)
    adder = _DeltaAdder(delta_NO)
    optimiser = torch.optim.Adam([delta_NO], lr=options.lr)
    norm_N = norm_N.to(device)
    nll_before = None
    steps = 0
    with forward_hook(model.get_submodule(module_name), adder):
        for _ in range(options.steps):
            nll_N = answer_nll(model, adder.run(model, rewrite), rewrite)
            if nll_before is None:
                nll_before = nll_N.detach().cpu()
            if float(nll_N.detach().max()) < options.min_nll:
                break
            logp_NV = subject_log_probs(model, adder.run(model, essence), essence)
            kl_N = (logp_NV.exp() * (logp_NV - logp0_NV)).sum(-1)
            decay_N = options.weight_decay * (delta_NO.norm(dim=1) / norm_N) ** 2
            loss = (nll_N + options.kl_factor * kl_N + decay_N).sum()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            steps += 1
            with torch.no_grad():
                dev_norm = delta_NO.norm(dim=1, keepdim=True)
                max_N1 = options.clamp_factor * norm_N[:, None]
                delta_NO.mul_(torch.where(dev_norm > max_N1, max_N1 / dev_norm, torch.ones_like(dev_norm)))
        with torch.no_grad():
            nll_after = answer_nll(model, adder.run(model, rewrite), rewrite).cpu()
    if nll_before is None:  # steps = 0
        nll_before = nll_after
    return ValueResult(delta_NO.detach().float(), hidden_NO.to(device), nll_before, nll_after, steps)
