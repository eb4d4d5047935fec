"""Edit modules per architecture and the (d_in, d_out) shift convention of HORSE/MALMEN.

A shift ``S`` always has shape ``(d_in, d_out)`` (key size, value size). ``nn.Linear`` stores its weight
as ``(out, in)`` so it takes ``S.T``; HF ``Conv1D`` (GPT-2) stores ``(in, out)`` so it takes ``S`` as is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class ArchSpec:
    layers_path: str  # the nn.ModuleList of decoder blocks, e.g. "model.layers"
    edit_module: str  # second MLP linear inside one block, e.g. "mlp.down_proj"


_GATED = ArchSpec("model.layers", "mlp.down_proj")  # llama-style gated MLP (gate/up/down)

# Keyed by HF ``config.model_type``; MoE models (mixtral, qwen2_moe, ...) are left out on purpose:
# their experts have no single second MLP linear.
ARCHITECTURES: dict[str, ArchSpec] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "olmo",
            "olmo2",
            "granite",
            "cohere",
            "stablelm",
            "smollm3",
        ),
        _GATED,
    ),
    "phi": ArchSpec("model.layers", "mlp.fc2"),
    "starcoder2": ArchSpec("model.layers", "mlp.c_proj"),
    "gpt2": ArchSpec("transformer.h", "mlp.c_proj"),  # Conv1D
    "gpt_bigcode": ArchSpec("transformer.h", "mlp.c_proj"),
    "gpt_neo": ArchSpec("transformer.h", "mlp.c_proj"),
    "gptj": ArchSpec("transformer.h", "mlp.fc_out"),
    "codegen": ArchSpec("transformer.h", "mlp.fc_out"),
    "falcon": ArchSpec("transformer.h", "mlp.dense_4h_to_h"),
    "bloom": ArchSpec("transformer.h", "mlp.dense_4h_to_h"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "opt": ArchSpec("model.decoder.layers", "fc2"),
}

EDITABLE_TYPES = (nn.Linear, Conv1D)


def model_type(model: nn.Module) -> str | None:
    """The HF `config.model_type` (None for a module without an HF config)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def default_edit_modules(model: nn.Module, n_last: int = 6) -> list[str]:
    """Full names of the edit module in the last ``n_last`` layers, ascending layer order."""
    kind = model_type(model)
    spec = ARCHITECTURES.get(kind)
    if spec is None:
        raise ValueError(
            f"no default edit modules for model_type {kind!r} (known: {sorted(ARCHITECTURES)}); "
            "set model.edit_modules to explicit module names, e.g. 'model.layers.27.mlp.down_proj'"
        )
    n_layers = len(model.get_submodule(spec.layers_path))
    if not 1 <= n_last <= n_layers:
        raise ValueError(
            f"the model has {n_layers} layers; the number of edited layers must be in [1, {n_layers}]"
        )
    return [f"{spec.layers_path}.{i}.{spec.edit_module}" for i in range(n_layers - n_last, n_layers)]


def _editable_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, EDITABLE_TYPES)]


def _candidates_hint(model: nn.Module, bad: str, k: int = 5) -> str:
    names = _editable_names(model)
    tail = bad.rsplit(".", 1)[-1]
    # Prefer candidates with the same leaf name (likely the intended module of another layer).
    similar = [n for n in names if n.endswith("." + tail)] or names
    return ", ".join(similar[-k:]) + (" ..." if len(similar) > k else "")


def resolve_edit_modules(model: nn.Module, names: Sequence[str] | None, n_last: int = 6) -> list[str]:
    """Validate explicit edit-module names (order kept: it defines module_idx), else the default."""
    if not names:
        return default_edit_modules(model, n_last)
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate edit modules in {names}")
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"edit module {name!r} does not exist in {type(model).__name__}; "
                f"valid candidates: {_candidates_hint(model, name)}"
            ) from None
        if not isinstance(module, EDITABLE_TYPES):
            raise ValueError(
                f"edit module {name!r} is a {type(module).__name__}, not nn.Linear or Conv1D; "
                f"valid candidates: {_candidates_hint(model, name)}"
            )
    return names


def module_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an editable module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    raise TypeError(f"{type(module).__name__} is not nn.Linear or Conv1D")


def weight_delta(module: nn.Module, shift_IO: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The tensor to add to ``module.weight`` for a shift of shape (d_in, d_out).

    ``dtype`` defaults to the weight's dtype; pass ``torch.float32`` to merge in full precision.
    """
    expected = module_shape(module)
    if tuple(shift_IO.shape) != expected:
        raise ValueError(f"shift shape {tuple(shift_IO.shape)} != module (d_in, d_out) {expected}")
    delta = shift_IO.T if isinstance(module, nn.Linear) else shift_IO
    weight = module.weight
    return delta.to(device=weight.device, dtype=dtype or weight.dtype)


_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int:
    """Layer number of a module name: the first purely numeric component ("model.layers.27.mlp" -> 27)."""
    match = _LAYER_RE.search(name)
    if match is None:
        raise ValueError(f"no layer index in module name {name!r}")
    return int(match.group(1))
