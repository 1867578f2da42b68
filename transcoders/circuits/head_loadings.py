"""Head loadings: which heads carry a graph's edges between positions, and why they attend there.

An edge from a source at key position ``k`` to a row at query position ``q != k`` travels
through attention. :func:`~.heads.split_write` splits it exactly into per-head parts (plus
residual and skip parts); the heads' shares of the strongest such edges (ranked by
circuit-tracer's edge influence) say which ``(head, q, k)`` carry the graph. For the top
``n_heads`` of these, :func:`~.qk.qk_attribution` explains the head's score at that position
pair by (query-side source, key-side source) pair terms, so an edge reads: "L3 f1268 @pos4
reaches pos20 through head 19.3 because query-side L12 f77 @pos20 matches key-side L3 f901
@pos4".

The result is a JSON-ready section (``"schema": "transcoders.qk/1"``) that ``transcoders trace
--qk`` stores in the graph's ``meta["qk"]``; sources are named by kind, layer, position and
feature (not node index), so the section stays valid in a pruned copy of the graph.
"""

from __future__ import annotations

import time

import torch

from .attribution import SourceIndex, attribution_rows
from .graph import EMBEDDING, ERROR, FEATURE, KINDS, TARGET, Graph
from .heads import row_read, split_source
from .prune import edge_influence
from .qk import (
    QK_SCHEMA,
    QKAttribution,
    QKError,
    column_positions,
    column_source,
    position_terms,
    qk_attributions,
    source_label,
)
from .replacement import LocalReplacement


def node_ref(graph: Graph, node: int) -> dict:
    """A node by identity: ``{"kind", "layer", "pos", "feature"}`` (targets: ``"target"``, its index)."""
    kind = KINDS[int(graph.kind[node])]
    ref = {"kind": kind, "layer": int(graph.layer[node]), "pos": int(graph.pos[node]), "feature": int(graph.feature[node])}
    if int(graph.kind[node]) == TARGET:
        ref["target"] = int((graph.target_nodes == node).nonzero()[0, 0])
    return ref


def find_node(graph: Graph, ref: dict) -> int | None:
    """The node of ``graph`` that :func:`node_ref` named, or None (pruned away, or not a node)."""
    if ref["kind"] == "target":
        i = ref.get("target", -1)
        return int(graph.target_nodes[i]) if 0 <= i < len(graph.targets) else None
    if ref["kind"] not in KINDS:
        return None
    hit = ((graph.kind == KINDS.index(ref["kind"])) & (graph.layer == ref["layer"]) & (graph.pos == ref["pos"])
           & (graph.feature == ref["feature"])).nonzero()
    return int(hit[0, 0]) if hit.numel() else None


def strongest_cross_edges(graph: Graph, n_edges: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(edge ids, edge influence)`` of the ``n_edges`` most influential edges whose source (a
    feature, error node or embedding) sits at another position than their row."""
    score = edge_influence(graph)
    src, dst = graph.edge_src, graph.edge_dst
    ok = (graph.pos[src] != graph.pos[dst]) & torch.isin(graph.kind[src], torch.tensor([FEATURE, ERROR, EMBEDDING]))
    ids = ok.nonzero().flatten()
    ids = ids[score[ids].argsort(descending=True, stable=True)[:n_edges]]
    return ids, score[ids]


@torch.no_grad()
def edge_head_parts(rep: LocalReplacement, graph: Graph, edges: torch.Tensor, batch_size: int = 16,
                    index: SourceIndex | None = None) -> dict[int, list]:
    """``{edge id: components}``: each edge split by the first component that carries it
    (:func:`~.heads.split_write`), sharing one backward sweep among edges into the same rows."""
    index = index or SourceIndex(rep)
    by_dst: dict[int, list[int]] = {}
    for e in edges.tolist():
        by_dst.setdefault(int(graph.edge_dst[e]), []).append(e)
    rows = list(by_dst)
    out: dict[int, list] = {}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        reads = [row_read(rep, graph, r) for r in chunk]
        record: dict = {}
        attribution_rows(rep, reads, index, record=record)
        for b, (r, read) in enumerate(zip(chunk, reads)):
            G_attn = {m: g[b] for m, g in record.get("attn", {}).items()}
            G_post = {m: g[b] for m, g in record.get("post", {}).items()}
            cache: dict = {}
            for e in by_dst[r]:
                out[e] = split_source(rep, read, G_attn, G_post, graph, int(graph.edge_src[e]), cache=cache)
    return out


def _sources(a: QKAttribution, rep: LocalReplacement, index: SourceIndex, marginals: torch.Tensor, side: str,
             n: int) -> list[dict]:
    pos = a.q if side == "q" else a.k
    top = marginals.abs().argsort(descending=True)[:n]
    return [{"source": column_source(rep, index, int(c), layer=a.layer, pos=pos, side=side), "term": float(marginals[c])}
            for c in top.tolist() if float(marginals[c]) != 0.0]


def qk_section(a: QKAttribution, rep: LocalReplacement, index: SourceIndex, n: int = 10) -> dict:
    """One head's QK breakdown as JSON: score, pattern, the ``n`` strongest query-side and
    key-side sources (each with its terms summed over the other side), each side's terms summed
    by source position (``positions``: the ``n`` largest) and the ``n`` strongest pairs."""
    mq, mk = a.query_marginals(), a.key_marginals()
    by_pos = position_terms(a, column_positions(rep, index))
    name = lambda c, side: column_source(rep, index, c, layer=a.layer, pos=a.q if side == "q" else a.k, side=side)
    return {"layer": a.layer, "head": a.head, "q": a.q, "k": a.k, "score": a.score, "capped_score": a.capped_score,
            "pattern": a.pattern, "scale": a.scale, "softcap": a.softcap,
            "head_bias": {"query": float(mq[-1]), "key": float(mk[-1])},
            "query": _sources(a, rep, index, mq, "q", n), "key": _sources(a, rep, index, mk, "k", n),
            "positions": {side: [[p, t] for p, t in terms[:n] if p >= 0] for side, terms in by_pos.items()},
            "pairs": [{"query": name(qc, "q"), "key": name(kc, "k"), "term": t} for qc, kc, t in a.top_pairs(n)]}


@torch.no_grad()
def head_loadings(rep: LocalReplacement, graph: Graph, *, n_heads: int = 20, n_edges: int = 50, n_terms: int = 10,
                  candidates: int = 16, batch_size: int = 64) -> dict:
    """The QK section of a graph: head loadings of its strongest cross-position edges and the QK
    breakdown of the ``n_heads`` ``(head, q, k)`` that carry the most of them (module doc).

    Args:
        rep: the replacement model ``graph`` was built from.
        n_heads: ``(head, query position, key position)`` triples to explain, ranked by the edge
            influence they carry (each edge's influence shared among its parts by ``|weight|``).
        n_edges: strongest cross-position edges to split.
        n_terms: sources and pairs kept per side and head.
        candidates: sources per side whose pair terms are computed
            (:func:`~.qk.qk_attributions`; the marginals cover every source).

    Returns:
        ``{"schema", "heads": [qk_section ... + "carried"], "loadings": [{"src", "dst", "weight",
        "influence", "parts": [{"kind", "layer", "head", "q", "k", "weight", "share"}]}],
        "seconds"}``.
    """
    t0 = time.perf_counter()
    index = SourceIndex(rep)
    edges, infl = strongest_cross_edges(graph, n_edges)
    parts = edge_head_parts(rep, graph, edges, index=index)
    carried: dict[tuple[int, int, int, int], float] = {}
    loadings = []
    for e, score in zip(edges.tolist(), infl.tolist()):
        comps, w = parts[e], float(graph.edge_weight[e])
        total = sum(abs(c.weight) for c in comps) or 1.0
        rows = []
        for c in comps:
            rows.append({"kind": c.kind, "layer": c.layer, "head": c.head, "q": c.dst_pos, "k": c.src_pos,
                         "weight": c.weight, "share": c.weight / w if w else 0.0})
            if c.kind == "head" and c.dst_pos != c.src_pos:  # a head moving within a position explains no jump
                key = (c.layer, c.head, c.dst_pos, c.src_pos)
                carried[key] = carried.get(key, 0.0) + score * abs(c.weight) / total
        loadings.append({"src": node_ref(graph, int(graph.edge_src[e])), "dst": node_ref(graph, int(graph.edge_dst[e])),
                         "weight": w, "influence": score, "parts": rows[:8]})
    t_split = time.perf_counter()
    top = sorted(carried.items(), key=lambda x: -x[1])[:n_heads]
    found = qk_attributions(rep, [t for t, _ in top], candidates=candidates, index=index, batch_size=batch_size)
    heads = [{**qk_section(a, rep, index, n_terms), "carried": amount} for a, (_, amount) in zip(found, top)]
    t1 = time.perf_counter()
    return {"schema": QK_SCHEMA, "heads": heads, "loadings": loadings,
            "seconds": {"split": t_split - t0, "qk": t1 - t_split, "total": t1 - t0}}


def read_qk_section(graph: Graph, where: str = "the graph") -> dict | None:
    """The QK section ``transcoders trace --qk`` stored in ``graph.meta["qk"]``, or None.

    Raises:
        QKError: the section is of another schema version (re-trace with ``--qk``).
    """
    section = graph.meta.get("qk")
    if section is None:
        return None
    if not isinstance(section, dict) or section.get("schema") != QK_SCHEMA:
        got = section.get("schema") if isinstance(section, dict) else type(section).__name__
        raise QKError(f"{where} has a QK section of schema {got!r}, but this version reads {QK_SCHEMA!r}; "
                      "trace it again with --qk")
    return section


def find_head(section: dict, layer: int, head: int, q: int, k: int) -> dict | None:
    """The stored breakdown of ``layer.head`` at ``(q, k)`` in a QK section, or None."""
    for h in section.get("heads", ()):
        if (h["layer"], h["head"], h["q"], h["k"]) == (layer, head, q, k):
            return h
    return None


def because(h: dict, token_strs: list[str] | None = None) -> str:
    """"because query-side X matches key-side Y (+term of score S, attention A)" for a stored
    breakdown's strongest pair pushing the score the way it goes (the strongest pair of all when
    none does)."""
    if not h["pairs"]:
        return "(no pair terms)"
    sign = 1.0 if h["score"] >= 0 else -1.0
    top = max(h["pairs"], key=lambda p: (p["term"] * sign > 0, abs(p["term"])))
    return (f"because query-side {source_label(top['query'], token_strs)} matches key-side "
            f"{source_label(top['key'], token_strs)} ({top['term']:+.3g} of score {h['score']:+.3g}, "
            f"attention {h['pattern']:.2f})")


def loading_sentences(section: dict, token_strs: list[str] | None = None, n: int = 10) -> list[str]:
    """Readable head loadings of the ``n`` strongest edges: one line per edge with the heads that
    carry it and their shares of the edge, then one indented line per head part with a stored QK
    breakdown: "SRC reaches posQ through head L.H because query-side X matches key-side Y"."""
    out = []
    for ld in section.get("loadings", ())[:n]:
        src = source_label(ld["src"], token_strs)
        dst = f"target {ld['dst']['target']}" if ld["dst"]["kind"] == "target" else source_label(ld["dst"], token_strs)
        heads = [p for p in ld["parts"] if p["kind"] == "head"]
        shares = ", ".join(f"{p['layer']}.{p['head']} {p['share']:+.0%}" for p in heads[:4])
        out.append(f"{src} -> {dst} (edge {ld['weight']:+.3g}): heads {shares or 'none'}")
        for p in heads:
            h = find_head(section, p["layer"], p["head"], p["q"], p["k"])
            if h is not None:
                out.append(f"    {src} reaches pos{p['q']} through head {p['layer']}.{p['head']} " + because(h, token_strs))
    return out
