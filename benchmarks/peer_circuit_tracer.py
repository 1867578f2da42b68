"""Peer side of the attribution-graph benchmark: one graph with circuit-tracer.

Runs in circuit-tracer's own venv (``benchmarks/setup_peers.sh`` builds ``../ct-venv``); the
project's package is not installed there and nothing here imports it. circuit-tracer is
github.com/decoderesearch/circuit-tracer (the PyPI package of that name is an unrelated fork).

    ../ct-venv/bin/python benchmarks/peer_circuit_tracer.py \
        --model ../ct-inputs/smollm2 --transcoders ../ct-inputs/transcoders \
        --prompt "Fellow citizens, the state of the Union is strong. Our economy is growing and our people are" \
        --max-feature-nodes 1000 --batch-size 8 --backend transformerlens --out ct_graph.json

Inputs:

- ``--model``: a SmolLM2 (Llama) folder in transformers format. Saved by transformers 5, it
  needs two fixes for circuit-tracer's transformers 4.57 (``setup_peers.sh`` applies them):
  ``tokenizer_class: PreTrainedTokenizerFast`` in tokenizer_config.json and a top-level
  ``rope_theta`` in config.json (4.57 reads only that and would silently use 10000).
- ``--transcoders``: a circuit-tracer transcoder set, ``config.yaml`` + ``layer_{i}.safetensors``
  (``benchmarks/export_ct_transcoders.py`` writes ours that way). Relative paths in the config
  are resolved against its folder here (circuit-tracer itself would use the working directory).

What it does, in order:

1. loads the transcoders with circuit-tracer's own loader (``utils.hf_utils.load_transcoders``,
   lazy decoder as ``ReplacementModel.from_pretrained`` does by default) and checks that each
   layer came back JumpReLU with the file's thresholds (or ReLU when the file has none);
2. builds the ``ReplacementModel``. nnsight backend: ``from_pretrained_and_transcoders`` with the
   local folder, as is. TransformerLens backend: the same call, with two TransformerLens
   look-ups wrapped (not replaced): ``get_official_model_name`` lets an existing local folder
   through (TransformerLens only takes names from its model list), and the config it builds for
   a generic Llama gets ``rotary_base`` from the folder's ``rope_theta`` (it leaves the default
   10000 otherwise). ``n_ctx`` is capped at ``--tl-n-ctx`` (2048, as TransformerLens caps its own
   Llama configs; with SmolLM2's 8192 attribution is several times slower);
3. checks the model: logits on the prompt, tokenized as circuit-tracer tokenizes it
   (``ensure_tokenized``: no special tokens from the tokenizer, then a BOS/PAD prepended unless
   the first token is special), against plain ``transformers.AutoModelForCausalLM`` run in a
   child process (so its memory is not in this process's peak). Aborts when the largest
   difference exceeds 1e-3 of the largest reference logit;
4. times ``circuit_tracer.attribute(prompt, model, max_feature_nodes=..., batch_size=...)``
   (``--repeat`` times; the JSON has each), then ``compute_graph_scores`` separately;
5. writes the JSON (``--out``) and prints a one-line summary.

Memory: ``ru_maxrss`` of this process. The kernel's peak-RSS counter is reset (``echo 5 >
/proc/self/clear_refs``) just before attribution, so ``peak_rss_attribution_mib`` is the peak
while attributing (model and transcoders included, since they stay resident) and
``peak_rss_load_mib`` the peak before it; ``peak_rss_mib`` is the larger. When the reset is not
possible, the attribution peak is the process's lifetime peak (flagged in the JSON).

Times: ``attribution_s`` is wall time of ``attribute`` alone (model and transcoder loading, the
check and the scores excluded); ``total_s`` runs from the start of this script (imports
included) to the JSON write.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

MiB = 1024.0  # ru_maxrss is in KiB on Linux


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MiB


def _rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / MiB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# ---------------------------------------------------------------- reference (child process)
def reference_logits(model_dir: str, ids_file: str, out_file: str) -> None:
    """Plain transformers: logits of ``ids`` (a JSON list), saved with torch.save."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = json.loads(Path(ids_file).read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    torch.save(logits, out_file)


# ---------------------------------------------------------------- loading
def load_transcoder_set(folder: Path, *, lazy_decoder: bool, lazy_encoder: bool):
    """circuit-tracer's loader on a local config.yaml; returns (transcoder set, config dict)."""
    import torch
    import yaml
    from circuit_tracer.utils.hf_utils import load_transcoders

    cfg_path = folder / "config.yaml" if folder.is_dir() else folder
    config = yaml.safe_load(cfg_path.read_text())
    if config.get("model_kind") != "transcoder_set":
        sys.exit(f"{cfg_path}: model_kind {config.get('model_kind')!r}; this benchmark takes per-layer transcoder sets")
    if "transcoders" not in config:
        n = len(list(cfg_path.parent.glob("layer_*.safetensors")))
        config["transcoders"] = [f"layer_{i}.safetensors" for i in range(n)]
    config["transcoders"] = [
        p if p.startswith("hf://") or os.path.isabs(p) else str((cfg_path.parent / p).resolve()) for p in config["transcoders"]
    ]
    config.setdefault("scan", f"local:{cfg_path.parent.resolve()}")
    transcoders = load_transcoders(config, torch.device("cpu"), torch.float32, lazy_encoder, lazy_decoder)
    return transcoders, config


def check_activations(transcoders, config: dict) -> dict:
    """Each layer's activation function against its file: JumpReLU with the file's threshold
    when the file has ``activation_function.threshold``, else ReLU."""
    import torch
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from safetensors import safe_open

    kinds, bad = [], []
    for layer, path in enumerate(config["transcoders"]):
        tc = transcoders.transcoders[layer]
        with safe_open(path, framework="pt") as f:
            has_thr = "activation_function.threshold" in f.keys()
            thr = f.get_tensor("activation_function.threshold").float() if has_thr else None
        act = tc.activation_function
        if isinstance(act, JumpReLU):
            kinds.append("jumprelu")
            if thr is None or not torch.equal(act.threshold.detach().float().cpu(), thr):
                bad.append(layer)
        else:
            kinds.append(getattr(act, "__name__", type(act).__name__))
            if has_thr:
                bad.append(layer)
    if bad:
        sys.exit(f"transcoder thresholds did not load as in the files for layers {bad} (activations: {kinds})")
    return {"activations": sorted(set(kinds)), "thresholds_loaded": all(k == "jumprelu" for k in kinds), "n_layers": len(kinds),
            "d_sae": int(transcoders.transcoders[0].b_enc.shape[0]), "d_model": int(transcoders.transcoders[0].b_dec.shape[0])}


def _patch_transformerlens_for_local(model_dir: Path) -> float:
    """Let TransformerLens take a local Llama folder: wrap its model-name look-up (pass an
    existing folder through) and its config builder (set rotary_base from the folder's
    rope_theta). Returns the rope_theta used."""
    import transformer_lens.loading_from_pretrained as loading

    hf_cfg = json.loads((model_dir / "config.json").read_text())
    theta = hf_cfg.get("rope_theta") or (hf_cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is None:
        sys.exit(f"{model_dir}/config.json has no rope_theta")
    local = str(model_dir)
    orig_name, orig_cfg = loading.get_official_model_name, loading.get_pretrained_model_config

    def get_official_model_name(name: str) -> str:
        return name if name == local else orig_name(name)

    def get_pretrained_model_config(name, *args, **kwargs):
        cfg = orig_cfg(name, *args, **kwargs)
        if name == local and cfg.positional_embedding_type == "rotary":
            cfg.rotary_base = float(theta)
        return cfg

    loading.get_official_model_name = get_official_model_name
    loading.get_pretrained_model_config = get_pretrained_model_config
    return float(theta)


def load_replacement_model(model_dir: Path, transcoders, backend: str, tl_n_ctx: int | None = None):
    import torch
    from circuit_tracer import ReplacementModel

    device = torch.device("cpu")
    if backend == "nnsight":
        model = ReplacementModel.from_pretrained_and_transcoders(
            str(model_dir), transcoders, backend="nnsight", device=device, dtype=torch.float32
        )
        return model, None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    theta = _patch_transformerlens_for_local(model_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    extra = {"n_ctx": tl_n_ctx} if tl_n_ctx else {}
    model = ReplacementModel.from_pretrained_and_transcoders(
        str(model_dir), transcoders, backend="transformerlens", device=device, dtype=torch.float32,
        hf_model=hf_model, tokenizer=tokenizer, **extra,
    )
    del hf_model
    if abs(float(model.cfg.rotary_base) - theta) > 1e-6:
        sys.exit(f"TransformerLens model has rotary_base {model.cfg.rotary_base}, config.json says {theta}")
    return model, theta


def check_logits(model, model_dir: Path, ids: list[int], tol: float) -> dict:
    """Logits of the ReplacementModel (its plain forward, ``get_activations``) vs plain
    transformers in a child process."""
    import gc

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out_file = os.path.join(tmp, "ids.json"), os.path.join(tmp, "ref.pt")
        Path(ids_file).write_text(json.dumps(ids))
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--reference-logits", str(model_dir), ids_file, out_file], check=True
        )
        ref = torch.load(out_file)
    logits, acts = model.get_activations(torch.tensor(ids))
    logits = logits.detach().float().reshape(-1, ref.shape[-1])
    diff = (logits - ref).abs().max().item()
    scale = ref.abs().max().item()
    top_ours, top_ref = int(logits[-1].argmax()), int(ref[-1].argmax())
    l0 = None
    try:
        dense = acts.to_dense() if acts.is_sparse else acts
        l0 = (dense[:, 1:] != 0).sum(-1).float().mean(-1).tolist()  # per layer, position 0 (BOS) left out
    except Exception:
        pass
    del acts
    gc.collect()
    out = {"max_abs_diff": diff, "max_abs_ref": scale, "rel_diff": diff / scale, "tolerance_rel": tol,
           "same_top1": top_ours == top_ref, "top1_token_id": top_ref, "l0_per_layer": l0}
    print(f"logit check vs transformers: max |diff| {diff:.3g} (largest |logit| {scale:.3g}, relative {diff / scale:.3g}); "
          f"top-1 {'agrees' if top_ours == top_ref else 'DIFFERS'}")
    if not diff <= tol * scale:
        sys.exit(f"logits differ from transformers by {diff:.3g} (> {tol:g} x {scale:.3g}): "
                 "the model did not load right; not timing it")
    return out


# ---------------------------------------------------------------- graph summary
def describe_graph(graph, tokenizer, top_edges: int) -> dict:
    import torch

    A = graph.adjacency_matrix
    n_nodes = A.shape[0]
    n_pos = len(graph.input_tokens)
    n_layers = graph.cfg.n_layers
    n_logits = len(graph.logit_targets)
    n_feat = len(graph.selected_features)
    err0, tok0, logit0 = n_feat, n_feat + n_layers * n_pos, n_feat + (n_layers + 1) * n_pos
    assert logit0 + n_logits == n_nodes, (logit0, n_logits, n_nodes)
    tokens = [tokenizer.decode([int(t)]) for t in graph.input_tokens]

    def node(i: int) -> dict:
        if i < err0:
            af = int(graph.selected_features[i])
            layer, pos, feat = (int(v) for v in graph.active_features[af])
            return {"type": "feature", "layer": layer, "pos": pos, "feature": feat, "token": tokens[pos],
                    "activation": float(graph.activation_values[af])}
        if i < tok0:
            layer, pos = divmod(i - err0, n_pos)
            return {"type": "error", "layer": layer, "pos": pos, "token": tokens[pos]}
        if i < logit0:
            pos = i - tok0
            return {"type": "token", "pos": pos, "token": tokens[pos], "token_id": int(graph.input_tokens[pos])}
        t = graph.logit_targets[i - logit0]
        return {"type": "logit", "token": t.token_str, "token_id": int(t.vocab_idx),
                "prob": float(graph.logit_probabilities[i - logit0])}

    row = A[logit0]  # the top logit target (targets are in probability order)
    order = torch.argsort(row.abs(), descending=True)[:top_edges]
    edges = [{"source": node(int(j)), "weight": float(row[j])} for j in order if row[j] != 0]
    return {
        "n_nodes": int(n_nodes),
        "n_edges_nonzero": int(torch.count_nonzero(A)),
        "n_feature_nodes": n_feat,
        "n_error_nodes": n_layers * n_pos,
        "n_token_nodes": n_pos,
        "n_logit_nodes": n_logits,
        "n_active_features": int(graph.active_features.shape[0]),
        "adjacency_shape": list(A.shape),
        "adjacency_dtype": str(A.dtype),
        "logit_targets": [
            {"token": t.token_str, "token_id": int(t.vocab_idx), "prob": float(p)}
            for t, p in zip(graph.logit_targets, graph.logit_probabilities)
        ],
        "top_logit": node(logit0),
        "top_edges_into_top_logit": edges,
    }


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--reference-logits":
        reference_logits(*argv[1:4])
        return

    ap = argparse.ArgumentParser(description="One circuit-tracer attribution graph: time, memory, graph summary.")
    ap.add_argument("--model", type=Path, required=True, help="model folder (transformers format, with the 4.57 fixes)")
    ap.add_argument("--transcoders", type=Path, required=True,
                    help="circuit-tracer transcoder set folder (config.yaml + layer_{i}.safetensors)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-feature-nodes", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8, help="source nodes per backward pass (small is fastest on CPU)")
    ap.add_argument("--backend", choices=["transformerlens", "nnsight"], default="transformerlens")
    ap.add_argument("--max-n-logits", type=int, default=10, help="circuit-tracer's default")
    ap.add_argument("--desired-logit-prob", type=float, default=0.95, help="circuit-tracer's default")
    ap.add_argument("--tl-n-ctx", type=int, default=2048,
                    help="TransformerLens backend: context length of the HookedTransformer (its n_ctx; 0 = the model's "
                         "max_position_embeddings, 8192 for SmolLM2). TransformerLens caps its own Llama configs at 2048; "
                         "8192 makes attribution several times slower and loading take ~6 GiB (n_ctx x n_ctx masks per layer)")
    ap.add_argument("--eager-decoder", action="store_true",
                    help="load W_dec into memory (circuit-tracer's from_pretrained reads it lazily from the files by default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--repeat", type=int, default=1, help="build the graph this many times; attribution_s is the fastest")
    ap.add_argument("--top-edges", type=int, default=20)
    ap.add_argument("--tolerance", type=float, default=1e-3,
                    help="largest logit difference allowed, relative to the largest logit")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--graph-pt", type=Path, default=None, help="also save circuit-tracer's Graph (Graph.to_pt)")
    ap.add_argument("--verbose", action="store_true", help="circuit-tracer's phase log and progress bar")
    args = ap.parse_args(argv)

    import importlib.metadata as md

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import circuit_tracer
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores

    model_dir = args.model.resolve()
    t_imports = time.perf_counter() - T_START

    t0 = time.perf_counter()
    transcoders, tc_config = load_transcoder_set(
        args.transcoders.resolve(), lazy_decoder=not args.eager_decoder, lazy_encoder=False
    )
    tc_info = check_activations(transcoders, tc_config)
    t_transcoders = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.backend == "transformerlens" and args.tl_n_ctx and args.tl_n_ctx < 1:
        ap.error("--tl-n-ctx must be positive (or 0 for the model's own)")
    model, rope_theta = load_replacement_model(model_dir, transcoders, args.backend, args.tl_n_ctx or None)
    t_model = time.perf_counter() - t0

    raw_ids = model.tokenizer(args.prompt, add_special_tokens=False).input_ids
    ids = [int(t) for t in model.ensure_tokenized(args.prompt).tolist()]
    prepended = ids[1:] == list(raw_ids) and len(ids) == len(raw_ids) + 1
    bos = {"prompt_tokens": len(raw_ids), "graph_positions": len(ids), "prepended_token_id": ids[0] if prepended else None,
           "prepended_token": model.tokenizer.decode([ids[0]]) if prepended else None,
           "tokenizer_adds_bos": model.tokenizer(args.prompt).input_ids[:1] != list(raw_ids[:1])}
    print(f"prompt: {len(raw_ids)} tokens; circuit-tracer attributes {len(ids)} positions"
          + (f" ({bos['prepended_token']!r}, id {ids[0]}, prepended; features at that position are zeroed)" if prepended else ""))

    t0 = time.perf_counter()
    check = check_logits(model, model_dir, ids, args.tolerance)
    t_check = time.perf_counter() - t0

    peak_load = _maxrss_mib()
    runs = []
    graph = None
    reset_ok = True
    for r in range(args.repeat):
        del graph
        graph = None
        rss_before = _rss_mib()
        reset_ok = _reset_peak_rss() and reset_ok
        load = _loadavg()
        t0 = time.perf_counter()
        graph = attribute(args.prompt, model, max_n_logits=args.max_n_logits, desired_logit_prob=args.desired_logit_prob,
                          batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes, verbose=args.verbose)
        dt = time.perf_counter() - t0
        runs.append({"attribution_s": dt, "peak_rss_mib": _maxrss_mib(), "rss_before_mib": rss_before, "loadavg_before": load})
        print(f"run {r + 1}/{args.repeat}: attribution {dt:.2f} s, peak RSS {runs[-1]['peak_rss_mib']:.0f} MiB")
    best = min(runs, key=lambda x: x["attribution_s"])
    peak_attr = max(x["peak_rss_mib"] for x in runs)

    t0 = time.perf_counter()
    replacement, completeness = compute_graph_scores(graph)
    t_scores = time.perf_counter() - t0
    summary = describe_graph(graph, model.tokenizer, args.top_edges)
    if args.graph_pt:
        graph.to_pt(str(args.graph_pt))

    result = {
        "tool": "circuit-tracer",
        "versions": {p: md.version(p) for p in ("circuit-tracer", "torch", "transformers", "nnsight", "transformer-lens")},
        "circuit_tracer_path": str(Path(circuit_tracer.__file__).parent),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "backend": args.backend,
        "model": str(model_dir),
        "rope_theta_set": rope_theta,
        "tl_n_ctx": int(model.cfg.n_ctx) if args.backend == "transformerlens" else None,
        "transcoders": str(args.transcoders.resolve()),
        "transcoder_info": tc_info,
        "lazy_decoder": not args.eager_decoder,
        "prompt": args.prompt,
        "tokens": bos,
        "input_tokens": ids,
        "max_feature_nodes": args.max_feature_nodes,
        "batch_size": args.batch_size,
        "max_n_logits": args.max_n_logits,
        "desired_logit_prob": args.desired_logit_prob,
        "logit_check": check,
        "attribution_s": best["attribution_s"],
        "attribution_runs": runs,
        "imports_s": t_imports,
        "load_transcoders_s": t_transcoders,
        "load_model_s": t_model,
        "logit_check_s": t_check,
        "graph_scores_s": t_scores,
        "peak_rss_load_mib": peak_load,
        "peak_rss_attribution_mib": peak_attr,
        "peak_rss_reset_before_attribution": reset_ok,
        "peak_rss_mib": max(peak_load, peak_attr),
        "replacement_score": replacement,
        "completeness_score": completeness,
        **summary,
    }
    result["total_s"] = time.perf_counter() - T_START
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    top = summary["top_logit"]
    print(
        f"circuit-tracer[{args.backend}] {len(ids)} pos, {summary['n_active_features']} active features, "
        f"{summary['n_feature_nodes']} feature nodes, batch {args.batch_size}: attribution {best['attribution_s']:.2f} s, "
        f"total {result['total_s']:.1f} s, peak RSS {peak_attr:.0f} MiB (attr) / {result['peak_rss_mib']:.0f} MiB (process); "
        f"graph {summary['n_nodes']} nodes, {summary['n_edges_nonzero']} nonzero edges; "
        f"top logit {top['token']!r} p={top['prob']:.3f}; "
        f"replacement {replacement:.3f}, completeness {completeness:.3f} -> {args.out}"
    )


if __name__ == "__main__":
    main()
