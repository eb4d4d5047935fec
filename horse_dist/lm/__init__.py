"""Frozen LM loading, edit-module registry and export of edited models."""

from horse_dist.lm.export import apply_shifts_, plain_copy, save_edited_model
from horse_dist.lm.load import SMOLLM2_ALIAS, load_frozen_lm, resolve_smollm2_gguf
from horse_dist.lm.registry import (
    ARCHITECTURES,
    ArchSpec,
    default_edit_modules,
    layer_index,
    module_shape,
    resolve_edit_modules,
    weight_delta,
)

__all__ = [
    "ARCHITECTURES",
    "SMOLLM2_ALIAS",
    "ArchSpec",
    "apply_shifts_",
    "default_edit_modules",
    "layer_index",
    "load_frozen_lm",
    "module_shape",
    "plain_copy",
    "resolve_edit_modules",
    "resolve_smollm2_gguf",
    "save_edited_model",
    "weight_delta",
]
