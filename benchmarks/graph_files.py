"""Graph files on disk: size and load time of a graph as JSON (``transcoders.graph/1``, with
circuit-tracer's ``nodes``/``links`` view) and as the compact file (``transcoders.graph-compact/1``:
node table and CSR edges in safetensors), and that both hold the same graph.

    .venv/bin/python benchmarks/graph_files.py runs/all/graphs/my-prompt.json [--repeat 3]

Writes the compact copy to a temporary folder (never beside the input) and prints one JSON object:
nodes, edges, bytes of each file, the size ratio, median load seconds of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from transcoders.circuits.export import load_graph, save_graph


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("graph", type=Path, help="a graph JSON file written by `transcoders trace`")
    ap.add_argument("--repeat", type=int, default=3, help="loads of each file (the median is printed)")
    args = ap.parse_args()
    t_json, g = timed(lambda: load_graph(args.graph), args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        compact = Path(tmp) / "graph.safetensors"
        t0 = time.perf_counter()
        save_graph(g, compact)
        t_save = time.perf_counter() - t0
        t_compact, h = timed(lambda: load_graph(compact), args.repeat)
        same = (g.n_edges == h.n_edges and torch.equal(g.edge_weight.sort().values, h.edge_weight.sort().values)
                and torch.equal(g.kind, h.kind))
        size_json, size_compact = args.graph.stat().st_size, compact.stat().st_size
    print(json.dumps({"graph": str(args.graph), "nodes": g.n_nodes, "edges": g.n_edges, "json_bytes": size_json,
                      "compact_bytes": size_compact, "size_ratio": round(size_json / size_compact, 2),
                      "json_load_s": round(t_json, 4), "compact_load_s": round(t_compact, 4),
                      "load_ratio": round(t_json / t_compact, 1), "compact_save_s": round(t_save, 3),
                      "same_graph": bool(same)}, indent=1))


if __name__ == "__main__":
    main()
