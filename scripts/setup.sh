#!/usr/bin/env bash
# Create .venv with a CPU build of torch and this project (editable) plus its dev tools.
# Idempotent: a second run only checks. Override the interpreter with PYTHON=python3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.maskgrpo-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # Pin torch first so that the unpinned `torch>=` of pyproject.toml cannot pull a multi-GB CUDA build.
    # On Linux laptops, TORCH_INDEX=https://download.pytorch.org/whl/cpu fetches the small CPU wheel.
    .venv/bin/python -m pip install -q "torch==${TORCH_VERSION}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
    .venv/bin/python -m pip install -q -e ".[dev,scale]"
    touch "$stamp"
fi
