"""Computational paths through an attribution graph.

A *path* runs from a source node (a node with no incoming edges: an embedding, bias or error
node, or a feature whose inputs were not computed) through intermediate nodes to a target; its
weight is the signed product of its edge weights, i.e. the path's contribution in the linear
local replacement model when each edge is read as a gain. With ``normalize=True`` each edge
weight is divided by the sum of absolute incoming weights of its receiving node, so the
product is the fraction of the target's input that the path carries.

Two searches are provided:

- :func:`top_paths`: the *exact* top-``n`` paths by ``|weight|`` (dynamic programming over the
  DAG, keeping the ``n`` best partial paths per node and length);
- :func:`greedy_paths`: the greedy beam search of Dunefsky, Chlenski & Nanda (2024,
  "Transcoders Find Interpretable LLM Feature Circuits", arXiv 2406.11944), which starts at the
  targets and repeatedly follows each partial path's strongest incoming edges.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .graph import KINDS, TARGET, Graph

_CANDIDATES = 2_000_000  # partial-path candidates scored at once by top_paths (memory bound)


@dataclass
class Path:
    """One path: ``nodes`` (graph node indices, source first, target last), ``weight`` (the
    signed product of ``edges``) and ``edges`` (the ``len(nodes) - 1`` edge weights along the
    path, normalised or raw as requested)."""

    nodes: list[int]
    weight: float
    edges: list[float] = field(default_factory=list)

    @property
    def source(self) -> int:
        return self.nodes[0]

    @property
    def target(self) -> int:
        return self.nodes[-1]


def _edge_values(graph: Graph, normalize: bool) -> torch.Tensor:
    """``[E]`` float64 edge weights, divided by the receiving row's ``sum |incoming|`` if
    ``normalize`` (rows whose incoming weights are all zero keep zeros)."""
    w = graph.edge_weight.double()
    if not normalize:
        return w
    total = torch.zeros(graph.n_nodes, dtype=torch.float64).index_add_(0, graph.edge_dst, w.abs())
    return w / total[graph.edge_dst].clamp_min(1e-300)


def node_filter(graph: Graph, *, layers: Iterable[int] | None = None, positions: Iterable[int] | None = None,
                kinds: Iterable[str] | None = None, features: Iterable[tuple[int, int]] | None = None) -> torch.Tensor:
    """``[N]`` bool: nodes passing every given filter (None = no constraint).

    Args:
        layers: allowed ``layer`` values (-1: embeddings).
        positions: allowed prompt positions.
        kinds: allowed node kinds (names from :data:`KINDS`).
        features: allowed ``(layer, feature)`` pairs; constrains feature nodes only.

    Raises:
        ValueError: an unknown kind.
    """
    ok = torch.ones(graph.n_nodes, dtype=torch.bool)
    if layers is not None:
        ok &= torch.isin(graph.layer, torch.tensor(sorted(set(layers)), dtype=graph.layer.dtype))
    if positions is not None:
        ok &= torch.isin(graph.pos, torch.tensor(sorted(set(positions)), dtype=graph.pos.dtype))
    if kinds is not None:
        kinds = set(kinds)
        bad = kinds - set(KINDS)
        if bad:
            raise ValueError(f"unknown node kinds {sorted(bad)}; choose from {KINDS}")
        ok &= torch.isin(graph.kind, torch.tensor([KINDS.index(k) for k in kinds], dtype=graph.kind.dtype))
    if features is not None:
        allowed = {(int(a), int(b)) for a, b in features}
        is_feat = graph.kind == KINDS.index("feature")
        hit = torch.tensor([(int(l_), int(f)) in allowed for l_, f in zip(graph.layer.tolist(), graph.feature.tolist())],
                           dtype=torch.bool)
        ok &= ~is_feat | hit
    return ok


def _sources(graph: Graph) -> torch.Tensor:
    """``[N]`` bool: nodes with no incoming edge that are not targets (where paths start)."""
    indeg = torch.zeros(graph.n_nodes, dtype=torch.long).index_add_(
        0, graph.edge_dst, torch.ones_like(graph.edge_dst))
    return (indeg == 0) & (graph.kind != TARGET)


def _segment_top(keys: torch.Tensor, score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For candidates grouped by ``keys`` (``[C]``), the indices of each group's ``k`` largest
    ``score`` and their rank within the group (ties: first candidate wins)."""
    order = score.argsort(descending=True, stable=True)
    order = order[keys[order].argsort(stable=True)]
    g = keys[order]
    counts = torch.bincount(g, minlength=int(g.max()) + 1 if g.numel() else 0)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(g.numel()) - starts[g]
    sel = rank < k
    return order[sel], rank[sel]


def top_paths(graph: Graph, n: int = 10, normalize: bool = True, max_depth: int | None = None, *,
              layers: Iterable[int] | None = None, positions: Iterable[int] | None = None,
              kinds: Iterable[str] | None = None, features: Iterable[tuple[int, int]] | None = None,
              source_kinds: Iterable[str] | None = None) -> list[Path]:
    """The exact top-``n`` source-to-target paths by ``|product of edge weights|``.

    Dynamic programming over path length ``k = 1, 2, ...``: ``best_k[v]`` holds the ``n`` partial
    paths of exactly ``k`` edges from a source to ``v`` with the largest ``|product|`` (with
    back-pointers). Since ``|p e| = |p| |e|``, any prefix of a top-``n`` path is among the top
    ``n`` prefixes of its length at its node, so the result is exact (up to ties). Each step is one
    vectorised pass over the edges whose source holds partial paths (at most ``O(E n)`` work,
    usually far less thanks to the bound in :func:`_extend`), for at most ``max_depth`` (or the
    longest path's length) steps.

    Args:
        n: number of paths.
        normalize: use row-normalised signed weights ``w / sum |w into dst|`` (products are
            fractions of the target's input) instead of raw weights.
        max_depth: at most this many edges (None: any length).
        layers, positions, kinds, features: filters every *intermediate* node must pass (see
            :func:`node_filter`); sources and targets are exempt.
        source_kinds: if given, the kinds a path may start at.

    Returns:
        up to ``n`` :class:`Path`, strongest first.
    """
    N = graph.n_nodes
    if n <= 0 or N == 0:
        return []
    w = _edge_values(graph, normalize)
    src, dst = graph.edge_src, graph.edge_dst
    is_src = _sources(graph)
    if source_kinds is not None:
        is_src &= node_filter(graph, kinds=source_kinds)
    can_extend = is_src | (node_filter(graph, layers=layers, positions=positions, kinds=kinds, features=features)
                           & (graph.kind != TARGET))
    is_target = graph.kind == TARGET

    val = torch.full((N, n), float("nan"), dtype=torch.float64)
    val[is_src, 0] = 1.0
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # per length: (edge index [N, n], pred rank [N, n])
    found: list[tuple[float, int, int, int]] = []  # (|weight|, length, node, rank)
    limit = N if max_depth is None else min(max_depth, N)
    chunk = max(1, _CANDIDATES // n)
    for k in range(1, limit + 1):
        live = (~val.isnan()).any(1) & can_extend
        e = live[src].nonzero().flatten()
        if e.numel() == 0:
            break
        val, edge_at, pred_rank = _extend(val, e, src, dst, w, chunk)
        steps.append((edge_at, pred_rank))
        tn, tr = (is_target[:, None] & ~val.isnan()).nonzero(as_tuple=True)
        found += [(abs(float(val[a, b])), k, int(a), int(b)) for a, b in zip(tn, tr)]
    found.sort(key=lambda t: (-t[0], t[1], t[2], t[3]))
    return [_backtrack(graph, w, steps, k, v, r) for _, k, v, r in found[:n]]


def _extend(val: torch.Tensor, e: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor,
            chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DP step: the best ``n`` one-edge-longer partial paths per node.

    ``val [N, n]``: products of the current partial paths, ``|.|``-descending per row (NaN:
    empty slot); ``e``: edges to extend along. Candidates ``val[src_e, r] * w_e`` are merged chunk
    by chunk (``chunk`` edges at a time) into the running top-``n`` per receiving node, so memory
    stays ``O(chunk n + N n)``.

    Bound: with ``tau[d]`` the ``n``-th largest best-rank candidate ``|val[src_e, 0] w_e|`` over
    the edges into ``d``, no candidate below ``tau[d]`` can make the top ``n`` (``n`` distinct
    edges already reach it), so only edges and ranks at or above ``tau`` are scored.

    Returns:
        ``(val, edge_at, pred_rank)`` for the new length, each ``[N, n]``: product, the edge
        taken last, and the rank of the predecessor partial path at that edge's source.
    """
    N, n = val.shape
    out = torch.full((N, n), float("nan"), dtype=torch.float64)
    edge_at = torch.full((N, n), -1, dtype=torch.long)
    pred_rank = torch.full((N, n), -1, dtype=torch.long)
    best0 = val[src[e], 0].abs() * w[e].abs()
    pick, rank = _segment_top(dst[e], best0, n)
    tau = torch.zeros(N, dtype=torch.float64)
    nth = pick[rank == n - 1]
    tau[dst[e[nth]]] = best0[nth]
    e = e[best0 >= tau[dst[e]]]
    for part in e.split(chunk):
        cand = val[src[part]] * w[part, None]  # [chunk, n]
        ce, cr = (~cand.isnan() & (cand.abs() >= tau[dst[part], None])).nonzero(as_tuple=True)
        on, orank = (~out.isnan()).nonzero(as_tuple=True)  # the running best compete again
        keys = torch.cat([on, dst[part[ce]]])
        vals = torch.cat([out[on, orank], cand[ce, cr]])
        edges = torch.cat([edge_at[on, orank], part[ce]])
        preds = torch.cat([pred_rank[on, orank], cr])
        pick, rank = _segment_top(keys, vals.abs(), n)
        nodes = keys[pick]
        out[nodes, rank], edge_at[nodes, rank], pred_rank[nodes, rank] = vals[pick], edges[pick], preds[pick]
    return out, edge_at, pred_rank


def _backtrack(graph: Graph, w: torch.Tensor, steps, k: int, node: int, rank: int) -> Path:
    nodes, edges = [node], []
    for step in range(k - 1, -1, -1):
        edge_at, pred_rank = steps[step]
        e = int(edge_at[node, rank])
        edges.append(float(w[e]))
        node, rank = int(graph.edge_src[e]), int(pred_rank[node, rank])
        nodes.append(node)
    nodes.reverse()
    edges.reverse()
    return Path(nodes=nodes, weight=_product(edges), edges=edges)


def _product(edges: list[float]) -> float:
    """Left-to-right product (source to target), the order the searches multiply in."""
    out = 1.0
    for x in edges:
        out *= x
    return out


def greedy_paths(graph: Graph, beam: int = 5, depth: int = 4, normalize: bool = True, *,
                 layers: Iterable[int] | None = None, positions: Iterable[int] | None = None,
                 kinds: Iterable[str] | None = None, features: Iterable[tuple[int, int]] | None = None) -> list[Path]:
    """Greedy beam search for strong paths (Dunefsky, Chlenski & Nanda 2024, arXiv 2406.11944).

    From each target, every partial path is extended backwards by the ``beam`` strongest
    incoming edges (by ``|weight|``) of its earliest node; after each extension the ``beam``
    partial paths with the largest ``|product|`` are kept (per target). A path ends when it
    reaches a source (no incoming edges) or after ``depth`` edges. Cheaper than
    :func:`top_paths` but not exact.

    Args:
        beam: branching and beam width.
        depth: maximum number of edges.
        normalize: row-normalised signed weights (see :func:`top_paths`).
        layers, positions, kinds, features: filters every added non-source node must pass.

    Returns:
        every finished :class:`Path` (source first), strongest first.
    """
    w = _edge_values(graph, normalize)
    is_src = _sources(graph)
    allowed = is_src | node_filter(graph, layers=layers, positions=positions, kinds=kinds, features=features)
    order = graph.edge_dst.argsort(stable=True)
    ptr = torch.zeros(graph.n_nodes + 1, dtype=torch.long)
    ptr[1:] = torch.bincount(graph.edge_dst, minlength=graph.n_nodes).cumsum(0)
    done: list[Path] = []
    for t in graph.target_nodes.tolist():
        partial = [([t], [])]  # (nodes target-first, edge weights target-first)
        for _ in range(depth):
            grown = []
            for nodes, edges in partial:
                e = order[ptr[nodes[-1]] : ptr[nodes[-1] + 1]]
                e = e[allowed[graph.edge_src[e]]]
                if e.numel() == 0:  # every input filtered out: a dead end, not a path
                    continue
                for j in e[w[e].abs().argsort(descending=True, stable=True)[:beam]].tolist():
                    grown.append((nodes + [int(graph.edge_src[j])], edges + [float(w[j])]))
            grown.sort(key=lambda p: -abs(_product(p[1][::-1])))
            partial = []
            for nodes, edges in grown[:beam]:
                if is_src[nodes[-1]]:
                    done.append(_finish(nodes, edges))
                else:
                    partial.append((nodes, edges))
            if not partial:
                break
        done += [_finish(nodes, edges) for nodes, edges in partial if len(nodes) > 1]
    done.sort(key=lambda p: -abs(p.weight))
    return done


def _finish(nodes_rev: list[int], edges_rev: list[float]) -> Path:
    edges = edges_rev[::-1]
    return Path(nodes=nodes_rev[::-1], weight=_product(edges), edges=edges)


def format_path(graph: Graph, path: Path) -> str:
    """A readable chain from target back to source, e.g.
    ``logit(' Paris')@pos7 <- L8 f123 @pos5 <- emb 'The' @pos0  (weight +0.0123)``."""
    chain = " <- ".join(_label(graph, i) for i in reversed(path.nodes))
    return f"{chain}  (weight {path.weight:+.4g})"


def _label(graph: Graph, i: int) -> str:
    """``graph.label(i)``, with a fallback name for targets built without a label."""
    if int(graph.kind[i]) == TARGET:
        t = graph.targets[int((graph.target_nodes == i).nonzero()[0, 0])]
        if not t.label:
            name = {"logit": f"logit(#{t.token})", "logit_diff": f"logit(#{t.token})-logit(#{t.token_b})",
                    "feature": f"L{t.layer} f{t.feature}"}.get(t.kind, t.kind)
            return f"{name}@pos{int(graph.pos[i])}"
    return graph.label(i)


def path_weight(graph: Graph, nodes: list[int], normalize: bool = True) -> float:
    """The product of the edge weights along ``nodes`` (source first); ``0.0`` if an edge is
    missing. Useful to check a path found elsewhere."""
    w = _edge_values(graph, normalize)
    out = 1.0
    for a, b in zip(nodes, nodes[1:]):
        m = ((graph.edge_src == a) & (graph.edge_dst == b)).nonzero().flatten()
        if m.numel() == 0:
            return 0.0
        out *= float(w[m].sum())
    return out


__all__ = ["Path", "format_path", "greedy_paths", "node_filter", "path_weight", "top_paths"]
