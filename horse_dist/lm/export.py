"""Merge predicted shifts into an LM and export it as a plain HF model folder."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
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


METADATA_NAME = "edit_metadata.json"


class ExportTargetError(ValueError):
    """An export folder that would overwrite something this program did not write."""


def check_export_target(out_dir: Path, overwrite: bool, protect: Sequence[Path] = ()) -> None:
    """Refuse an `out_dir` that is, or holds, the working folder or a protected path (the checkpoint read),
    and a non-empty one unless `overwrite` and it is an export of ours (it holds edit_metadata.json)."""
    for guarded in [Path.cwd(), *protect]:
        guarded = guarded.expanduser().resolve()
        if guarded == out_dir or out_dir in guarded.parents:
            raise ExportTargetError(f"out={out_dir}: refusing to write over {guarded}, which it holds")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportTargetError(f"out={out_dir}: exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ExportTargetError(
            f"out={out_dir}: folder exists and is not empty; pass overwrite=true to replace it"
        )
    if not (out_dir / METADATA_NAME).is_file():
        raise ExportTargetError(
            f"out={out_dir}: not an edited model written by horse_dist.edit (no {METADATA_NAME}); "
            "refusing to delete it even with overwrite=true"
        )


def save_edited_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    shifts: dict[str, Tensor],
    out_dir: str | Path,
    metadata: dict | None = None,
    overwrite: bool = False,
    protect: Sequence[Path] = (),
) -> Path:
    """Save ``model`` with ``shifts`` merged as a plain HF folder; ``model`` itself is not modified.

    Written beside ``out_dir`` then renamed into place; a previous export is replaced only with `overwrite`
    (see check_export_target), and is removed only after the new one is in place."""
    out_dir = Path(out_dir).expanduser().resolve()
    check_export_target(out_dir, overwrite, protect)
    with torch.no_grad():
        merged = {f"{name}.weight": _merged_weight(model, name, s) for name, s in shifts.items()}
    bad = [name for name, weight in merged.items() if not bool(torch.isfinite(weight).all())]
    if bad:
        raise ExportTargetError(
            f"out={out_dir}: refusing to save non-finite merged weights ({', '.join(bad)})"
        )
    edited = plain_copy(model, merged)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old = None
    try:
        edited.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {**(metadata or {}), "edited_modules": list(shifts)}
        (tmp / METADATA_NAME).write_text(json.dumps(info, indent=2, default=str))
        if out_dir.exists():  # os.replace cannot overwrite a non-empty folder: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "previous")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "previous").exists() and not out_dir.exists():
            os.replace(old / "previous", out_dir)  # put the previous export back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir
