"""Influence, pruning and evaluation scores of attribution graphs.

All measures here live on the *normalised absolute adjacency* of Ameisen et al. (2025,
"Circuit Tracing: Revealing Computational Graphs in Language Models", sections "Pruning" and
"Attribution Graph Evaluation"), the convention circuit-tracer also uses:

``A_norm[r, s] = |A[r, s]| / sum_s' |A[r, s']|``, where ``A[r, s]`` is the edge weight from source
``s`` into row ``r`` (rows with no incoming edges stay zero). With ``x0`` the target weights
normalised to sum 1 and placed on the target nodes, the *influence* of node ``s`` on the targets
is ``(x0 (A_norm + A_norm^2 + ...))[s]`` (the Neumann series ``x0 ((I - A_norm)^-1 - I)``, which
is a finite sum because the graph is a DAG). Everything is computed with sparse products on the
edge list; no dense ``N x N`` matrix is ever built.

Functions: :func:`normalized_adjacency`, :func:`node_influence`, :func:`edge_influence`,
:func:`prune` (with :func:`source_edges` to map its edges back) and :func:`graph_scores`.
"""

from __future__ import annotations

import torch

from .graph import BIAS, EMBEDDING, ERROR, FEATURE, TARGET, Graph

_TINY = 1e-300


def _abs_row_sums(n_nodes: int, dst: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[N]`` float64: sum of ``|weight|`` of the edges into each node."""
    return torch.zeros(n_nodes, dtype=torch.float64).index_add_(0, dst, weight.double().abs())


def _normalized_edges(n_nodes: int, dst: torch.Tensor, weight: torch.Tensor,
                      extra: torch.Tensor | None = None) -> torch.Tensor:
    """``[E]`` float64: ``|w_e| / (sum of |w| into dst_e + extra[dst_e])``.

    ``extra`` (``[N]``, optional) is additional incoming mass per row that is not an edge of
    the graph (used by :func:`graph_scores` for dropped and pruned mass).
    """
    total = _abs_row_sums(n_nodes, dst, weight)
    if extra is not None:
        total = total + extra
    return weight.double().abs() / total[dst].clamp_min(_TINY)


def normalized_adjacency(graph: Graph) -> torch.Tensor:
    """Sparse COO ``[N, N]`` float64 matrix ``A_norm[dst, src] = |w| / sum |w into dst|``.

    circuit-tracer's normalisation (Ameisen et al. 2025): each row (a receiving node) sums to 1
    over its incoming edges; rows with no incoming edges stay zero.
    """
    vals = _normalized_edges(graph.n_nodes, graph.edge_dst, graph.edge_weight)
    idx = torch.stack([graph.edge_dst, graph.edge_src])
    return torch.sparse_coo_tensor(idx, vals, (graph.n_nodes, graph.n_nodes), check_invariants=False).coalesce()


def target_weights(graph: Graph) -> torch.Tensor:
    """``x0``: ``[N]`` float64, the target weights normalised to sum 1 on the target nodes.

    Raises:
        ValueError: a target weight is negative or the weights sum to zero.
    """
    w = torch.tensor([float(t.weight) for t in graph.targets], dtype=torch.float64)
    if w.numel() == 0 or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"target weights must be non-negative with a positive sum, got {w.tolist()}")
    x0 = torch.zeros(graph.n_nodes, dtype=torch.float64)
    x0[graph.target_nodes] = w / w.sum()
    return x0


def propagate(n_nodes: int, src: torch.Tensor, dst: torch.Tensor, values: torch.Tensor,
              x0: torch.Tensor, level: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_{k>=1} x0 M^k`` for the sparse ``M[dst, src] = values`` (rows to sources; ``[E]``
    float64, signed or not).

    With ``level`` (``[N]``, e.g. the nodes' layers) such that every edge out of a node that
    itself receives edges goes to a strictly higher level (true of attribution graphs: a row
    only feeds rows of later layers), one pass over the edges in descending level of their
    receiving node is exact: when a level is reached, its nodes have received everything.
    Otherwise, one sparse product ``M^T x`` per step until the support empties (at most the
    longest path's length steps on a DAG).

    Raises:
        ValueError: the edges contain a cycle (the loop ran more than ``N`` steps).
    """
    if level is not None and src.numel():
        receives = torch.zeros(n_nodes, dtype=torch.bool)
        receives[dst] = True
        lv = level.to(torch.long)
        if bool((lv[src[receives[src]]] < lv[dst[receives[src]]]).all()):
            return _propagate_by_level(src, dst, values, x0, lv)
    mt = torch.sparse_coo_tensor(torch.stack([src, dst]), values, (n_nodes, n_nodes), check_invariants=False).coalesce()
    total = torch.zeros(n_nodes, dtype=torch.float64)
    cur = x0.double()[:, None]
    for _ in range(n_nodes + 1):
        cur = torch.sparse.mm(mt, cur)
        if not bool(cur.any()):
            return total
        total += cur[:, 0]
    raise ValueError("the graph's edges contain a cycle; influence and effects are defined on DAGs only")


def _propagate_by_level(src: torch.Tensor, dst: torch.Tensor, values: torch.Tensor, x0: torch.Tensor,
                        level: torch.Tensor) -> torch.Tensor:
    x = x0.double().clone()
    dst_level = level[dst]
    order = dst_level.argsort(descending=True, stable=True)
    counts = torch.unique_consecutive(dst_level[order], return_counts=True)[1]
    for e in order.split(counts.tolist()):
        x.index_add_(0, src[e], values[e].double() * x[dst[e]])
    return x - x0.double()


def _influence(graph: Graph) -> torch.Tensor:
    norm = _normalized_edges(graph.n_nodes, graph.edge_dst, graph.edge_weight)
    return propagate(graph.n_nodes, graph.edge_src, graph.edge_dst, norm, target_weights(graph), graph.layer)


def node_influence(graph: Graph) -> torch.Tensor:
    """Influence of every node on the weighted targets; also stored in ``graph.influence``.

    ``influence = sum_{k>=1} x0 A_norm^k`` with ``x0`` = target weights normalised to sum 1
    (Ameisen et al. 2025, "Pruning"). A target's own weight is *not* included (a target only
    has influence through other targets, which is normally zero).

    Returns:
        ``[N]`` float64, non-negative; the influences of the sources of any cut through the
        graph sum to at most 1.
    """
    infl = _influence(graph)
    graph.influence = infl
    return infl


def edge_influence(graph: Graph) -> torch.Tensor:
    """``[E]`` float64 edge scores ``(x0 + influence)[dst] * A_norm[dst, src]``.

    The share of the targets' weighted influence that flows through each edge: the influence of
    the receiving node (targets count their own weight ``x0``) times the edge's normalised
    absolute weight (circuit-tracer's edge score for pruning).
    """
    return _edge_scores(graph.n_nodes, graph.edge_src, graph.edge_dst, graph.edge_weight, target_weights(graph),
                        graph.layer)


def _edge_scores(n_nodes: int, src: torch.Tensor, dst: torch.Tensor, weight: torch.Tensor,
                 x0: torch.Tensor, level: torch.Tensor | None = None) -> torch.Tensor:
    norm = _normalized_edges(n_nodes, dst, weight)
    reach = x0 + propagate(n_nodes, src, dst, norm, x0, level)
    return reach[dst] * norm


def _top_mass(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool mask of the smallest set of largest ``scores`` whose sum reaches ``threshold`` of the
    total. ``threshold >= 1`` keeps every positive score; ``threshold <= 0`` keeps nothing."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    total = float(scores.sum())
    if threshold <= 0 or total <= 0:
        return keep
    if threshold >= 1:
        return scores > 0
    order = scores.argsort(descending=True, stable=True)
    csum = scores[order].cumsum(0)
    k = min(int(torch.searchsorted(csum, torch.tensor([threshold * total], dtype=csum.dtype))[0]), scores.numel() - 1)
    keep[order[: k + 1]] = True
    return keep & (scores > 0)


def _reaching_targets(n_nodes: int, src: torch.Tensor, dst: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: nodes with a path (over the given edges) to a target, targets included."""
    reach = is_target.clone()
    for _ in range(n_nodes + 1):
        new = reach.clone()
        new[src[reach[dst]]] = True
        if bool((new == reach).all()):
            return reach
        reach = new
    return reach


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98, keep_errors: bool = True) -> Graph:
    """A smaller graph keeping the nodes and edges that carry most influence on the targets.

    Following Ameisen et al. (2025, "Pruning") and circuit-tracer:

    1. nodes: the smallest set of feature nodes whose summed :func:`node_influence` reaches
       ``node_threshold`` of the total feature influence; targets and embeddings are always
       kept, error and bias nodes when ``keep_errors``;
    2. edges: among the kept nodes, influence is recomputed on the restricted graph and the
       smallest set of edges whose :func:`edge_influence` scores reach ``edge_threshold`` of the
       total is kept;
    3. nodes left without a path to a target are removed (embeddings excepted).

    Removed sources' edges into kept rows are added to the row's ``dropped`` so that
    ``value = sum(incoming) + const + dropped`` still holds exactly. ``influence`` of the result
    holds the kept nodes' influence in the *input* graph. ``meta["pruned"]`` records the
    thresholds, node/edge/feature counts before and after, and ``kept_nodes`` (index in the
    input graph of each kept node, used by :func:`graph_scores`).

    Side effect: fills ``graph.influence`` of the input graph.

    Raises:
        ValueError: a threshold is outside [0, 1].
    """
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    N, kind = graph.n_nodes, graph.kind
    infl = node_influence(graph)
    x0 = target_weights(graph)
    is_feat = kind == FEATURE
    keep = (kind == TARGET) | (kind == EMBEDDING)
    if keep_errors:
        keep |= (kind == ERROR) | (kind == BIAS)
    feat_idx = is_feat.nonzero().flatten()
    keep[feat_idx[_top_mass(infl[feat_idx], node_threshold)]] = True

    src, dst, w = graph.edge_src, graph.edge_dst, graph.edge_weight
    among = (keep[src] & keep[dst]).nonzero().flatten()
    scores = _edge_scores(N, src[among], dst[among], w[among], x0, graph.layer)
    edge_keep = torch.zeros(graph.n_edges, dtype=torch.bool)
    edge_keep[among[_top_mass(scores, edge_threshold)]] = True

    reach = _reaching_targets(N, src[edge_keep], dst[edge_keep], kind == TARGET)
    node_keep = reach | (kind == EMBEDDING)
    edge_keep &= node_keep[dst] & node_keep[src]
    return _subgraph(graph, node_keep, edge_keep, infl, {
        "node_threshold": node_threshold, "edge_threshold": edge_threshold, "keep_errors": keep_errors,
    })


def _subgraph(graph: Graph, node_keep: torch.Tensor, edge_keep: torch.Tensor, infl: torch.Tensor, info: dict) -> Graph:
    """The graph restricted to ``node_keep`` / ``edge_keep``, removed edges into kept rows moved
    into ``dropped``."""
    kept = node_keep.nonzero().flatten()
    remap = torch.full((graph.n_nodes,), -1, dtype=torch.long)
    remap[kept] = torch.arange(kept.numel())
    removed_into_kept = ~edge_keep & node_keep[graph.edge_dst]
    dropped = graph.dropped.double().clone().index_add_(
        0, graph.edge_dst[removed_into_kept], graph.edge_weight[removed_into_kept].double())
    dropped = dropped.to(graph.dropped.dtype)
    n_feat = int((graph.kind == FEATURE).sum())
    meta = dict(graph.meta)
    meta["pruned"] = {
        **info,
        "n_nodes": [graph.n_nodes, int(kept.numel())],
        "n_edges": [graph.n_edges, int(edge_keep.sum())],
        "n_features": [n_feat, int((graph.kind[kept] == FEATURE).sum())],
        "kept_nodes": kept.tolist(),
    }
    return Graph(
        tokens=list(graph.tokens), token_strs=list(graph.token_strs), n_layers=graph.n_layers,
        kind=graph.kind[kept], layer=graph.layer[kept], pos=graph.pos[kept], feature=graph.feature[kept],
        activation=graph.activation[kept], value=graph.value[kept], const=graph.const[kept], dropped=dropped[kept],
        edge_src=remap[graph.edge_src[edge_keep]], edge_dst=remap[graph.edge_dst[edge_keep]],
        edge_weight=graph.edge_weight[edge_keep], targets=list(graph.targets),
        target_nodes=remap[graph.target_nodes], influence=infl[kept].clone(), meta=meta,
    )


def source_edges(pruned: Graph) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(src, dst, weight)`` (``[E']`` each) of a graph made by :func:`prune`, with ``src`` and
    ``dst`` as node indices of the graph it was pruned from (``meta["pruned"]["kept_nodes"]``).

    Raises:
        ValueError: ``pruned`` has no ``kept_nodes`` matching its nodes.
    """
    info = pruned.meta.get("pruned")
    if info is None or len(info.get("kept_nodes", ())) != pruned.n_nodes:
        raise ValueError("`pruned` has no meta['pruned']['kept_nodes'] matching its nodes; make it with prune(graph)")
    kept = torch.tensor(info["kept_nodes"], dtype=torch.long)
    return kept[pruned.edge_src], kept[pruned.edge_dst], pruned.edge_weight


def _extra_error_mass(graph: Graph, pruned: Graph | None) -> tuple[Graph, torch.Tensor]:
    """The graph to score and the per-row incoming mass that counts as error without being an
    edge: ``|dropped|`` of the unpruned graph, plus, for a pruned graph, the absolute weight of
    every original edge into the row that pruning removed."""
    if pruned is None:
        return graph, graph.dropped.double().abs().nan_to_num(0.0)
    info = pruned.meta.get("pruned")
    if info is None or len(info.get("kept_nodes", ())) != pruned.n_nodes:
        raise ValueError("`pruned` has no meta['pruned']['kept_nodes'] matching its nodes; make it with prune(graph)")
    kept = torch.tensor(info["kept_nodes"], dtype=torch.long)
    if (kept.numel() and int(kept.max()) >= graph.n_nodes) or not torch.equal(graph.kind[kept], pruned.kind):
        raise ValueError("`pruned` was not pruned from `graph` (its kept_nodes do not match graph's nodes)")
    full_in = _abs_row_sums(graph.n_nodes, graph.edge_dst, graph.edge_weight)[kept]
    kept_in = _abs_row_sums(pruned.n_nodes, pruned.edge_dst, pruned.edge_weight)
    lost = (full_in - kept_in).clamp_min(0.0)
    return pruned, lost + graph.dropped[kept].double().abs().nan_to_num(0.0)


def graph_scores(graph: Graph, pruned: Graph | None = None) -> dict[str, float]:
    """Replacement and completeness scores (Ameisen et al. 2025, "Attribution Graph
    Evaluation"; circuit-tracer's ``compute_graph_scores``).

    Notation, on the graph ``G`` being scored (``pruned`` if given, else ``graph``):
    ``e_r >= 0`` is incoming mass of row ``r`` that counts as *error* without being an edge:
    ``|dropped_r|`` (features outside the node budget), plus for a pruned graph the summed
    ``|w|`` of the original edges into ``r`` that pruning removed (pruned nodes count as error
    nodes). With ``m_r = sum_s |A[r, s]| + e_r`` and ``B[r, s] = |A[r, s]| / m_r``, the influence
    is ``x = sum_{k>=1} x0 B^k`` (paths stop at error nodes, which have no inputs), and
    ``y = x0 + x`` (targets count their weight). Then

    - ``replacement = X_emb / (X_emb + X_err)``, with ``X_emb = sum_{embeddings} x``,
      ``X_err = sum_{error nodes} x + sum_r y_r e_r / m_r``: the share of the end-to-end
      influence reaching the inputs that starts at tokens rather than at error nodes;
    - ``completeness = sum_r y_r c_r / sum_r y_r`` over rows with ``m_r > 0``, where
      ``c_r = 1 - (sum_{s error} |A[r, s]| + e_r) / m_r`` is the fraction of the row's incoming
      normalised weight from non-error nodes (features, embeddings, biases).

    Bias nodes are neither token nor error influence (circuit-tracer has no bias nodes). Unlike
    circuit-tracer, whose completeness also averages over source nodes (fraction 1), the mean
    is over rows only, as in the paper's definition. With ``e = 0`` and no bias nodes the
    replacement score is circuit-tracer's exactly. Both are 1.0 when no error mass exists.

    Args:
        graph: the full graph.
        pruned: optional, ``prune(graph, ...)``; then ``G`` is the pruned graph.

    Returns:
        ``{"replacement_score": float, "completeness_score": float}`` (NaN when undefined:
        no influence reaches embeddings or errors / no row has inputs).
    """
    G, extra = _extra_error_mass(graph, pruned)
    x0 = target_weights(G)
    src, dst, w = G.edge_src, G.edge_dst, G.edge_weight
    mass = _abs_row_sums(G.n_nodes, dst, w) + extra
    norm = w.double().abs() / mass[dst].clamp_min(_TINY)
    x = propagate(G.n_nodes, src, dst, norm, x0, G.layer)
    y = x0 + x
    extra_frac = extra / mass.clamp_min(_TINY)
    from_err = G.kind[src] == ERROR
    err_frac = torch.zeros(G.n_nodes, dtype=torch.float64).index_add_(0, dst[from_err], norm[from_err]) + extra_frac
    x_emb = float(x[G.kind == EMBEDDING].sum())
    x_err = float(x[G.kind == ERROR].sum() + (y * extra_frac).sum())
    rows = mass > 0
    wsum = float(y[rows].sum())
    return {
        "replacement_score": x_emb / (x_emb + x_err) if x_emb + x_err > 0 else float("nan"),
        "completeness_score": float((y[rows] * (1 - err_frac[rows])).sum()) / wsum if wsum > 0 else float("nan"),
    }
