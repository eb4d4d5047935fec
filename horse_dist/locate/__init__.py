"""Locate-then-edit methods: MEMIT-style keys and values; MOSE (orthogonal), MEMIT (additive) and AlphaEdit
(additive in the preserved keys' null space) editors."""

from __future__ import annotations

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from horse_dist.config import RunConfig
from horse_dist.locate.editors import (
    EDITORS,
    METHODS,
    AlphaEditEditor,
    Editor,
    LocateEditor,
    MemitEditor,
    MoseEditor,
    editable_layers,
    locate_module_names,
    validate_locate,
)
from horse_dist.locate.keys import compute_keys
from horse_dist.locate.prompts import SubjectNotFoundError, essence_batch, rewrite_batch, sample_prefixes
from horse_dist.locate.values import ValueOptions, ValueResult, optimise_values


def build_locate_editor(
    cfg: RunConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase, stats: dict[str, Tensor]
) -> Editor:
    """The editor named by cfg.locate.method; `stats` maps each of locate_module_names(...) to its C0."""
    validate_locate(cfg.locate)
    return EDITORS[cfg.locate.method](cfg, model, tokenizer, stats)


__all__ = [
    "EDITORS",
    "AlphaEditEditor",
    "METHODS",
    "Editor",
    "LocateEditor",
    "MemitEditor",
    "MoseEditor",
    "SubjectNotFoundError",
    "ValueOptions",
    "ValueResult",
    "build_locate_editor",
    "compute_keys",
    "editable_layers",
    "essence_batch",
    "locate_module_names",
    "optimise_values",
    "rewrite_batch",
    "sample_prefixes",
    "validate_locate",
]
