"""Merge predicted shifts into an LM and export it as a plain HF model folder."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from horse_dist.lm.registry import weight_delta


def _merged_weight(model: PreTrainedModel, name: str, shift: Tensor) -> Tensor:
    module = model.get_submodule(name)
    weight = module.weight
    # Add in fp32 then cast back once, so bf16/fp16 weights see a single rounding step.
    return (weight.float() + weight_delta(module, shift, dtype=torch.float32)).to(weight.dtype)


@torch.no_grad()
def apply_shifts_(model: PreTrainedModel, shifts: dict[str, Tensor]) -> None:
    """In place: ``W += delta(S)`` for every edit module name in ``shifts``."""
    for name, shift in shifts.items():
        model.get_submodule(name).weight.copy_(_merged_weight(model, name, shift))


def plain_copy(model: PreTrainedModel, replace: dict[str, Tensor] | None = None) -> PreTrainedModel:
    """A fresh model of the same class that shares ``model``'s tensors (no copy) except ``replace``.

    Why: GGUF-loaded models refuse ``save_pretrained``; a fresh instance of the same config class does not.
    Building it under ``init_empty_weights`` skips random init and extra memory (buffers stay real).
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the GGUF marker; the copy holds plain dequantised weights
        del config.quantization_config
    with init_empty_weights():
        fresh = type(model)(config)
    state = model.state_dict()
    unknown = set(replace or {}) - set(state)
    if unknown:
        raise KeyError(f"not in the state dict: {sorted(unknown)}")
    state.update(replace or {})
    fresh.load_state_dict(state, assign=True)
    fresh.tie_weights()  # assign=True leaves tied parameters as separate objects
    for name, buffer in model.named_buffers():  # non-persistent ones (rotary inv_freq) on the right device
        owner, _, leaf = name.rpartition(".")
        setattr(fresh.get_submodule(owner), leaf, buffer)
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh.eval()


def save_edited_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    shifts: dict[str, Tensor],
    out_dir: str | Path,
    metadata: dict | None = None,
) -> Path:
    """Save ``model`` with ``shifts`` merged as a plain HF folder; ``model`` itself is not modified."""
    out_dir = Path(out_dir).expanduser().resolve()
    with torch.no_grad():
        merged = {f"{name}.weight": _merged_weight(model, name, s) for name, s in shifts.items()}
    edited = plain_copy(model, merged)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        edited.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {**(metadata or {}), "edited_modules": list(shifts)}
        (tmp / "edit_metadata.json").write_text(json.dumps(info, indent=2, default=str))
        if out_dir.exists():  # os.replace cannot overwrite a non-empty directory
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
