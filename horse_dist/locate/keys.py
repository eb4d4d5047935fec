"""Keys k_e: the edited module's input at the subject's last token, averaged over the random prefixes.

Legend: B rows, T positions, N edits, I = d_in, O = d_out (hidden size of the residual stream).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from horse_dist.locate.prompts import LocateBatch


class _StopForward(Exception):
    """Raised by a capture hook: nothing above the captured module is needed."""


@contextmanager
def forward_hook(module: nn.Module, hook: Callable) -> Iterator[None]:
    """Register a forward hook for the block only; removed even when the forward raises."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_base(model: nn.Module, batch: LocateBatch) -> Tensor:
    """Final hidden states (B, T, O) of the decoder (after its last norm), without the LM head."""
    device = _device(model)
    out = model.base_model(
        input_ids=batch.input_ids_BT.to(device), attention_mask=batch.attention_mask_BT.to(device)
    )
    return out.last_hidden_state


def _capture(model: nn.Module, module: nn.Module, batch: LocateBatch, take_input: bool) -> Tensor:
    rows_B = torch.arange(batch.input_ids_BT.shape[0])
    captured: list[Tensor] = []

    def hook(_module, inputs, output):
        x = inputs[0] if take_input else (output[0] if isinstance(output, tuple) else output)
        captured.append(x[rows_B.to(x.device), batch.subject_pos_B.to(x.device)].detach().float())
        raise _StopForward

    with torch.no_grad(), forward_hook(module, hook):
        try:
            run_base(model, batch)
        except _StopForward:
            pass
    if not captured:
        raise RuntimeError("the capture hook never ran: is the module part of the model's forward?")
    return captured[0]


def subject_inputs(model: nn.Module, module_name: str, batch: LocateBatch) -> Tensor:
    """The module's input at each row's subject position, (B, I) float32."""
    return _capture(model, model.get_submodule(module_name), batch, take_input=True)


def subject_block_outputs(model: nn.Module, block_name: str, batch: LocateBatch) -> Tensor:
    """The residual stream after a decoder block at each row's subject position, (B, O) float32."""
    return _capture(model, model.get_submodule(block_name), batch, take_input=False)


def mean_per_edit(rows_BD: Tensor, edit_of_row_B: Tensor, n_edits: int) -> Tensor:
    """Average the rows of each edit: (B, D) -> (N, D)."""
    sums_ND = torch.zeros(n_edits, rows_BD.shape[1], dtype=rows_BD.dtype, device=rows_BD.device)
    sums_ND.index_add_(0, edit_of_row_B.to(rows_BD.device), rows_BD)
    counts_N = torch.bincount(edit_of_row_B, minlength=n_edits).to(rows_BD)
    return sums_ND / counts_N[:, None]


def compute_keys(model: nn.Module, module_name: str, batch: LocateBatch) -> Tensor:
    """K_E, shape (I, N): column e is k_e, the module input at the subject's last token over the prefixes."""
    inputs_BI = subject_inputs(model, module_name, batch)
    return mean_per_edit(inputs_BI, batch.edit_of_row_B, batch.n_edits).T
