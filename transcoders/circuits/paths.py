"""Computational paths through an attribution graph, in the target's units.

A *path* runs from a source node (an embedding, bias or error node, or a feature whose inputs
were not computed) through features to a target. Its *weight* is its contribution to the
target's value in the linearised local replacement model (features respond linearly to their
pre-activations, ``delta a = delta pre``; attention patterns and norms frozen), the model
:mod:`transcoders.circuits.verify` checks graphs against: with ``w`` the exact edge weights and
``a`` the feature activations,

    weight(s -> f1 -> ... -> fk -> t) = w(s, f1) * w(f1, f2) / a(f1) * ... * w(fk, t) / a(fk),

in nats for a logit target and in pre-activation units for a feature target. Each factor
``w(f, g) / a(f)`` is the *gain* of the edge: how much ``g``'s pre-activation moves per unit of
``f``'s activation. Every path is one term of the expansion of the target's value, so the
weights of distinct paths add, and all paths together with the rows' constants and dropped
terms sum exactly to the value (:mod:`transcoders.circuits.contributions`).

Two searches:

- :func:`top_paths`: the *exact* top-``n`` paths (dynamic programming over the DAG, keeping the
  ``n`` best partial paths per node and length), ranked by ``|weight|`` or by the length-neutral
  per-edge score, optionally constrained to pass through given nodes or layers;
- :func:`greedy_paths`: the greedy beam search of Dunefsky, Chlenski & Nanda (2024,
  "Transcoders Find Interpretable LLM Feature Circuits", arXiv 2406.11944), which starts at the
  target and repeatedly follows each partial path's strongest incoming edges.

Both explain one target at a time by default (the most probable one); with ``target="all"``
paths to every target are ranked together, each weighted by its target's weight (probability).
Both list paths from embeddings and features only: what bias and error nodes carry is reported
by :func:`transcoders.circuits.contributions.explained_shares`, not as paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .graph import FEATURE, KINDS, TARGET, Graph

_CANDIDATES = 2_000_000  # partial-path candidates scored at once by top_paths (memory bound)
RANKS = ("weight", "per-edge")
DEFAULT_SOURCES = ("embedding", "feature")
TargetChoice = int | str | None  # an index into graph.targets, "all", or None (the most probable)


@dataclass
class Path:
    """One path.

    Attributes:
        nodes: graph node indices, source first, target last.
        weight: the path's contribution to the target (nats for logits; see the module doc).
        edges: the ``len(nodes) - 1`` edge gains along the path (the first is the source's whole
            write: ``w`` for an embedding, bias or error node, ``w / a`` times ``a`` for a feature).
        score: what the search ranked by (``|weight|``, or the per-edge score), times the
            target's share of the target weights when several targets are ranked together.
        target: index into ``graph.targets``.
    """

    nodes: list[int]
    weight: float
    edges: list[float] = field(default_factory=list)
    score: float = 0.0
    target: int = 0

    @property
    def source(self) -> int:
        return self.nodes[0]

    @property
    def length(self) -> int:
        return len(self.nodes) - 1


def expanded(graph: Graph) -> torch.Tensor:
    """``[N]`` bool: feature nodes whose inputs were computed (rows), i.e. nodes a path passes
    *through*; every other non-target node is where paths start."""
    return (graph.kind == FEATURE) & ~graph.value.isnan()


def edge_gains(graph: Graph) -> torch.Tensor:
    """``[E]`` float64: ``w / a(src)`` for edges out of features with computed inputs (the change
    of the row per unit of the source's activation), the raw weight ``w`` otherwise."""
    w = graph.edge_weight.double()
    thru = expanded(graph)[graph.edge_src]
    return torch.where(thru, w / graph.activation.double()[graph.edge_src].where(thru, 1.0), w)


def source_scale(graph: Graph) -> torch.Tensor:
    """``[N]`` float64: what a path's gain product is multiplied by at its first node: the
    activation for a feature with computed inputs, 1 for every other node."""
    return torch.where(expanded(graph), graph.activation.double(), 1.0)


def target_weights_of(graph: Graph, target: TargetChoice) -> dict[int, float]:
    """``{index into graph.targets: share}``: the one chosen target with share 1, or with
    ``"all"`` every target, shares proportional to their weights.

    Raises:
        ValueError: an index out of range, an unknown string, a graph without targets, or
            target weights that are negative or sum to zero.
    """
    n = len(graph.targets)
    if n == 0:
        raise ValueError("the graph has no targets")
    if target is None:
        w = [float(t.weight) for t in graph.targets]
        return {max(range(n), key=lambda i: (w[i], -i)): 1.0}
    if target == "all":
        w = torch.tensor([float(t.weight) for t in graph.targets], dtype=torch.float64)
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"target weights must be non-negative with a positive sum, got {w.tolist()}")
        return {i: float(x) for i, x in enumerate((w / w.sum()).tolist()) if x > 0}
    if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < n:
        return {target: 1.0}
    raise ValueError(f"no target {target!r}: give an index 0..{n - 1}, 'all' or None (the most probable)")


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
        ok &= _kind_mask(graph, kinds)
    if features is not None:
        ok &= ~(graph.kind == FEATURE) | _feature_mask(graph, features)
    return ok


def _kind_mask(graph: Graph, kinds: Iterable[str]) -> torch.Tensor:
    kinds = set(kinds)
    bad = kinds - set(KINDS)
    if bad:
        raise ValueError(f"unknown node kinds {sorted(bad)}; choose from {KINDS}")
    return torch.isin(graph.kind, torch.tensor([KINDS.index(k) for k in kinds], dtype=graph.kind.dtype))


def _feature_mask(graph: Graph, features: Iterable[tuple[int, int]]) -> torch.Tensor:
    """``[N]`` bool: feature nodes whose ``(layer, feature)`` is in ``features`` (any position)."""
    allowed = {(int(a), int(b)) for a, b in features}
    hit = [(int(a), int(b)) in allowed for a, b in zip(graph.layer.tolist(), graph.feature.tolist())]
    return (graph.kind == FEATURE) & torch.tensor(hit, dtype=torch.bool)


def _starts(graph: Graph, sources: Iterable[str] | None) -> torch.Tensor:
    """``[N]`` bool: where paths may start: nodes that are not expanded and not targets, of the
    given kinds (None: any)."""
    ok = ~expanded(graph) & (graph.kind != TARGET)
    return ok if sources is None else ok & _kind_mask(graph, sources)


def _must_pass(graph: Graph, through: Iterable[int] | None,
               via_layers: tuple[int, int] | None) -> list[torch.Tensor]:
    """The node sets a path must meet (each at least once)."""
    sets = []
    if through is not None:
        m = torch.zeros(graph.n_nodes, dtype=torch.bool)
        idx = torch.tensor(sorted({int(i) for i in through}), dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= graph.n_nodes):
            raise ValueError(f"`through` names nodes outside the graph (0..{graph.n_nodes - 1})")
        m[idx] = True
        sets.append(m)
    if via_layers is not None:
        lo, hi = via_layers
        sets.append((graph.kind == FEATURE) & (graph.layer >= lo) & (graph.layer <= hi))
    return sets


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


def _check_rank(rank: str, min_length: int) -> None:
    if rank not in RANKS:
        raise ValueError(f"unknown rank {rank!r}; choose from {RANKS}")
    if min_length < 1:
        raise ValueError(f"min_length must be at least 1, got {min_length}")


def top_paths(graph: Graph, n: int = 10, *, target: TargetChoice = None, rank: str = "weight", min_length: int = 2,
              max_depth: int | None = None, sources: Iterable[str] | None = DEFAULT_SOURCES,
              through: Iterable[int] | None = None, via_layers: tuple[int, int] | None = None,
              layers: Iterable[int] | None = None, positions: Iterable[int] | None = None,
              kinds: Iterable[str] | None = None, features: Iterable[tuple[int, int]] | None = None) -> list[Path]:
    """The exact top-``n`` paths into the chosen target(s).

    Dynamic programming over path length ``k = 1, 2, ...``: ``best_k[v]`` holds the ``n`` partial
    paths of exactly ``k`` edges from a start to ``v`` with the largest ``|product|`` of edge
    values (with back-pointers). Since ``|p e| = |p| |e|``, any prefix of a top-``n`` path of
    length ``k`` is among the top ``n`` prefixes of its length at its node, so the best ``n``
    paths of every length are exact, and so is any ranking that is increasing in ``|product|``
    for a fixed length and target. Constraints to pass through node sets run the same search on
    the product of the graph with "which sets were met" flags. Each step is one vectorised pass
    over the edges whose source holds partial paths (bounded as in :func:`_extend`).

    Args:
        n: number of paths.
        target: an index into ``graph.targets``, ``"all"`` (every target, scores weighted by the
            targets' weights, e.g. their probabilities) or None (the target of largest weight).
        rank: ``"weight"``: ``|weight|`` (the contribution in the target's units);
            ``"per-edge"``: the geometric mean over the path's edges of ``|w| / sum |w into the
            edge's row|`` (the share of each row's input the edge carries), which does not
            favour short paths: a six-edge path whose every edge is strong beats a two-edge
            path with a weak edge.
        min_length: at least this many edges (the default 2 passes through at least one
            feature; direct edges are reported by the explained shares).
        max_depth: at most this many edges (None: any length).
        sources: node kinds a path may start at (None: any): embeddings and features whose
            inputs were not computed by default, not bias or error nodes.
        through: node indices; the path must pass through at least one of them.
        via_layers: ``(lo, hi)``; the path must pass through a feature of a layer in
            ``lo..hi`` (inclusive).
        layers, positions, kinds, features: filters every *intermediate* node must pass (see
            :func:`node_filter`).

    Returns:
        up to ``n`` :class:`Path`, highest score first.

    Raises:
        ValueError: a bad ``target``, ``rank``, ``min_length``, kind or node index.
    """
    _check_rank(rank, min_length)
    tw = target_weights_of(graph, target)
    N, E = graph.n_nodes, graph.n_edges
    if n <= 0 or N == 0:
        return []
    gains = edge_gains(graph)
    if rank == "weight":
        value, init = gains, source_scale(graph)
    else:
        total = torch.zeros(N, dtype=torch.float64).index_add_(0, graph.edge_dst, graph.edge_weight.double().abs())
        value = graph.edge_weight.double().abs() / total[graph.edge_dst].clamp_min(1e-300)
        init = torch.ones(N, dtype=torch.float64)
    # The product graph: node v * S + state, state = the bitmask of must-pass sets met so far.
    sets = _must_pass(graph, through, via_layers)
    S, full = 1 << len(sets), (1 << len(sets)) - 1
    bits = torch.zeros(N, dtype=torch.long)
    for i, m in enumerate(sets):
        bits |= m.long() << i
    state = torch.arange(S).repeat_interleave(E)
    src = graph.edge_src.repeat(S) * S + state
    dst = graph.edge_dst.repeat(S) * S + (state | bits[graph.edge_dst.repeat(S)])
    w = value.repeat(S)
    starts = _starts(graph, sources)
    inner = node_filter(graph, layers=layers, positions=positions, kinds=kinds, features=features) & expanded(graph)
    node_ids = torch.arange(N) * S
    is_start = torch.zeros(N * S, dtype=torch.bool)
    is_start[node_ids[starts] + bits[starts]] = True
    can_extend = is_start | inner.repeat_interleave(S)
    tnode = {int(graph.target_nodes[i]): i for i in tw}
    is_target = torch.zeros(N * S, dtype=torch.bool)
    is_target[[v * S + full for v in tnode]] = True

    val = torch.full((N * S, n), float("nan"), dtype=torch.float64)
    val[is_start, 0] = init.repeat_interleave(S)[is_start]
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    found: list[tuple[float, int, int, int]] = []  # (score, length, product-graph node, rank)
    limit = N if max_depth is None else min(max_depth, N)
    chunk = max(1, _CANDIDATES // n)
    for k in range(1, limit + 1):
        live = (~val.isnan()).any(1) & can_extend
        e = live[src].nonzero().flatten()
        if e.numel() == 0:
            break
        val, edge_at, pred_rank = _extend(val, e, src, dst, w, chunk)
        steps.append((edge_at, pred_rank))
        if k < min_length:
            continue
        tn, tr = (is_target[:, None] & ~val.isnan()).nonzero(as_tuple=True)
        for a, b in zip(tn.tolist(), tr.tolist()):
            mag = abs(float(val[a, b]))
            score = (mag if rank == "weight" else mag ** (1.0 / k)) * tw[tnode[a // S]]
            found.append((score, k, a, b))
    found.sort(key=lambda t: (-t[0], t[1], t[2], t[3]))
    out = []
    for score, k, v, r in found[:n]:
        nodes, edges = _backtrack(steps, src, k, v, r)
        g = [float(gains[e % E]) for e in edges]
        g[0] *= float(source_scale(graph)[nodes[0] // S])
        out.append(Path(nodes=[x // S for x in nodes], weight=_product(g), edges=g, score=score,
                        target=tnode[v // S]))
    return out


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


def _backtrack(steps, src: torch.Tensor, k: int, node: int, rank: int) -> tuple[list[int], list[int]]:
    """``(nodes, edges)`` of the partial path of length ``k`` at ``(node, rank)``, source first."""
    nodes, edges = [node], []
    for step in range(k - 1, -1, -1):
        edge_at, pred_rank = steps[step]
        e = int(edge_at[node, rank])
        edges.append(e)
        node, rank = int(src[e]), int(pred_rank[node, rank])
        nodes.append(node)
    return nodes[::-1], edges[::-1]


def _product(edges: list[float]) -> float:
    """Left-to-right product (source to target), the order the searches multiply in."""
    out = 1.0
    for x in edges:
        out *= x
    return out


def greedy_paths(graph: Graph, beam: int = 5, depth: int = 4, *, target: TargetChoice = None, min_length: int = 2,
                 sources: Iterable[str] | None = DEFAULT_SOURCES, layers: Iterable[int] | None = None,
                 positions: Iterable[int] | None = None, kinds: Iterable[str] | None = None,
                 features: Iterable[tuple[int, int]] | None = None) -> list[Path]:
    """Greedy beam search for strong paths (Dunefsky, Chlenski & Nanda 2024, arXiv 2406.11944).

    From the target, every partial path is extended backwards by the ``beam`` strongest
    incoming edges (by ``|w|``, the source's whole contribution to the row) of its earliest
    node that come from an allowed node; after each extension the ``beam`` partial paths whose
    earliest node contributes most to the target along them are kept (per target). A path is
    returned when it reaches an allowed start (same rules as :func:`top_paths`: embeddings and
    features without computed inputs by default, never bias or error nodes) with at least
    ``min_length`` edges; partial paths still open after ``depth`` edges are dropped. Cheaper
    than :func:`top_paths` but not exact.

    Args:
        beam: branching and beam width.
        depth: maximum number of edges.
        target, min_length, sources, layers, positions, kinds, features: as :func:`top_paths`.

    Returns:
        every finished :class:`Path` (source first), by score (``|weight|`` times the target's
        share), highest first.

    Raises:
        ValueError: as :func:`top_paths`.
    """
    _check_rank("weight", min_length)
    tw = target_weights_of(graph, target)
    gains = edge_gains(graph)
    scale = source_scale(graph)
    starts = _starts(graph, sources)
    allowed = starts | (node_filter(graph, layers=layers, positions=positions, kinds=kinds, features=features)
                        & expanded(graph))
    order = graph.edge_dst.argsort(stable=True)
    ptr = torch.zeros(graph.n_nodes + 1, dtype=torch.long)
    ptr[1:] = torch.bincount(graph.edge_dst, minlength=graph.n_nodes).cumsum(0)
    w_abs = graph.edge_weight.double().abs()
    done: list[Path] = []
    for ti, share in tw.items():
        partial: list[tuple[list[int], list[float]]] = [([int(graph.target_nodes[ti])], [])]  # target first
        for _ in range(depth):
            grown = []
            for nodes, edges in partial:
                e = order[ptr[nodes[-1]] : ptr[nodes[-1] + 1]]
                e = e[allowed[graph.edge_src[e]]]
                for j in e[w_abs[e].argsort(descending=True, stable=True)[:beam]].tolist():
                    grown.append((nodes + [int(graph.edge_src[j])], edges + [float(gains[j])]))
            grown.sort(key=lambda p: -abs(_product(p[1][::-1]) * float(scale[p[0][-1]])))
            partial = []
            for nodes, edges in grown[:beam]:
                if not starts[nodes[-1]]:
                    partial.append((nodes, edges))
                elif len(edges) >= min_length:
                    g = edges[::-1]
                    g[0] *= float(scale[nodes[-1]])
                    weight = _product(g)
                    done.append(Path(nodes=nodes[::-1], weight=weight, edges=g, score=abs(weight) * share, target=ti))
            if not partial:
                break
    done.sort(key=lambda p: -p.score)
    return done


def middle_layers(n_layers: int) -> tuple[int, int]:
    """``(lo, hi)``: the middle half of ``n_layers`` layers (inclusive), e.g. 7-22 of 30."""
    q = n_layers // 4
    return q, max(q, n_layers - 1 - q)


def target_units(graph: Graph, target: int) -> str:
    """The unit of a target's value: ``nats`` for logits, ``pre-act`` for feature targets."""
    kind = graph.targets[target].kind
    return {"logit": "nats", "logit_diff": "nats", "logit_group": "nats", "feature": "pre-act"}.get(kind, "units")


def format_path(graph: Graph, path: Path, names: Callable[[int], str] | None = None) -> str:
    """A readable chain from target back to source, e.g.
    ``logit(' Paris')@pos7 <- L8 f123 @pos5 <- emb 'The' @pos0  (+0.0123 nats)``.

    Args:
        names: optional node name function (e.g. adding feature labels); default
            :meth:`Graph.label` with a fallback for unlabelled targets.
    """
    name = names or (lambda i: node_name(graph, i))
    chain = " <- ".join(name(i) for i in reversed(path.nodes))
    return f"{chain}  ({path.weight:+.4g} {target_units(graph, path.target)})"


def node_name(graph: Graph, i: int) -> str:
    """``graph.label(i)``, with a fallback name for targets built without a label."""
    if int(graph.kind[i]) == TARGET:
        t = graph.targets[int((graph.target_nodes == i).nonzero()[0, 0])]
        if not t.label:
            name = {"logit": f"logit(#{t.token})", "logit_diff": f"logit(#{t.token})-logit(#{t.token_b})",
                    "logit_group": "group(" + ",".join(f"{c:+.3g}#{i}" for i, c in zip(t.tokens or (), t.coefs or ())) + ")",
                    "feature": f"L{t.layer} f{t.feature}"}.get(t.kind, t.kind)
            return f"{name}@pos{int(graph.pos[i])}"
    return graph.label(i)


def path_weight(graph: Graph, nodes: list[int]) -> float:
    """The weight (see the module doc) of the path through ``nodes`` (source first); ``0.0`` if
    an edge is missing. Useful to check a path found elsewhere."""
    gains = edge_gains(graph)
    out = float(source_scale(graph)[nodes[0]])
    for a, b in zip(nodes, nodes[1:]):
        m = ((graph.edge_src == a) & (graph.edge_dst == b)).nonzero().flatten()
        if m.numel() == 0:
            return 0.0
        out *= float(gains[m].sum())
    return out


__all__ = ["DEFAULT_SOURCES", "RANKS", "Path", "edge_gains", "format_path", "greedy_paths", "middle_layers", "node_filter",
           "node_name",
           "path_weight", "target_units", "target_weights_of", "top_paths"]
