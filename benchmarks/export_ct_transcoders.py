"""Write a full per-layer transcoder set in circuit-tracer's on-disk format (config.yaml +
layer_{i}.safetensors), the input of ``benchmarks/peer_circuit_tracer.py``.

``transcoders convert`` converts one coder at a time; circuit-tracer needs one transcoder for
every layer 0..n-1 in one folder. This reads every ``layers.{i}.mlp/`` coder of a run folder
(ours: cfg.json + coder.safetensors; BatchTopK coders are saved as JumpReLU) and writes them
together with :func:`transcoders.coders.formats.write_circuit_tracer`.

    .venv/bin/python benchmarks/export_ct_transcoders.py runs/all-jumprelu ../ct-inputs/transcoders

``--random N_LAYERS`` writes random JumpReLU transcoders of the given shape instead (no run
folder needed), for checking the peer pipeline before a run has finished; with ``--model`` the
thresholds are set from the model's pre-MLP norm weights so that about ``--random-l0``
features per token fire, roughly like a trained set.

Runs in the project's venv (it imports ``transcoders``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from transcoders.coders.coder import SparseCoder
from transcoders.coders.config import CoderConfig
from transcoders.coders.formats import read_circuit_tracer, read_coder, write_circuit_tracer

_LAYER_DIR = re.compile(r"^layers\.(\d+)\.mlp$")


def run_coders(run_dir: Path) -> dict[int, SparseCoder]:
    """``{layer: coder}`` from the ``layers.{i}.mlp/`` folders of a run (ours)."""
    found = {}
    for sub in sorted(run_dir.iterdir()):
        m = _LAYER_DIR.match(sub.name)
        if m and sub.is_dir():
            found[int(m.group(1))] = sub
    if not found:
        sys.exit(f"{run_dir} has no layers.{{i}}.mlp/ coder folders (is the run finished?)")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        sys.exit(f"{run_dir} lacks coders for layers {missing}; circuit-tracer needs every layer 0..{max(found)}")
    coders = {}
    for layer, folder in sorted(found.items()):
        coder = read_coder(folder)
        if isinstance(coder, dict):  # pragma: no cover - a folder of ours holds one coder
            sys.exit(f"{folder} holds a set, expected one coder")
        coders[layer] = coder
    return coders


def _norm_weights(model_dir: Path, n_layers: int) -> list[float] | None:
    """The norm of each layer's pre-MLP RMSNorm weight (LlamaForCausalLM naming)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    out: dict[int, float] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                m = re.search(r"layers\.(\d+)\.post_attention_layernorm\.weight$", key)
                if m:
                    out[int(m.group(1))] = float(st.get_tensor(key).float().norm())
    return [out[i] for i in range(n_layers)] if all(i in out for i in range(n_layers)) else None


def random_coders(
    n_layers: int, d_model: int, d_sae: int, *, l0: float, model_dir: Path | None, seed: int
) -> dict[int, SparseCoder]:
    """Random JumpReLU transcoders: unit-norm encoder and decoder rows, zero biases, one threshold
    per layer at the standard-normal quantile for ``l0 / d_sae`` firing, scaled by the expected
    pre-activation spread (|pre-MLP norm weight| / sqrt(d_model) when ``model_dir`` is given,
    else 1)."""
    g = torch.Generator().manual_seed(seed)
    norms = _norm_weights(model_dir, n_layers) if model_dir is not None else None
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - l0 / d_sae)))
    coders = {}
    for layer in range(n_layers):
        cfg = CoderConfig(
            kind="transcoder", activation="jumprelu", d_in=d_model, d_out=d_model, d_sae=d_sae, k=None,
            model_name="random", layer=layer,
            hookpoint_in=f"layers.{layer}.mlp.input", hookpoint_out=f"layers.{layer}.mlp.output",
        )
        coder = SparseCoder(cfg)
        spread = norms[layer] / d_model**0.5 if norms is not None else 1.0
        with torch.no_grad():
            w = torch.randn(d_sae, d_model, generator=g)
            coder.W_enc.copy_(w / w.norm(dim=1, keepdim=True))
            d = torch.randn(d_sae, d_model, generator=g)
            coder.W_dec.copy_(0.1 * d / d.norm(dim=1, keepdim=True))
            coder.b_enc.zero_()
            coder.b_dec.zero_()
            coder.threshold.fill_(z * spread)
        coders[layer] = coder
    return coders


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", type=Path, help="run folder with layers.{i}.mlp/ coders (ours)")
    ap.add_argument("dest", type=Path, help="folder to write config.yaml + layer_{i}.safetensors into")
    ap.add_argument("--random", type=int, metavar="N_LAYERS",
                    help="write random JumpReLU transcoders for N_LAYERS layers instead")
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--random-l0", type=float, default=32.0, help="target features per token of --random")
    ap.add_argument("--model", type=Path, help="model folder (safetensors) to scale --random thresholds by")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--allow-topk", action="store_true",
                    help="write TopK coders as `activation: topk` (circuit-tracer >= 0.5 only; its TopK has no ReLU, "
                         "so it differs from ours on tokens with fewer than k positive pre-activations)")
    ap.add_argument("--absolute-paths", action="store_true",
                    help="list absolute file paths in config.yaml "
                         "(circuit-tracer resolves relative ones against its working directory)")
    args = ap.parse_args(argv)

    if args.random is not None:
        if args.source is not None:
            ap.error("--random takes no run folder")
        coders = random_coders(args.random, args.d_model, args.d_sae, l0=args.random_l0, model_dir=args.model, seed=args.seed)
        model_name = "random"
    else:
        if args.source is None:
            ap.error("give a run folder, or --random N_LAYERS")
        coders = run_coders(args.source)
        model_name = None
    args.dest.mkdir(parents=True, exist_ok=True)
    for stale in args.dest.glob("layer_*.safetensors"):
        m = re.match(r"layer_(\d+)\.safetensors$", stale.name)
        if m and int(m.group(1)) not in coders:
            stale.unlink()
    try:
        write_circuit_tracer(coders, args.dest, model_name=model_name, absolute_paths=args.absolute_paths,
                             allow_topk=args.allow_topk)
    except ValueError as exc:
        sys.exit(f"{exc}{' (here: --allow-topk)' if 'allow_topk' in str(exc) else ''}")

    back = read_circuit_tracer(args.dest, allow_topk=args.allow_topk)  # read back: same activation, same thresholds
    acts = sorted({c.cfg.activation for c in back.values()})
    for layer, coder in coders.items():
        if coder.threshold is not None and not torch.equal(back[layer].threshold, coder.threshold.detach().float()):
            sys.exit(f"layer {layer}: threshold did not survive the round trip")
    c0 = coders[0].cfg
    print(f"wrote {len(coders)} transcoders ({c0.kind}, {', '.join(acts)}, d_model {c0.d_in}, d_sae {c0.d_sae}) "
          f"to {args.dest}/config.yaml")


if __name__ == "__main__":
    main()
