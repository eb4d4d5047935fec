"""Target values v_e: the edited layer's output that makes the model produce the new answer (MEMIT's z).

A residual vector δ_e is added to the edited module's output at the subject's last token of every prompt of
edit e (all prefixes, and the essence prompt), and optimised with Adam on
  NLL(answer | prefix + prompt)  +  kl_factor · KL(p_δ ‖ p_0) at the subject's last token of "{subject} is a"
  +  weight_decay · ‖δ_e‖² / ‖h_e‖²,
with ‖δ_e‖ clamped to clamp_factor · ‖h_e‖, h_e the residual stream after the block at the subject's last
token of the plain prompt (with data.answer_end=eos the answer's tokens end with end-of-text). z_e = h_e + δ_e
is then the layer's target (MEMIT §4.3). The N edits are optimised together: their δ are independent, so
summing their losses is the same as N separate runs.

The module is a block's MLP output projection, whose output is added to the residual stream, so δ at its
output is δ on the block's output at that one position. Nothing before the subject's last token depends on
δ, nor does anything below the block. Where the model can resume at a block (lm/fast_forward.RESUMABLE), the
states entering the next block and the keys and values of every row's context (the tokens before the
subject's last one) in the blocks above are computed once per call (`TailPasses`); each Adam step then runs
only the tail (the subject's last token to the answer's end; one token for the essence prompt) through the
blocks above the edited one. Elsewhere each step runs the whole model with δ added by a hook (`FullPasses`).
Both give the same losses and gradients up to float rounding (tests/test_locate.py).
Legend: B rows, T positions, Q tail slots, N edits, O = d_out (hidden size), V vocabulary, M answer tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from horse_dist.data.tokenize import IGNORE_INDEX
from horse_dist.lm.answer_tail import (
    TailLayout,
    frozen_context,
    gather_slots,
    right_padded,
    slot_layout,
    tail_on_context,
)
from horse_dist.lm.fast_forward import RESUMABLE, block_count, hidden_entering_block
from horse_dist.lm.registry import layer_index, model_type
from horse_dist.locate.keys import forward_hook, mean_per_edit, run_base, subject_block_outputs
from horse_dist.locate.layers import block_name
from horse_dist.locate.prompts import LocateBatch, rows_of, stacked


@dataclass(frozen=True)
class ValueOptions:
    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_factor: float = 0.75
    min_nll: float = 0.05  # stop once every edit's mean answer NLL is below this
    max_token_nll: float = math.inf  # ... and every answer token of every row below this (ln 2: the argmax)


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


def nll_per_edit(
    model: nn.Module, hidden_BTO: Tensor, labels_BT: Tensor, batch: LocateBatch
) -> tuple[Tensor, Tensor]:
    """Answer-token NLL per edit from final hidden states (labels at the same slots): the mean per row
    averaged over the edit's rows, and the worst single token over them; (N,), (N,) float32."""
    labels_BT = labels_BT.to(hidden_BTO.device)
    mask_BT = labels_BT != IGNORE_INDEX
    logits_MV = model.get_output_embeddings()(hidden_BTO[mask_BT]).float()
    nll_M = F.cross_entropy(logits_MV, labels_BT[mask_BT], reduction="none")
    row_M = mask_BT.nonzero()[:, 0]
    n_rows = labels_BT.shape[0]
    sums_B = torch.zeros(n_rows, device=nll_M.device).index_add(0, row_M, nll_M)
    per_row_B = sums_B / mask_BT.sum(1).clamp_min(1)
    edit_M = batch.edit_of_row_B.to(nll_M.device)[row_M]
    worst_N = torch.zeros(batch.n_edits, device=nll_M.device)
    worst_N = worst_N.scatter_reduce(0, edit_M, nll_M.detach(), reduce="amax", include_self=False)
    return mean_per_edit(per_row_B[:, None], batch.edit_of_row_B, batch.n_edits)[:, 0], worst_N


def answer_nll(model: nn.Module, hidden_BTO: Tensor, batch: LocateBatch) -> tuple[Tensor, Tensor]:
    """Mean and worst answer-token NLL per edit from a full pass's final hidden states (nll_per_edit)."""
    return nll_per_edit(model, hidden_BTO, batch.labels_BT, batch)


def answers_made(model: nn.Module, batch: LocateBatch) -> Tensor:
    """(N,) bool: whether every answer token of each edit's plain prompt (its first row) is the model's
    argmax, teacher-forced: the edit as the success score reads it."""
    plain = rows_of(batch, first_row_per_edit(batch))
    with torch.no_grad():
        hidden_BTO = run_base(model, plain)
        labels_BT = plain.labels_BT.to(hidden_BTO.device)
        guess_BT = model.get_output_embeddings()(hidden_BTO).argmax(-1)
    return ((guess_BT == labels_BT) | (labels_BT == IGNORE_INDEX)).all(1).cpu()


def log_probs(model: nn.Module, hidden_BO: Tensor) -> Tensor:
    return torch.log_softmax(model.get_output_embeddings()(hidden_BO).float(), dim=-1)


def subject_log_probs(model: nn.Module, hidden_BTO: Tensor, batch: LocateBatch) -> Tensor:
    """Next-token log-probabilities at each row's subject position: (B, V) float32."""
    rows_B = torch.arange(hidden_BTO.shape[0], device=hidden_BTO.device)
    return log_probs(model, hidden_BTO[rows_B, batch.subject_pos_B.to(hidden_BTO.device)])


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


class FullPasses:
    """Every pass runs the whole model; a hook adds δ at the module's output (any architecture)."""

    def __init__(
        self, model: nn.Module, module_name: str, rewrite: LocateBatch, essence: LocateBatch, delta_NO: Tensor
    ) -> None:
        self.model, self.module_name, self.rewrite, self.essence = model, module_name, rewrite, essence
        self.adder = _DeltaAdder(delta_NO)
        hidden_BO = subject_block_outputs(model, block_name(module_name), rewrite)
        self.hidden_NO = hidden_BO[first_row_per_edit(rewrite)]

    def __enter__(self) -> FullPasses:
        self._hook = forward_hook(self.model.get_submodule(self.module_name), self.adder)
        self._hook.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hook.__exit__(*exc)

    def losses(self) -> tuple[Tensor, Tensor, Tensor]:
        """Answer NLL per edit (N,), its worst token (N,), and the essence prompts' log-probabilities at the
        subject (N, V)."""
        nll_N, worst_N = answer_nll(self.model, self.adder.run(self.model, self.rewrite), self.rewrite)
        logp_NV = subject_log_probs(self.model, self.adder.run(self.model, self.essence), self.essence)
        return nll_N, worst_N, logp_NV


class TailPasses:
    """The rewrite and essence rows in one batch, split at their subject positions: the states entering the
    block above the edited one and the context's keys and values up there are computed once; each pass runs
    the tail slots (subject's last token first) of the blocks above, for the rewrite rows up to the answer's
    end, for the essence rows the subject alone (see the module docstring)."""

    def __init__(
        self, model: nn.Module, module_name: str, rewrite: LocateBatch, essence: LocateBatch, delta_NO: Tensor
    ) -> None:
        device = delta_NO.device
        self.model, self.delta_NO, self.rewrite = model, delta_NO, rewrite
        self.block = layer_index(module_name) + 1
        self.n_rewrite = rewrite.input_ids_BT.shape[0]
        batch = stacked(rewrite, essence)
        self.edit_of_row_B = batch.edit_of_row_B.to(device)
        real_BT = batch.attention_mask_BT.bool().to(device)
        steps_BT = torch.arange(real_BT.shape[1], device=device).expand_as(real_BT)
        subject_B1 = batch.subject_pos_B.to(device)[:, None]
        whole_B1 = (torch.arange(real_BT.shape[0], device=device) < self.n_rewrite)[:, None]
        tail_BT = real_BT & torch.where(whole_B1, steps_BT >= subject_B1, steps_BT == subject_B1)
        context_BT = real_BT & (steps_BT < subject_B1)
        self.layout: TailLayout = slot_layout(context_BT, tail_BT, *right_padded(real_BT))
        with torch.no_grad():
            inputs = {"input_ids": batch.input_ids_BT.to(device), "attention_mask": real_BT.long()}
            entering_BTO = hidden_entering_block(model, {**inputs, "use_cache": False}, self.block)
            self.context = frozen_context(model, self.layout, entering_BTO, self.block)
        self.entering_BQO = gather_slots(entering_BTO, self.layout.tail_BQ)
        labels_BQ = batch.labels_BT.to(device).gather(1, self.layout.tail_BQ)
        self.labels_BQ = labels_BQ.masked_fill(~self.layout.tail_real_BQ, IGNORE_INDEX)
        self.hidden_NO = self.entering_BQO[first_row_per_edit(rewrite).to(device), 0].float()

    def __enter__(self) -> TailPasses:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def losses(self) -> tuple[Tensor, Tensor, Tensor]:
        """Answer NLL per edit (N,), its worst token (N,), and the essence prompts' log-probabilities at the
        subject (N, V)."""
        at_subject_BO = self.entering_BQO[:, 0] + self.delta_NO[self.edit_of_row_B].to(
            self.entering_BQO.dtype
        )
        tail_BQO = torch.cat([at_subject_BO[:, None], self.entering_BQO[:, 1:]], dim=1)
        final_BQO = tail_on_context(self.model, self.layout, tail_BQO, self.block, self.context)
        rows = self.n_rewrite
        nll_N, worst_N = nll_per_edit(self.model, final_BQO[:rows], self.labels_BQ[:rows], self.rewrite)
        return nll_N, worst_N, log_probs(self.model, final_BQO[rows:, 0])  # essence rows are in edit order


def use_tail_passes(model: nn.Module, module_name: str) -> bool:
    """Tail passes need a resumable family and at least one block above the edited one."""
    return model_type(model) in RESUMABLE and layer_index(module_name) + 1 < block_count(model)


def optimise_values(
    model: nn.Module,
    module_name: str,
    rewrite: LocateBatch,
    essence: LocateBatch,
    options: ValueOptions,
    tail: bool | None = None,
) -> ValueResult:
    """Find δ (N, O) for the edits of `rewrite` at `module_name`'s output (see the module docstring).
    `tail`: run tail passes (None: wherever the model allows)."""
    device = next(model.parameters()).device
    tail = use_tail_passes(model, module_name) if tail is None else tail
    delta_NO = torch.zeros(rewrite.n_edits, model.config.hidden_size, device=device, requires_grad=True)
    kind = TailPasses if tail else FullPasses
    with kind(model, module_name, rewrite, essence, delta_NO) as passes:
        return _adam_on_delta(passes, delta_NO, options)


def _adam_on_delta(passes: FullPasses | TailPasses, delta_NO: Tensor, options: ValueOptions) -> ValueResult:
    hidden_NO = passes.hidden_NO.to(delta_NO.device)
    norm_N = hidden_NO.norm(dim=1).clamp_min(1e-6)
    with torch.no_grad():
        nll_before_N, _, logp0_NV = passes.losses()  # δ = 0 still
    optimiser = torch.optim.Adam([delta_NO], lr=options.lr)
    steps = 0
    for _ in range(options.steps):
        nll_N, worst_N, logp_NV = passes.losses()
        if float(nll_N.detach().max()) < options.min_nll and float(worst_N.max()) < options.max_token_nll:
            break
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
        nll_after_N = passes.losses()[0]
    return ValueResult(delta_NO.detach().float(), hidden_NO, nll_before_N.cpu(), nll_after_N.cpu(), steps)
