"""Saving and loading attribution graphs as versioned JSON (``"schema": "transcoders.graph/1"``).

One file serves two readers:

- circuit-tracer's graph frontend and Neuronpedia read the top-level ``metadata``, ``qParams``,
  ``nodes`` and ``links`` (field names as in circuit-tracer's ``frontend/graph_models.py``).
  Embeddings, error nodes, features and targets appear there (every target as a ``"logit"``
  node, the frontend's terminal kind; its clerp carries ``(p=weight)``, which the frontend
  parses); bias nodes and their edges, which circuit-tracer does not have, are left out of
  this view. A node's frontend ``influence`` is circuit-tracer's *cumulative* score (the
  share of total influence held by nodes at least as influential; small = important).
- :func:`load_graph` reads only the ``transcoders`` section: the complete :class:`Graph` as
  columns (node kinds including bias and target nodes, values, consts, dropped, exact edge
  weights, targets with their kinds, meta). Floats are JSON numbers in ``repr`` precision, so
  float64 (and float32) round trips are exact; NaN is stored as ``null`` and infinities as the
  strings ``"inf"`` / ``"-inf"`` so the file stays standard JSON (browsers reject ``NaN``).

Writes are atomic (temporary file in the same folder, fsync, ``os.replace``). No pickle.
"""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from pathlib import Path as FilePath

import torch

from ..files import atomic_write_text
from .graph import BIAS, EMBEDDING, ERROR, FEATURE, KINDS, TARGET, Graph
from .targets import Target

SCHEMA = "transcoders.graph/1"
SCHEMA_FILE = "graph-v1.schema.json"
_VIRTUAL_TOKEN = 1_000_000_000  # frontend `feature` of non-logit targets: _VIRTUAL_TOKEN + target index
_INT_COLUMNS = ("kind", "layer", "pos", "feature")
_FLOAT_COLUMNS = ("activation", "value", "const", "dropped")


class GraphFileError(ValueError):
    """A graph file is missing, not JSON, of another schema version, or inconsistent."""


# ----------------------------------------------------------------------------- float encoding

def _enc(x: float) -> float | str | None:
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _dec(x) -> float:
    if x is None:
        return float("nan")
    if isinstance(x, str):
        if x in ("inf", "-inf"):
            return float(x)
        raise ValueError(f"unexpected string {x!r} in a number column")
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"unexpected value {x!r} in a number column")
    return float(x)


def _floats(t: torch.Tensor) -> list:
    return [_enc(x) for x in t.double().tolist()]


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _clean(obj):
    """Replace non-finite floats anywhere in ``obj`` (meta) by their JSON encoding."""
    if isinstance(obj, float):
        return _enc(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- our section

def _target_to_json(t: Target) -> dict:
    d = {"kind": str(t.kind), "label": str(t.label)}
    d |= {k: None if getattr(t, k) is None else int(getattr(t, k)) for k in ("pos", "token", "token_b", "layer", "feature")}
    d["weight"] = _enc(float(t.weight))
    d["centered"] = bool(t.centered)
    if t.tokens is not None:  # logit_group (files without these fields are the older kinds)
        d["tokens"] = [int(x) for x in t.tokens]
        d["coefs"] = [_enc(float(x)) for x in (t.coefs or ())]
    if t.direction is not None:
        d["direction"] = _floats(t.direction.flatten())
        d["direction_dtype"] = _dtype_name(t.direction)
    else:
        d["direction"] = None
    return d


def _target_from_json(d: dict) -> Target:
    direction = None
    if d.get("direction") is not None:
        dtype = getattr(torch, d.get("direction_dtype", "float64"))
        direction = torch.tensor([_dec(x) for x in d["direction"]], dtype=dtype)
    return Target(kind=d["kind"], pos=d["pos"], token=d.get("token"), token_b=d.get("token_b"), layer=d.get("layer"),
                  feature=d.get("feature"), direction=direction, label=d.get("label", ""), weight=_dec(d["weight"]),
                  centered=bool(d.get("centered", False)),
                  tokens=None if d.get("tokens") is None else [int(x) for x in d["tokens"]],
                  coefs=None if d.get("coefs") is None else [_dec(x) for x in d["coefs"]])


def _transcoders_section(graph: Graph) -> dict:
    sec = {
        "n_layers": graph.n_layers,
        "tokens": [int(t) for t in graph.tokens],
        "token_strs": list(graph.token_strs),
        "kinds": list(KINDS),
        "nodes": {
            **{c: [int(x) for x in getattr(graph, c).tolist()] for c in _INT_COLUMNS},
            **{c: _floats(getattr(graph, c)) for c in _FLOAT_COLUMNS},
            "influence": None if graph.influence is None else _floats(graph.influence),
        },
        "edges": {
            "src": [int(x) for x in graph.edge_src.tolist()],
            "dst": [int(x) for x in graph.edge_dst.tolist()],
            "weight": _floats(graph.edge_weight),
        },
        "dtypes": {c: _dtype_name(getattr(graph, c)) for c in _FLOAT_COLUMNS}
        | {"edge_weight": _dtype_name(graph.edge_weight)}
        | ({"influence": _dtype_name(graph.influence)} if graph.influence is not None else {}),
        "targets": [_target_to_json(t) for t in graph.targets],
        "target_nodes": [int(x) for x in graph.target_nodes.tolist()],
        "meta": _clean(json.loads(json.dumps(graph.meta, default=_json_default))),
    }
    return sec


# ----------------------------------------------------------------------------- frontend view

def _cantor(a: int, b: int) -> int:
    return (a + b) * (a + b + 1) // 2 + b


def cumulative_scores(infl: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's frontend ``influence``: for each node, the share of total influence held
    by the nodes ranked at or above it (descending influence; ties keep node order).

    Args:
        infl: ``[N]`` non-negative node influences (no NaN).
    Returns:
        ``[N]`` in ``[0, 1]``, same dtype; small = important. All ones when the total is 0.
    """
    order = infl.argsort(descending=True, stable=True)
    total = float(infl.sum())
    out = torch.ones_like(infl)
    if total > 0:
        out[order] = (infl[order].cumsum(0) / total).clamp(0.0, 1.0)
    return out


def _frontend_view(graph: Graph) -> tuple[list[dict], list[dict]]:
    """circuit-tracer ``nodes`` and ``links`` (bias nodes and their edges left out)."""
    from .prune import _influence

    infl = graph.influence if graph.influence is not None else _safe_influence(graph, _influence)
    cum = cumulative_scores(infl.double().nan_to_num(0.0)).tolist()
    L = graph.n_layers
    t_index = {int(n): i for i, n in enumerate(graph.target_nodes.tolist())}
    ids: list[str | None] = []
    used: set[str] = set()
    nodes = []
    for i in range(graph.n_nodes):
        k, layer, pos, feat = int(graph.kind[i]), int(graph.layer[i]), int(graph.pos[i]), int(graph.feature[i])
        if k == BIAS:
            ids.append(None)
            continue
        node = {"feature": -1, "layer": str(layer), "ctx_idx": pos, "token_prob": 0.0, "is_target_logit": False,
                "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "", "influence": cum[i], "activation": None}
        if k == FEATURE:
            node |= {"node_id": f"{layer}_{feat}_{pos}", "feature": _cantor(layer, feat),
                     "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{feat}-0",
                     "activation": _enc(float(graph.activation[i]))}
        elif k == ERROR:
            node |= {"node_id": f"0_{layer}_{pos}", "feature_type": "mlp reconstruction error",
                     "jsNodeId": f"{layer}_{pos}-0"}
        elif k == EMBEDDING:
            tok = int(graph.tokens[pos])
            node |= {"node_id": f"E_{tok}_{pos}", "feature": pos, "layer": "E", "feature_type": "embedding",
                     "jsNodeId": f"E_{tok}-{pos}"}
        else:
            ti = t_index[i]
            t = graph.targets[ti]
            vocab = int(t.token) if t.kind == "logit" and t.token is not None else _VIRTUAL_TOKEN + ti
            name = t.label or f"{t.kind} target {ti}"
            node |= {"node_id": f"{L + 1}_{vocab}_{pos}", "feature": vocab, "layer": str(L + 1),
                     "feature_type": "logit", "jsNodeId": f"L_{vocab}-{pos}", "token_prob": float(t.weight),
                     "is_target_logit": ti == 0, "clerp": f'Output "{name}" (p={float(t.weight):.3f})'}
        nid = node["node_id"]
        while nid in used:  # e.g. error "0_3_5" vs feature L0 f3 @5; keep ids unique
            nid += "_"
        node["node_id"] = nid
        used.add(nid)
        node["tc_index"] = i
        ids.append(nid)
        nodes.append(node)
    links = []
    for s, d, w in zip(graph.edge_src.tolist(), graph.edge_dst.tolist(), graph.edge_weight.double().tolist()):
        if ids[s] is not None and ids[d] is not None:
            links.append({"source": ids[s], "target": ids[d], "weight": _enc(w)})
    return nodes, links


def _safe_influence(graph: Graph, fn) -> torch.Tensor:
    try:
        return fn(graph)
    except ValueError:  # no usable target weights: rank nothing
        return torch.zeros(graph.n_nodes, dtype=torch.float64)


def graph_to_json(graph: Graph, *, slug: str = "graph", scan: str | None = None, frontend: bool = True) -> dict:
    """The JSON object :func:`save_graph` writes (see the module docstring).

    Args:
        slug: the frontend's graph name.
        scan: the frontend's transcoder set name (default ``meta["scan"]``, else the model name).
        frontend: include the circuit-tracer ``nodes`` / ``links`` view (they can be large).
    """
    pruned = graph.meta.get("pruned") or {}
    nodes, links = _frontend_view(graph) if frontend else ([], [])
    return {
        "schema": SCHEMA,
        "metadata": {
            "slug": slug,
            "scan": scan or str(graph.meta.get("scan") or graph.meta.get("model") or "transcoders"),
            "transcoder_list": [],
            "prompt_tokens": list(graph.token_strs),
            "prompt": "".join(graph.token_strs),
            "node_threshold": pruned.get("node_threshold"),
            "schema_version": 1,
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
        "transcoders": _transcoders_section(graph),
    }


def save_graph(graph: Graph, path: str | os.PathLike, *, slug: str | None = None, scan: str | None = None,
               frontend: bool = True) -> FilePath:
    """Write ``graph`` atomically: as ``transcoders.graph/1`` JSON, or, when ``path`` ends in
    ``.safetensors``, as the compact binary file (:mod:`transcoders.circuits.compact`: node table
    and CSR edges, several times smaller and faster to load; not read by circuit-tracer's frontend).

    The bytes go to a temporary file in the destination folder, are fsynced, then moved over
    ``path`` with ``os.replace``: readers see the old file or the new one, never a torn one.

    Args:
        slug: frontend graph name (default: the file name without ``.json``).
        scan, frontend: see :func:`graph_to_json` (JSON only).

    Returns:
        the path written.
    """
    path = FilePath(path)
    if path.suffix == ".safetensors":
        from .compact import save_compact

        return save_compact(graph, path)
    obj = graph_to_json(graph, slug=slug or path.name.removesuffix(".json"), scan=scan, frontend=frontend)
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    return atomic_write_text(path, text)


def load_graph(path: str | os.PathLike) -> Graph:
    """Read a graph written by :func:`save_graph`, JSON or compact (told apart by content, not
    name; exact round trip).

    Raises:
        GraphFileError: the file is missing, not a graph file, of another schema version, or its
            arrays are inconsistent; the message names the problem and the fix.
    """
    from .compact import is_compact, load_compact

    path = FilePath(path)
    try:
        if is_compact(path):
            return load_compact(path)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GraphFileError(f"no graph file at {path}; check the path, or write one with save_graph()") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GraphFileError(f"cannot read graph file {path}: {exc}; check the path and permissions") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GraphFileError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); the file is truncated "
            "or not a graph file: re-export it with save_graph()") from None
    return graph_from_json(obj, where=str(path))


def graph_from_json(obj, *, where: str = "graph JSON") -> Graph:
    """Rebuild a :class:`Graph` from the object :func:`graph_to_json` made.

    Raises:
        GraphFileError: see :func:`load_graph`.
    """
    if not isinstance(obj, dict) or "schema" not in obj:
        raise GraphFileError(f"{where} has no 'schema' field, so it is not a transcoders graph file; "
                             "write graphs with transcoders.circuits.export.save_graph()")
    if obj["schema"] != SCHEMA:
        raise GraphFileError(f"{where} has schema {obj['schema']!r} but this version reads {SCHEMA!r}; "
                             "re-export the graph with this version's save_graph(), or load it with the "
                             "transcoders version that wrote it")
    try:
        return _rebuild(obj["transcoders"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise GraphFileError(f"{where} is inconsistent: {what}; the file was edited or damaged, re-export it "
                             "with save_graph()") from None


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _rebuild(sec: dict) -> Graph:
    _check(isinstance(sec, dict), "'transcoders' is not an object")
    _check(list(sec.get("kinds", KINDS)) == list(KINDS), f"node kinds {sec.get('kinds')} differ from {list(KINDS)}")
    nodes, edges, dtypes = sec["nodes"], sec["edges"], sec.get("dtypes", {})
    N = len(nodes["kind"])
    for c in (*_INT_COLUMNS, *_FLOAT_COLUMNS):
        _check(isinstance(nodes[c], list) and len(nodes[c]) == N, f"node column {c!r} does not have {N} entries")
    E = len(edges["src"])
    for c in ("dst", "weight"):
        _check(isinstance(edges[c], list) and len(edges[c]) == E, f"edge column {c!r} does not have {E} entries")
    ints = {c: torch.tensor([int(x) for x in nodes[c]], dtype=torch.long) for c in _INT_COLUMNS}
    _check(bool(((ints["kind"] >= 0) & (ints["kind"] < len(KINDS))).all()), "a node kind is out of range")
    floats = {c: torch.tensor([_dec(x) for x in nodes[c]], dtype=getattr(torch, dtypes.get(c, "float64")))
              for c in _FLOAT_COLUMNS}
    src = torch.tensor([int(x) for x in edges["src"]], dtype=torch.long)
    dst = torch.tensor([int(x) for x in edges["dst"]], dtype=torch.long)
    _check(bool(((src >= 0) & (src < N) & (dst >= 0) & (dst < N)).all()), f"an edge endpoint is outside 0..{N - 1}")
    weight = torch.tensor([_dec(x) for x in edges["weight"]], dtype=getattr(torch, dtypes.get("edge_weight", "float64")))
    influence = None
    if nodes.get("influence") is not None:
        _check(len(nodes["influence"]) == N, f"node column 'influence' does not have {N} entries")
        influence = torch.tensor([_dec(x) for x in nodes["influence"]],
                                 dtype=getattr(torch, dtypes.get("influence", "float64")))
    targets = [_target_from_json(t) for t in sec["targets"]]
    tnodes = torch.tensor([int(x) for x in sec["target_nodes"]], dtype=torch.long)
    _check(len(targets) == tnodes.numel(), f"{len(targets)} targets but {tnodes.numel()} target nodes")
    _check(bool(((tnodes >= 0) & (tnodes < N)).all()) and bool((ints["kind"][tnodes] == TARGET).all()),
           "a target node index does not point at a target node")
    tokens, token_strs = [int(t) for t in sec["tokens"]], [str(s) for s in sec["token_strs"]]
    _check(len(tokens) == len(token_strs), f"{len(tokens)} tokens but {len(token_strs)} token strings")
    _check(bool(((ints["pos"] >= 0) & (ints["pos"] < max(len(tokens), 1))).all()) or N == 0,
           f"a node position is outside the {len(tokens)}-token prompt")
    meta = sec.get("meta") or {}
    _check(isinstance(meta, dict), "'meta' is not an object")
    return Graph(
        tokens=tokens, token_strs=token_strs, n_layers=int(sec["n_layers"]),
        kind=ints["kind"], layer=ints["layer"], pos=ints["pos"], feature=ints["feature"],
        activation=floats["activation"], value=floats["value"], const=floats["const"], dropped=floats["dropped"],
        edge_src=src, edge_dst=dst, edge_weight=weight, targets=targets, target_nodes=tnodes,
        influence=influence, meta=meta,
    )


# ----------------------------------------------------------------------------- schema

def graph_schema() -> dict:
    """The JSON Schema (draft 2020-12) of ``transcoders.graph/1`` files, shipped with the package."""
    return json.loads(resources.files("transcoders.circuits").joinpath("schema", SCHEMA_FILE).read_text("utf-8"))


def validate_graph_json(obj) -> None:
    """Validate a graph JSON object against :func:`graph_schema` (needs ``jsonschema``, in the
    ``dev`` extra). Structural only: :func:`graph_from_json` also checks cross-array consistency.

    Raises:
        GraphFileError: the object does not match the schema (message: the first error and its
            location), or ``jsonschema`` is not installed.
    """
    try:
        import jsonschema
    except ImportError:
        raise GraphFileError("validating graph files needs jsonschema: pip install 'transcoders[dev]'") from None
    validator = jsonschema.Draft202012Validator(graph_schema())
    err = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if err is not None:
        loc = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise GraphFileError(f"graph JSON does not match {SCHEMA} at {loc}: {err.message}; "
                             "re-export it with save_graph()")


__all__ = ["SCHEMA", "GraphFileError", "cumulative_scores", "graph_from_json", "graph_schema", "graph_to_json", "load_graph",
           "save_graph", "validate_graph_json"]
