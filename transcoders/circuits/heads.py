"""Split an attribution edge by the component that first carries it: a residual read, a
transcoder's ``W_skip`` path, or one attention head moving it from the source position to a
destination position.

A source writes ``v`` into ``resid_post[l]`` at position ``q``. Travelling up the residual stream
unchanged, ``v`` is first picked up either by the target itself (if it reads position ``q``),
by the skip path of a later layer, or by head ``h`` of a later layer ``m``, which moves
``A[m, h][r, q] * norm(v) W_V W_O`` to destination ``r``. Everything that happens after that
first component is in the full gradient ``G`` of the target, so the parts sum exactly to the
edge weight. For an edge between features this is the per-head factorisation of Dunefsky et
al. (2024): activation x (attention weight x OV virtual weight onto the gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attribution import Read, SourceIndex, attribution_rows, row_read
from .graph import EMBEDDING, ERROR, FEATURE, Graph
from .replacement import LocalReplacement


@dataclass
class EdgeComponent:
    """One part of an edge: ``kind`` is ``residual`` (read directly at the source position),
    ``skip`` (a transcoder's ``W_skip`` path at ``layer``) or ``head`` (``layer``, ``head``,
    moving from ``src_pos`` to ``dst_pos``); ``weight`` in the row's units."""

    kind: str
    layer: int
    head: int
    src_pos: int
    dst_pos: int
    weight: float

    def describe(self) -> str:
        if self.kind == "head":
            return f"head {self.layer}.{self.head} from pos{self.src_pos} to pos{self.dst_pos}"
        if self.kind == "skip":
            return f"skip L{self.layer} @pos{self.src_pos}"
        return f"residual @pos{self.src_pos}"


@torch.no_grad()
def _gradients(rep: LocalReplacement, read: Read) -> tuple[dict, dict]:
    """The row's gradient where each layer's attention writes and on ``resid_post``, per layer
    (``[T, d]`` each), from the same backward sweep that computes attribution rows."""
    record: dict = {}
    attribution_rows(rep, [read], SourceIndex(rep), record=record)
    return ({m: g[0] for m, g in record.get("attn", {}).items()},
            {m: g[0] for m, g in record.get("post", {}).items()})


def source_writes(rep: LocalReplacement, graph: Graph, node: int) -> tuple[int, list[tuple[int, torch.Tensor]]]:
    """``(pos, [(layer, v [d])])``: where a feature, error or embedding node writes, one entry per
    ``resid_post`` layer it enters (-1: the embeddings; a CLT feature enters several)."""
    if int(graph.kind[node]) == FEATURE and rep.clt is not None:
        layer, f, a = int(graph.layer[node]), int(graph.feature[node]), float(graph.activation[node])
        return int(graph.pos[node]), [(t, a * rep.decoder(layer, t)[f]) for t in rep.write_targets(layer)]
    layer, pos, v = source_write(rep, graph, node)
    return pos, [(layer, v)]


def _visible(read: Read, layer: int) -> bool:
    """Whether a write into ``resid_post[layer]`` can reach the row: a feature row of layer ``l``
    reads before its own MLP, so writes from layer ``l`` on are past it."""
    return layer < read.site[1] if read.site[0] == "mlp" else layer <= read.site[1]


def split_source(rep: LocalReplacement, read: Read, G_attn: dict, G_post: dict, graph: Graph, node: int,
                 cache: dict | None = None) -> list[EdgeComponent]:
    """:func:`split_write` of everything node ``node`` writes (every layer a CLT feature writes
    into, parts of the same head, skip path or residual summed), largest |weight| first."""
    q, writes = source_writes(rep, graph, node)
    merged: dict[tuple, float] = {}
    for layer, v in writes:
        if _visible(read, layer):
            for p in split_write(rep, read, G_attn, G_post, layer, q, v, cache):
                key = (p.kind, p.layer, p.head, p.src_pos, p.dst_pos)
                merged[key] = merged.get(key, 0.0) + p.weight
    parts = [EdgeComponent(*key, w) for key, w in merged.items() if w != 0.0]
    return sorted(parts, key=lambda p: -abs(p.weight))


def node_writes(rep: LocalReplacement, graph: Graph, node: int) -> dict[int, torch.Tensor]:
    """:func:`source_writes` as ``{layer: [T, d]}`` writes into the residual stream."""
    q, writes = source_writes(rep, graph, node)
    return {layer: _at(v, q, rep) for layer, v in writes}


def source_write(rep: LocalReplacement, graph: Graph, node: int) -> tuple[int, int, torch.Tensor]:
    """``(layer, pos, v [d])``: what a feature, error or embedding node writes into
    ``resid_post[layer]`` (layer -1: the embeddings).

    Raises:
        ReplacementError: a feature of a cross-layer transcoder (it writes into several
            layers: see :func:`source_writes`).
    """
    kind, layer, pos = int(graph.kind[node]), int(graph.layer[node]), int(graph.pos[node])
    if kind == FEATURE:
        rep.require_per_layer("one write per source")
        w = rep.coder_weight(layer, "W_dec")[int(graph.feature[node])]
        return layer, pos, float(graph.activation[node]) * w
    if kind == ERROR:
        return layer, pos, rep.layers[layer].error[pos]
    if kind == EMBEDDING:
        return -1, pos, rep.resid0[pos]
    raise ValueError(f"node {graph.label(node)} is not a feature, error or embedding node; only those can be split")


@torch.no_grad()
def split_edge(rep: LocalReplacement, graph: Graph, src: int, dst: int) -> list[EdgeComponent]:
    """Split the edge ``src -> dst`` into residual, skip and per-head parts (see module doc).

    Args:
        rep: the replacement model the graph was built from.
        src: a feature, error or embedding node; dst: a target or feature row node.
    Returns:
        non-zero components, largest |weight| first; their weights sum to the edge weight.
    """
    read = row_read(rep, graph, dst)
    G_attn, G_post = _gradients(rep, read)
    return split_source(rep, read, G_attn, G_post, graph, src)


def split_write(rep: LocalReplacement, read: Read, G_attn: dict, G_post: dict, layer: int, q: int,
                v: torch.Tensor, cache: dict | None = None) -> list[EdgeComponent]:
    """:func:`split_edge` for a write ``v [d]`` into ``resid_post[layer]`` at position ``q`` and a
    row's read with its gradients ``G_attn``, ``G_post`` (``{layer: [T, d]}``, as
    ``attribution_rows(..., record=)`` gives them), so many edges can share one backward sweep.
    ``cache``: a dict kept per row, to reuse its per-layer head gradients across edges."""
    cache = {} if cache is None else cache
    parts = [EdgeComponent("residual", read.site[1], -1, q, q, float(read.grad[q] @ v))]
    for m in range(layer + 1, read.site[1] + 1):
        fl = rep.layers[m]
        H, E, d = fl.W_O.shape
        if m not in cache:  # the row's gradient on each head's mixed values, [T, H, d_head]
            g_attn = G_attn[m] if fl.attn_out_norm is None else fl.attn_out_norm.transpose(G_attn[m])
            cache[m] = (g_attn @ fl.W_O.reshape(H * E, d).T).view(-1, H, E)
        # Attention of layer m reads v at position q (it is in resid_pre[m]) ...
        x = fl.ln_attn.linear(_at(v, q, rep))[q]
        u = (x @ fl.W_V.permute(1, 0, 2).reshape(d, -1)).view(-1, E).repeat_interleave(fl.group, 0)  # [H, d_head]
        w = fl.pattern[:, :, q] * (cache[m] * u).sum(-1).T  # [H, T]
        nz = w != 0
        for (h, r), x in zip(nz.nonzero().tolist(), w[nz].tolist()):
            parts.append(EdgeComponent("head", m, h, q, r, x))
        # ... and so does layer m's skip path (resid_mid[m], or resid_pre[m] when parallel).
        if fl.W_skip is not None:
            x = fl.ln_mlp.linear(_at(v, q, rep))[q]
            parts.append(EdgeComponent("skip", m, -1, q, q, float((x @ fl.W_skip) @ G_post[m][q])))
    parts = [p for p in parts if p.weight != 0.0]
    return sorted(parts, key=lambda p: -abs(p.weight))


def _at(v: torch.Tensor, q: int, rep: LocalReplacement) -> torch.Tensor:
    out = torch.zeros(rep.n_pos, rep.d_model, dtype=rep.dtype, device=rep.device)
    out[q] = v
    return out


@torch.no_grad()
def split_edge_last(rep: LocalReplacement, graph: Graph, src: int, dst: int) -> list[EdgeComponent]:
    """Split the edge ``src -> dst`` by the *last* component writing into the row's position.

    The row reads the residual stream at its position ``p``; in the frozen model that stream is
    the sum of everything written at ``p``, so the edge is exactly ``r . v`` (the source itself,
    if it sits at ``p``) plus, for every head ``(m, h)`` and skip path, ``r . (the change the
    source causes in what it writes at p)``, whatever route the source took to reach it.
    This names the heads that bring information *into* the row's position (``src_pos`` of a
    head part is then the source's position, ``dst_pos`` = ``p``).

    Returns:
        non-zero components, largest |weight| first; weights sum to the edge weight.
    """
    read = row_read(rep, graph, dst)
    q, writes = source_writes(rep, graph, src)
    later = {layer: v for layer, v in writes[1:] if _visible(read, layer)}  # a CLT feature's later writes
    layer, v = writes[0]
    p = int(graph.pos[dst])
    # The read vector on the residual stream at p (already through the row's frozen norm).
    r = read.grad[p]
    delta = _at(v, q, rep)
    direct = float(r @ delta[p]) + sum(float(r @ w) for w in later.values()) * (q == p)
    parts = [EdgeComponent("residual", read.site[1], -1, q, p, direct)]
    top = read.site[1]
    for m in range(layer + 1, top + 1):
        fl = rep.layers[m]
        last = m == top and read.site[0] == "mlp"  # a feature row reads this block's resid_mid / resid_pre
        x = fl.ln_attn.linear(delta)
        vv = torch.einsum("td,gde->gte", x, fl.W_V).repeat_interleave(fl.group, 0)  # [H, T, d_head]
        z = torch.einsum("hts,hse->hte", fl.pattern, vv)  # [H, T, d_head]
        out = torch.einsum("hte,hed->htd", z, fl.W_O)  # [H, T, d]
        if fl.attn_out_norm is not None:
            out = fl.attn_out_norm.linear(out)
        if not (last and fl.parallel):  # a parallel block's MLP does not see its own attention
            for h in range(out.shape[0]):
                parts.append(EdgeComponent("head", m, h, q, p, float(r @ out[h, p])))
        mid = delta if fl.parallel else delta + out.sum(0)
        if last:
            break
        new = mid + (out.sum(0) if fl.parallel else 0)
        if fl.W_skip is not None:
            skip = fl.ln_mlp.linear(mid) @ fl.W_skip
            parts.append(EdgeComponent("skip", m, -1, q, p, float(r @ skip[p])))
            new = new + skip
        if m in later:
            new = new + _at(later[m], q, rep)
        delta = new
    parts = [c for c in parts if c.weight != 0.0]
    return sorted(parts, key=lambda c: -abs(c.weight))


@dataclass
class HeadFlow:
    """What attention heads move into a target's position (see :func:`heads_into_position`).

    Attributes:
        heads: ``[(layer, head, amount)]``, largest ``|amount|`` first, in the target's units.
        split: the summed amount of the edges that were split (``n_split`` of them).
        total: the summed amount of every edge into the position from another position
            (``n_total`` edges), including those from bias nodes, which are not split.
    """

    heads: list[tuple[int, int, float]]
    split: float
    n_split: int
    total: float
    n_total: int


@torch.no_grad()
def heads_into_position(rep: LocalReplacement, graph: Graph, target: int, n_edges: int = 20) -> HeadFlow:
    """The attention heads that move the most of target ``graph.targets[target]`` into its
    position ``p``.

    Every edge ``s -> r`` from another position into a row ``r`` at ``p`` (a feature there, or
    the target) carries ``w * G(r)`` of the target (``G(r)``: the target's derivative with respect
    to ``r``'s pre-activation, :func:`~transcoders.circuits.contributions.per_unit_effects`). The
    ``n_edges`` largest of these, from features, error nodes and embeddings, are split exactly by
    the last component writing into ``p`` (:func:`split_edge_last`), and each head's parts are
    summed.

    Raises:
        IndexError: ``target`` is not an index into ``graph.targets``.
    """
    from .contributions import per_unit_effects

    t = int(graph.target_nodes[target])
    p = int(graph.pos[t])
    g = per_unit_effects(graph, target)
    src, dst = graph.edge_src, graph.edge_dst
    cross = (graph.pos[dst] == p) & (graph.pos[src] != p) & (g[dst] != 0)
    amount = graph.edge_weight.double() * g[dst]
    e_all = cross.nonzero().flatten()
    splittable = e_all[torch.isin(graph.kind[src[e_all]], torch.tensor([FEATURE, ERROR, EMBEDDING]))]
    pick = splittable[amount[splittable].abs().argsort(descending=True, stable=True)[:n_edges]]
    heads: dict[tuple[int, int], float] = {}
    for e in pick.tolist():
        for c in split_edge_last(rep, graph, int(src[e]), int(dst[e])):
            if c.kind == "head":
                heads[(c.layer, c.head)] = heads.get((c.layer, c.head), 0.0) + c.weight * float(g[dst[e]])
    ranked = sorted(((lh[0], lh[1], a) for lh, a in heads.items()), key=lambda x: -abs(x[2]))
    return HeadFlow(heads=ranked, split=float(amount[pick].sum()), n_split=int(pick.numel()),
                    total=float(amount[e_all].sum()), n_total=int(e_all.numel()))
