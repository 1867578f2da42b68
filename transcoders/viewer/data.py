"""The viewer's JSON API payloads, in the shapes of ``docs/viewer.md`` ("JSON API").

Every function takes the :class:`~.registry.Registry` and ids; it raises
:class:`~.registry.NotFound` (404) for an unknown id or feature, :class:`~.registry.BadRequest`
(400) for a malformed parameter and :class:`~.registry.Conflict` (409) for a file that broke
since the start. Floats may be NaN/inf here; :func:`~.encode.clean` turns them into null.
Graph payloads are cached per file (until it changes).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .registry import BadRequest, NotFound, Registry

MAX_EDGES = 20_000
N_PATHS = 10
NODE_THRESHOLD, EDGE_THRESHOLD = 0.8, 0.98  # `transcoders trace`'s pruning defaults
LAYER_FIELDS = ("l0", "fvu", "ce_loss_recovered", "kl", "dead_in_training", "dead_fraction")
BRIEF_TOP = 5
SEARCH_LIMIT = 50


# ------------------------------------------------------------------------------------------ runs
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _coder_cfgs(run_dir: Path) -> dict:
    """``{CoderKey: cfg dict}`` of a run's coders (empty when it has none or they are unreadable)."""
    from ..coders.io import CONFIG, CoderFileError
    from ..coders.run_folder import find_coders

    try:
        found = find_coders(run_dir)
    except CoderFileError:
        return {}
    return {key: _read_json(folder / CONFIG) or {} for key, folder in found.items()}


def run_model(run_dir: Path) -> str | None:
    """The model a run's coders belong to: its ``train_config.json``, else its coders' own
    config, else its ``metrics.json`` (None when none of them says)."""
    cfg = _read_json(run_dir / "train_config.json")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), str):
        return cfg["model"]
    for cfg in _coder_cfgs(run_dir).values():
        if isinstance(cfg.get("model_name"), str):
            return cfg["model_name"]
    metrics = _read_json(run_dir / "metrics.json")
    return metrics.get("model") if isinstance(metrics, dict) and isinstance(metrics.get("model"), str) else None


def _run_kind(run_dir: Path) -> str | None:
    cfg = _read_json(run_dir / "train_config.json")
    if isinstance(cfg, dict) and isinstance(cfg.get("kind"), str):
        return cfg["kind"]
    return next((c["kind"] for c in _coder_cfgs(run_dir).values() if isinstance(c.get("kind"), str)), None)


def _graphs_of(reg: Registry, run_id: str) -> list[str]:
    out = []
    for g in reg.graph_entries():
        try:
            if reg.graph_run(g.id) == run_id:
                out.append(g.id)
        except ValueError:  # gone or broken since the start: left out, as in the index
            continue
    return out


def index(reg: Registry) -> dict:
    """``GET /api/index``: ``{"runs": [...], "graphs": [...]}``."""
    graphs = []
    for g in reg.graph_entries():
        try:
            s = reg.summary(g.id)
        except ValueError:  # gone or broken since the start: leave it out of the list
            continue
        graphs.append({"id": g.id, **s})
    runs = []
    for r in list(reg.runs.values()):
        runs.append({"id": r.id, "path": str(r.path), "model": run_model(r.path),
                     "layers": sorted({key.layer for key in _coder_cfgs(r.path)}), "has_features": r.has_features,
                     "n_graphs": sum(1 for g in graphs if g["run"] == r.id)})
    return {"runs": runs, "graphs": graphs}


def run_overview(reg: Registry, run_id: str) -> dict:
    """``GET /api/runs/{run}``: the run's evaluation per coder (from ``metrics.json``; coders
    without one have null metrics), the all-at-once block if any, and its graphs.

    Raises:
        NotFound: unknown run.
    """
    from ..features.store import parse_key

    run = reg.run(run_id)
    metrics = _read_json(run.path / "metrics.json")
    metrics = metrics if isinstance(metrics, dict) else {}
    per_layer = metrics.get("layers") if isinstance(metrics.get("layers"), dict) else None
    layers = []
    if per_layer:
        for key_text, m in per_layer.items():
            try:
                key = parse_key(str(key_text))
            except ValueError:
                continue
            m = m if isinstance(m, dict) else {}
            layers.append({"key": str(key), "layer": key.layer, "variant": key.variant,
                           **{f: m.get(f) for f in LAYER_FIELDS}})
    else:
        for key in _coder_cfgs(run.path):
            layers.append({"key": str(key), "layer": key.layer, "variant": key.variant, **dict.fromkeys(LAYER_FIELDS)})
    together = metrics.get("spliced_together")
    return {"id": run.id, "path": str(run.path), "model": run_model(run.path), "kind": _run_kind(run.path),
            "has_features": run.has_features, "layers": layers,
            "spliced_together": together if isinstance(together, dict) else None,
            "graphs": _graphs_of(reg, run.id)}


# ---------------------------------------------------------------------------------------- graphs
def _floats(t: torch.Tensor) -> list[float]:
    return t.double().tolist()


def _labeller(reg: Registry, graph, run_id: str | None):
    """``label(node)`` from the run's feature store (checked against the graph's per-layer
    fingerprints, as ``transcoders paths`` does); no labels without a served run and store."""
    from ..circuit_cli import graph_labels

    none = lambda _i: None
    if run_id is None or not reg.run(run_id).has_features:
        return none
    return reg.with_store(run_id, lambda store: graph_labels(graph, store)[0])


def _pruned_edges(graph) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The edges of ``prune(graph)`` with trace's thresholds, in the file's node indices; all
    edges when the graph cannot be pruned (no usable target weights)."""
    from ..circuits.prune import prune, source_edges

    try:
        return source_edges(prune(graph, node_threshold=NODE_THRESHOLD, edge_threshold=EDGE_THRESHOLD))
    except ValueError:
        return graph.edge_src, graph.edge_dst, graph.edge_weight


def _top_by_weight(src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor, cap: int):
    if w.numel() > cap:
        keep = w.double().abs().argsort(descending=True, stable=True)[:cap]
        return src[keep], dst[keep], w[keep]
    return src, dst, w


def _influence(graph) -> torch.Tensor | None:
    """The file's node influence, else :func:`~transcoders.circuits.prune.node_influence`
    (None when the graph has no usable target weights)."""
    from ..circuits.prune import node_influence

    if graph.influence is not None:
        return graph.influence.double()
    try:
        return node_influence(graph).double()
    except ValueError:
        return None


def graph_payload(reg: Registry, graph_id: str) -> dict:
    """``GET /api/graphs/{graph}``: every node of the file, the pruned graph's edges (at most
    :data:`MAX_EDGES`, by |weight|), targets and the top :data:`N_PATHS` paths (cached per file).

    Raises:
        NotFound: unknown graph. Conflict: the file broke.
    """
    return reg.cached(graph_id, "payload", lambda: _graph_payload(reg, graph_id))


def _graph_payload(reg: Registry, graph_id: str) -> dict:
    from ..circuits.export import cumulative_scores
    from ..circuits.graph import KINDS, TARGET
    from ..circuits.paths import format_path, node_name, top_paths

    graph = reg.load_graph(graph_id)
    summary = reg.summary(graph_id)
    run_id = summary["run"]
    label = _labeller(reg, graph, run_id)
    infl = _influence(graph)
    cum = (cumulative_scores(infl.nan_to_num(0.0)) if infl is not None
           else torch.ones(graph.n_nodes, dtype=torch.float64))
    cum[graph.kind == TARGET] = 0.0
    src, dst, w = _top_by_weight(*_pruned_edges(graph), MAX_EDGES)

    kind, layer, pos, feat = (graph.kind.tolist(), graph.layer.tolist(), graph.pos.tolist(), graph.feature.tolist())
    act, value, cum_l = _floats(graph.activation), _floats(graph.value), cum.tolist()
    infl_l = infl.tolist() if infl is not None else [None] * graph.n_nodes
    nodes = [{"i": i, "kind": KINDS[kind[i]], "layer": layer[i], "pos": pos[i], "feature": feat[i],
              "activation": act[i], "value": value[i], "influence": infl_l[i], "cum": cum_l[i],
              "name": node_name(graph, i), "label": label(i)} for i in range(graph.n_nodes)]
    named = lambda i: node_name(graph, i) + (f" [{label(i)}]" if label(i) else "")
    try:
        found = top_paths(graph, n=N_PATHS)
    except ValueError:  # no usable target (e.g. zero weights): no paths
        found = []
    targets = [{"node": int(n), "label": t.label or node_name(graph, int(n)), "weight": float(t.weight)}
               for t, n in zip(graph.targets, graph.target_nodes.tolist())]
    return {
        "id": graph_id, "name": summary["name"], "prompt": summary["prompt"], "tokens": list(graph.token_strs),
        "n_layers": graph.n_layers, "run": run_id, "scores": graph.meta.get("scores") or None,
        "nodes": nodes,
        "edges": {"src": src.tolist(), "dst": dst.tolist(), "weight": _floats(w)},
        "n_edges_total": graph.n_edges,
        "targets": targets,
        "paths": [{"nodes": [int(i) for i in p.nodes], "weight": float(p.weight), "text": format_path(graph, p, names=named)}
                  for p in found],
    }


def parse_int(value: str | None, name: str, *, default: int | None = None, lo: int = 0, hi: int | None = None) -> int:
    """A query/path parameter as an int in ``[lo, hi]``.

    Raises:
        BadRequest: missing (without default), not an integer, or out of range.
    """
    if value is None or value == "":
        if default is None:
            raise BadRequest(f"'{name}' is required: an integer")
        return default
    try:
        n = int(value)
    except ValueError:
        raise BadRequest(f"'{name}' must be an integer, got {value!r}") from None
    if n < lo or (hi is not None and n > hi):
        raise BadRequest(f"'{name}' must be in {lo}..{'' if hi is None else hi}, got {n}")
    return n


def edges_page(reg: Registry, graph_id: str, offset: int = 0, limit: int | None = None) -> bytes:
    """``GET /api/graphs/{graph}/edges.bin``: edges ``[offset, offset + limit)`` of the file
    (all of them by default), little-endian ``uint32 total, uint32 offset, uint32 n,
    int32 src[n], int32 dst[n], float32 weight[n]``.

    Raises:
        BadRequest: ``offset`` past the last edge. NotFound: unknown graph.
    """
    graph = reg.load_graph(graph_id)
    total = graph.n_edges
    if offset > total:
        raise BadRequest(f"'offset' {offset} is past the graph's {total} edges")
    end = total if limit is None else min(total, offset + limit)
    src = graph.edge_src[offset:end].numpy().astype("<i4")
    dst = graph.edge_dst[offset:end].numpy().astype("<i4")
    w = graph.edge_weight[offset:end].double().numpy().astype("<f4")
    return struct.pack("<III", total, offset, end - offset) + src.tobytes() + dst.tobytes() + w.tobytes()


def decode_edges(data: bytes) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of :func:`edges_page`: ``(total, offset, src, dst, weight)``."""
    total, offset, n = struct.unpack_from("<III", data, 0)
    src = np.frombuffer(data, "<i4", n, 12)
    dst = np.frombuffer(data, "<i4", n, 12 + 4 * n)
    w = np.frombuffer(data, "<f4", n, 12 + 8 * n)
    return total, offset, src, dst, w


def graph_node(reg: Registry, graph_id: str, value: str | None, name: str) -> int:
    """A node index parameter of a graph (``src``/``dst``). Raises BadRequest when out of range."""
    graph = reg.load_graph(graph_id)
    return parse_int(value, name, hi=graph.n_nodes - 1)


# -------------------------------------------------------------------------------------- features
def _example(e) -> dict:
    return {"tokens": list(e.tokens), "acts": [float(a) for a in e.acts], "center": int(e.center)}


def _explanations(store, key, index: int) -> list[dict]:
    from ..features.interpret import LABEL_EXPLAINER, read_explanations

    out = []
    for r in read_explanations(store, key):
        if r.get("index") != index:
            continue
        explainer = r.get("explainer")
        out.append({"text": str(r.get("text", "")), "scores": r.get("scores") or {},
                    "model": None if explainer in (None, LABEL_EXPLAINER) else str(explainer), "judge": r.get("judge")})
    return out


def _record(reg: Registry, run_id: str, layer: int, index: int, variant: str, examples=("top", "sample")):
    from ..features.store import FeatureStoreError

    def read(store):
        try:
            return store.feature(layer, index, variant, examples=examples)
        except FeatureStoreError as exc:
            raise NotFound(str(exc)) from None

    return reg.with_store(run_id, read)


def feature_payload(reg: Registry, run_id: str, layer: int, index: int, variant: str = "") -> dict:
    """``GET /api/features/{run}/{layer}/{index}``: the :class:`~transcoders.features.store.FeatureRecord`
    of the feature with its explanations.

    Raises:
        NotFound: unknown run, no store, no such layer/variant in it, or index out of range.
    """
    from ..coders.run_folder import CoderKey

    rec = _record(reg, run_id, layer, index, variant)
    explanations = reg.with_store(run_id, lambda s: _explanations(s, CoderKey(layer, variant), index))
    return {
        "run": run_id, "layer": layer, "index": index, "variant": variant, "label": rec.label,
        "n_tokens": rec.n_tokens, "count": rec.count, "frequency": rec.frequency, "mean": rec.mean, "max": rec.max,
        "hist": {"counts": list(rec.hist), "edges": list(rec.hist_edges)},
        "top": [_example(e) for e in rec.top],
        "quantile_groups": [[_example(e) for e in g] for g in rec.quantile_groups()],
        "logit_top": [[t, float(v)] for t, v in rec.logit_top],
        "logit_bottom": [[t, float(v)] for t, v in rec.logit_bottom],
        "deembedding": [[t, float(v)] for t, v in rec.deembedding],
        "pullback": [[int(f), float(v)] for f, v in rec.pullback],
        "ov_heads": [[int(a), int(h), float(v)] for a, h, v in rec.ov_heads],
        "neighbours": [[int(f), float(v)] for f, v in rec.neighbours],
        "cooccurring": [[int(f), float(j), int(n)] for f, j, n in rec.cooccurring],
        "explanations": explanations,
    }


def feature_brief(reg: Registry, run_id: str, layer: int, index: int, variant: str = "") -> dict:
    """``GET /api/features/{run}/{layer}/{index}?brief=1``: the hover card.

    Raises:
        NotFound: as :func:`feature_payload`.
    """
    rec = _record(reg, run_id, layer, index, variant, examples=("top",))
    return {"label": rec.label, "frequency": rec.frequency, "max": rec.max,
            "top_tokens": [e.tokens[e.center] for e in rec.top[:BRIEF_TOP] if 0 <= e.center < len(e.tokens)],
            "logit_top": [t for t, _ in rec.logit_top[:BRIEF_TOP]]}


# ---------------------------------------------------------------------------------------- search
def explanation_score(scores: dict | None) -> float | None:
    """One number per explanation for ranking: the mean of its ``detection`` and ``fuzzing``
    balanced accuracies (those present), None when it has neither."""
    vals = [float(v) for k in ("detection", "fuzzing") if isinstance(v := (scores or {}).get(k), (int, float))
            and v == v]
    return sum(vals) / len(vals) if vals else None


def _search_store(store, run_id: str, needle: str) -> list[dict]:
    from ..features.interpret import read_explanations

    out = []
    for key in store.keys:
        labels = store.labels(key).get("labels", {})
        by_index: dict[int, list[tuple[float | None, str]]] = {}
        for r in read_explanations(store, key):
            if isinstance(r.get("index"), int) and isinstance(r.get("text"), str):
                by_index.setdefault(r["index"], []).append((explanation_score(r.get("scores")), r["text"]))
        for index in sorted({int(i) for i in labels} | set(by_index)):
            label = labels.get(str(index))
            expl = sorted(by_index.get(index, []), key=lambda st: -(st[0] if st[0] is not None else -1.0))
            hits = [st for st in expl if needle in st[1].lower()]
            if not hits and not (label and needle in label.lower()):
                continue
            best = (hits or expl or [(None, None)])[0]
            out.append({"run": run_id, "layer": key.layer, "index": index, "variant": key.variant, "label": label,
                        "explanation": best[1], "score": best[0]})
    return out


def search(reg: Registry, q: str | None, run: str | None = None, limit: int = SEARCH_LIMIT) -> dict:
    """``GET /api/search``: features whose label or an explanation contains ``q`` (any case),
    best explanation score (:func:`explanation_score`) first, then by run, layer, index.

    Raises:
        BadRequest: empty ``q``. NotFound: unknown ``run``.
    """
    if not q or not q.strip():
        raise BadRequest("'q' is required: the text to look for in labels and explanations")
    needle = q.strip().lower()
    runs = [reg.run(run)] if run else list(reg.runs.values())
    results = []
    for r in runs:
        if r.has_features:
            results += reg.with_store(r.id, lambda store, rid=r.id: _search_store(store, rid, needle))
    order = {r.id: i for i, r in enumerate(runs)}
    results.sort(key=lambda x: (x["score"] is None, -(x["score"] or 0.0), order[x["run"]], x["layer"], x["variant"],
                                x["index"]))
    return {"results": results[:limit]}
