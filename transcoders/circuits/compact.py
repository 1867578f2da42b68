"""The compact graph file: ``transcoders.graph-compact/1``, one safetensors file.

A graph of a 20-token prompt holds about a million edges; as JSON (``transcoders.graph/1``, with
circuit-tracer's ``nodes``/``links`` view) that is 100+ MB of text that takes seconds to parse.
The compact file stores the same graph as binary columns:

- the node table: ``kind`` (int8), ``layer``, ``pos``, ``feature`` (int32), ``activation``,
  ``value``, ``const``, ``dropped`` and, when computed, ``influence`` (in the graph's dtypes);
- the edges in compressed sparse row form by destination (the row that receives them):
  ``edge_indptr [N + 1]`` (int64), ``edge_src [E]`` (int32) and ``edge_weight [E]`` (the graph's
  dtype); the edges into node ``r`` are ``edge_indptr[r]:edge_indptr[r + 1]``;
- ``tokens`` and ``target_nodes`` (int64);
- everything else (token strings, targets, ``meta``, the layer count, the dtypes) as JSON in the
  safetensors header's ``graph`` entry, beside ``schema``.

Loading reads the columns and expands ``edge_indptr`` into destinations; nothing is unpickled
or executed. The round trip is exact; edges come back grouped by destination in node
order (within a row, in the order they were saved). JSON stays the format for pruned graphs and
circuit-tracer's frontend (:func:`~transcoders.circuits.export.save_graph`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..files import atomic_save_tensors
from .export import GraphFileError, _target_from_json, _target_to_json
from .graph import KINDS, TARGET, Graph

COMPACT_SCHEMA = "transcoders.graph-compact/1"
COMPACT_SUFFIX = ".safetensors"
_FLOATS = ("activation", "value", "const", "dropped")


class CompactGraphError(GraphFileError):
    """A compact graph file is damaged or of another schema."""


def to_tensors(graph: Graph) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, header metadata)`` of the compact file (module docstring)."""
    N = graph.n_nodes
    order = torch.argsort(graph.edge_dst, stable=True)
    counts = torch.bincount(graph.edge_dst, minlength=N)
    indptr = torch.zeros(N + 1, dtype=torch.long)
    indptr[1:] = torch.cumsum(counts, 0)
    t = {"kind": graph.kind.to(torch.int8), "layer": graph.layer.to(torch.int32), "pos": graph.pos.to(torch.int32),
         "feature": graph.feature.to(torch.int32), "edge_indptr": indptr,
         "edge_src": graph.edge_src[order].to(torch.int32), "edge_weight": graph.edge_weight[order],
         "tokens": torch.tensor(graph.tokens, dtype=torch.long), "target_nodes": graph.target_nodes.to(torch.long)}
    for c in _FLOATS:
        t[c] = getattr(graph, c)
    if graph.influence is not None:
        t["influence"] = graph.influence
    header = {"kinds": list(KINDS), "n_layers": graph.n_layers, "token_strs": list(graph.token_strs),
              "targets": [_target_to_json(x) for x in graph.targets], "meta": graph.meta}
    return t, {"schema": COMPACT_SCHEMA, "graph": json.dumps(header, allow_nan=False, default=_jsonable)}


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def save_compact(graph: Graph, path: str | os.PathLike) -> Path:
    """Write ``graph`` as a compact file, atomically (temporary file, fsync, rename).

    Returns:
        the path written.
    """
    tensors, meta = to_tensors(graph)
    return atomic_save_tensors(tensors, path, metadata=meta)


def is_compact(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a safetensors file (an 8-byte header length, then ``{``),
    not JSON text."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0


def compact_summary(path: str | os.PathLike) -> dict:
    """``{"schema", "header", "n_nodes", "n_edges"}`` of a compact file from its header alone
    (no column is read).

    Raises:
        CompactGraphError: not a readable safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            n_nodes = f.get_slice("kind").get_shape()[0] if "kind" in f.keys() else 0
            n_edges = f.get_slice("edge_src").get_shape()[0] if "edge_src" in f.keys() else 0
        header = json.loads(meta.get("graph", "{}"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CompactGraphError(f"{path} is not a readable compact graph file ({exc})") from None
    return {"schema": meta.get("schema"), "header": header, "n_nodes": int(n_nodes), "n_edges": int(n_edges)}


def load_compact(path: str | os.PathLike) -> Graph:
    """Read a compact graph file.

    Raises:
        CompactGraphError: not a safetensors file, another schema, or inconsistent columns; the
            message names the problem and the fix.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CompactGraphError(f"{path} is not a readable compact graph file ({exc}); re-export it with "
                                "save_graph(graph, 'g.safetensors')") from None
    if meta.get("schema") != COMPACT_SCHEMA:
        raise CompactGraphError(f"{path} has schema {meta.get('schema')!r} but this version reads {COMPACT_SCHEMA!r}; "
                                "re-export it with this version, or load it with the version that wrote it")
    try:
        h = json.loads(meta["graph"])
        if list(h["kinds"]) != list(KINDS):
            raise ValueError(f"node kinds {h['kinds']} differ from {list(KINDS)}")
        N = int(t["kind"].numel())
        for c in ("layer", "pos", "feature", *_FLOATS):
            if t[c].numel() != N:
                raise ValueError(f"node column {c!r} does not have {N} entries")
        indptr, src = t["edge_indptr"], t["edge_src"].long()
        E = int(src.numel())
        if indptr.numel() != N + 1 or int(indptr[0]) != 0 or int(indptr[-1]) != E or bool((indptr.diff() < 0).any()):
            raise ValueError("edge_indptr is not a row pointer over the edges")
        if t["edge_weight"].numel() != E or (E and (int(src.min()) < 0 or int(src.max()) >= N)):
            raise ValueError(f"the edge columns do not match, or an edge source is outside 0..{N - 1}")
        dst = torch.repeat_interleave(torch.arange(N), indptr.diff())
        kind = t["kind"].long()
        if bool(((kind < 0) | (kind >= len(KINDS))).any()):
            raise ValueError("a node kind is out of range")
        tnodes = t["target_nodes"].long()
        targets = [_target_from_json(x) for x in h["targets"]]
        if len(targets) != tnodes.numel() or (tnodes.numel() and not bool((kind[tnodes] == TARGET).all())):
            raise ValueError("the target nodes do not match the targets")
        influence = t.get("influence")
        if influence is not None and influence.numel() != N:
            raise ValueError(f"node column 'influence' does not have {N} entries")
        return Graph(tokens=t["tokens"].tolist(), token_strs=[str(s) for s in h["token_strs"]],
                     n_layers=int(h["n_layers"]), kind=kind, layer=t["layer"].long(), pos=t["pos"].long(),
                     feature=t["feature"].long(), activation=t["activation"], value=t["value"], const=t["const"],
                     dropped=t["dropped"], edge_src=src, edge_dst=dst, edge_weight=t["edge_weight"], targets=targets,
                     target_nodes=tnodes, influence=influence, meta=h.get("meta") or {})
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise CompactGraphError(f"{path} is inconsistent: {what}; the file was edited or damaged, re-export it") from None


__all__ = ["COMPACT_SCHEMA", "COMPACT_SUFFIX", "CompactGraphError", "compact_summary", "is_compact", "load_compact",
           "save_compact", "to_tensors"]
