"""Edit-module names for layer indices, and the edited weight in one orientation (HF Linear: (d_out, d_in))."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from horse_dist.lm.registry import ARCHITECTURES, layer_index, model_type, resolve_edit_modules


def arch_spec(model: nn.Module):
    spec = ARCHITECTURES.get(model_type(model))
    if spec is None:
        raise ValueError(f"locate editors: no edit-module layout for model_type {model_type(model)!r}")
    return spec


def n_layers(model: nn.Module) -> int:
    return len(model.get_submodule(arch_spec(model).layers_path))


def module_names_for(model: nn.Module, layers: list[int]) -> list[str]:
    """The MLP output projection of each layer index, validated by the registry (ascending order kept)."""
    spec = arch_spec(model)
    total = n_layers(model)
    bad = [i for i in layers if not 0 <= i < total]
    if bad:
        raise ValueError(f"locate.layers {bad} out of range: the model has {total} layers (0..{total - 1})")
    return resolve_edit_modules(model, [f"{spec.layers_path}.{i}.{spec.edit_module}" for i in layers])


def block_name(module_name: str) -> str:
    """The decoder block holding a module: 'model.layers.7.mlp.down_proj' -> 'model.layers.7'."""
    index = str(layer_index(module_name))
    parts = module_name.split(".")
    return ".".join(parts[: parts.index(index) + 1])


def weight_OI(module: nn.Module) -> Tensor:
    """The weight as (d_out, d_in): nn.Linear stores it so; GPT-2's Conv1D stores (d_in, d_out)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if isinstance(module, Conv1D):
        return module.weight.detach().T
    raise TypeError(f"{type(module).__name__} is not nn.Linear or Conv1D")


@torch.no_grad()
def set_weight_OI(module: nn.Module, new_OI: Tensor) -> None:
    """Write a (d_out, d_in) weight back in the module's own orientation and dtype, in place."""
    target = module.weight
    value = new_OI if isinstance(module, nn.Linear) else new_OI.T
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"new weight shape {tuple(value.shape)} != {tuple(target.shape)}")
    target.copy_(value.to(dtype=target.dtype, device=target.device))
