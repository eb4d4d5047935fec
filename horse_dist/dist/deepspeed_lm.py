"""The frozen LM of a distributed worker, wrapped by DeepSpeed (ZeRO stage 0 or 3, DESIGN §2).

Stage 3 partitions every frozen weight over the W workers; the weights are loaded straight into the shards
(``HfDeepSpeedConfig`` is created before ``from_pretrained``, so no worker ever materialises the full model)
and, with ``offload_params``, the shards live in host memory. Stage 0 replicates the model. There is no
optimizer on the LM: DeepSpeed then builds its inference-only parameter coordinator, whose fetch/release
hooks sit on every submodule. Callers use ``engine.module`` (the hooked HF model), never ``engine(...)``
(that path refuses a plain ``loss.backward()``); ``model.base_model(...)`` and
``model.get_output_embeddings()(h)`` both gather their own parameters, tied embeddings included.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from horse_dist.lm.load import resolve_local

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def deepspeed_config(zero_stage: int, offload_params: bool = False, dtype: str = "float32") -> dict[str, Any]:
    """The DeepSpeed config of a frozen, optimizer-free LM."""
    if zero_stage not in (0, 3):
        raise ValueError(f"zero_stage must be 0 or 3 (1 and 2 only shard optimizer state), got {zero_stage}")
    if offload_params and zero_stage != 3:
        raise ValueError("dist.offload_params needs dist.zero_stage=3")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        # 0: every parameter is partitioned, norms and biases included (the default 1e5 keeps small
        # tensors replicated, which would make a tiny test model look unsharded).
        zero["stage3_param_persistence_threshold"] = 0
        if offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}
    if dtype == "bfloat16":
        config["bf16"] = {"enabled": True}
    elif dtype == "float16":
        config["fp16"] = {"enabled": True}
    return config


@dataclass
class DeepSpeedLM:
    model: nn.Module  # engine.module: the HF model with DeepSpeed's hooks; forward through this
    engine: Any  # the DeepSpeedEngine (kept alive: it owns the partitioned parameters)
    tokenizer: Any
    hf_ds_config: Any  # HfDeepSpeedConfig (kept alive: transformers reads it through a weak reference)
    zero_stage: int


def local_model_dir(source: str) -> str:
    """A local HF folder for `source`: GGUF files and the SmolLM2 alias go through the converted cache."""

    local = resolve_local(source, None, None)
    return str(local) if local is not None else source


def set_layer_leaves(model: nn.Module) -> list[str]:
    """Make each transformer block a ZeRO-3 leaf: DeepSpeed then gathers a block's weights in one collective
    when the block runs, instead of one per linear and norm (~9 per block). The gathers are latency-bound on
    small models and CPU workers, so this cuts a pass's collectives ~9x; our edit hooks on the blocks'
    submodules still fire. Returns the leaf class names (the model's `_no_split_modules`)."""
    from deepspeed.utils import set_z3_leaf_modules

    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = sorted(
        {type(m) for m in model.modules() if type(m).__name__ in names}, key=lambda c: c.__name__
    )
    if not classes:
        log.warning("no transformer-block class found (_no_split_modules=%s): per-module gathers", names)
        return []
    set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


def load_frozen_lm_deepspeed(
    source: str,
    zero_stage: int,
    offload_params: bool = False,
    dtype: str = "float32",
    gather: str = "layer",
) -> DeepSpeedLM:
    """Load a frozen causal LM under DeepSpeed. torch.distributed must already be initialised (Ray Train
    or a launcher did it); DeepSpeed reuses that process group."""
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    deepspeed.init_distributed(dist_backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    config = deepspeed_config(zero_stage, offload_params, dtype)
    # Must exist before from_pretrained: it makes transformers build the model under zero.Init and load
    # each weight straight into its partition.
    hf_ds_config = HfDeepSpeedConfig(config) if zero_stage == 3 else None
    location = local_model_dir(source)
    local_only = location != source or source.startswith(("/", ".", "~"))
    tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[dtype], local_files_only=local_only)
    model.requires_grad_(False).eval()
    if zero_stage == 0 and torch.cuda.is_available():
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    if zero_stage == 3 and gather == "layer":
        set_layer_leaves(model)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    module = engine.module
    module.requires_grad_(False).eval()
    _fix_tokenizer(tokenizer, module, source)
    log.info("frozen LM %s under DeepSpeed ZeRO-%d (offload_params=%s)", source, zero_stage, offload_params)
    return DeepSpeedLM(module, engine, tokenizer, hf_ds_config, zero_stage)


def _fix_tokenizer(tokenizer, model: nn.Module, source: str) -> None:
    # Same conventions as horse_dist.lm.load.load_frozen_lm: right padding, pad falls back to eos.
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {source!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def partition_report(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per parameter: (elements held by this worker, elements of the full tensor). Under ZeRO-3 the local
    part is the partition `ds_tensor`; otherwise the whole tensor."""
    report = {}
    for name, param in model.named_parameters():
        full = int(getattr(param, "ds_numel", param.numel()))
        local = int(param.ds_tensor.numel()) if hasattr(param, "ds_tensor") else int(param.numel())
        report[name] = (local, full)
    return report
