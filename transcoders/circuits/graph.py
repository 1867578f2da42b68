"""The attribution graph: nodes and sparse, signed, exact edges.

Node kinds (``KINDS``): token ``embedding`` nodes (one per position), ``bias`` nodes (the
constant terms one layer writes at one position: attention and value biases, norm biases
carried through attention and ``W_skip``, ``b_dec``), ``error`` nodes (``MLP output -
transcoder output`` per layer and position), ``feature`` nodes (active transcoder features) and
``target`` nodes (what the graph explains). Edges go from a source node to a *row* node (a
target or a feature whose incoming edges were computed); the weight is the exact direct effect
of the source on the row's value in the local replacement model (pre-activation units for
features; nats for logits).

For every row node ``r``: ``value[r] = sum of incoming edge weights + const[r] + dropped[r]``,
where ``const`` is the row's own bias (``b_enc + W_enc . norm bias``, or ``b_U``) and
``dropped`` is what features left out of the graph (beyond the node budget) contributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .targets import Target

KINDS = ("embedding", "bias", "error", "feature", "target")
EMBEDDING, BIAS, ERROR, FEATURE, TARGET = range(len(KINDS))


def source_name(kind: str, layer: int, pos: int, feature: int = -1, token_strs: list[str] | None = None) -> str:
    """A source node's readable name from its identity: ``L8 f123 @pos5`` (feature), ``err L3
    @pos2``, ``bias L3 @pos2``, ``emb 'The' @pos0`` (``#0`` without token strings)."""
    if kind == "feature":
        return f"L{layer} f{feature} @pos{pos}"
    if kind in ("error", "bias"):
        return f"{'err' if kind == 'error' else 'bias'} L{layer} @pos{pos}"
    tok = repr(token_strs[pos]) if token_strs and 0 <= pos < len(token_strs) else f"#{pos}"
    return f"emb {tok} @pos{pos}"


@dataclass
class Graph:
    """An attribution graph over ``N`` nodes and ``E`` edges.

    Node attributes (tensors ``[N]``): ``kind`` (index into :data:`KINDS`), ``layer`` (-1 for
    embeddings; a target's read layer, ``n_layers`` for logits), ``pos``, ``feature`` (-1 if
    not a feature), ``activation`` (features: activation; errors, biases, embeddings: norm of
    the written vector; targets: value), ``value``, ``const``, ``dropped`` (NaN for nodes
    without computed incoming edges), ``influence`` (share of the targets' weighted influence,
    filled in by :func:`transcoders.circuits.prune.node_influence`).

    Edges (tensors ``[E]``): ``edge_src``, ``edge_dst`` (node indices), ``edge_weight``.
    ``targets`` lists the :class:`Target` of each target node, in node order
    (``target_nodes``).
    """

    tokens: list[int]
    token_strs: list[str]
    n_layers: int
    kind: torch.Tensor
    layer: torch.Tensor
    pos: torch.Tensor
    feature: torch.Tensor
    activation: torch.Tensor
    value: torch.Tensor
    const: torch.Tensor
    dropped: torch.Tensor
    edge_src: torch.Tensor
    edge_dst: torch.Tensor
    edge_weight: torch.Tensor
    targets: list[Target]
    target_nodes: torch.Tensor
    influence: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return int(self.kind.numel())

    @property
    def n_edges(self) -> int:
        return int(self.edge_weight.numel())

    def adjacency(self) -> torch.Tensor:
        """Sparse COO ``[N, N]`` matrix with ``A[dst, src] = weight`` (rows receive)."""
        idx = torch.stack([self.edge_dst, self.edge_src])
        return torch.sparse_coo_tensor(idx, self.edge_weight, (self.n_nodes, self.n_nodes), check_invariants=False).coalesce()

    def nodes_of_kind(self, kind: str) -> torch.Tensor:
        return (self.kind == KINDS.index(kind)).nonzero().flatten()

    def find_feature(self, layer: int, pos: int, feature: int) -> int | None:
        """Node index of feature ``(layer, pos, feature)``, or None if it is not in the graph."""
        hit = ((self.kind == FEATURE) & (self.layer == layer) & (self.pos == pos) & (self.feature == feature)).nonzero()
        return int(hit[0, 0]) if hit.numel() else None

    def label(self, i: int) -> str:
        """A readable node name: ``L8 f123 @pos5``, ``err L3 @pos2``, ``emb 'The' @pos0``..."""
        k, layer, pos = KINDS[int(self.kind[i])], int(self.layer[i]), int(self.pos[i])
        if k != "target":
            return source_name(k, layer, pos, int(self.feature[i]), self.token_strs)
        t = self.targets[int((self.target_nodes == i).nonzero()[0, 0])]
        return f"{t.label or t.kind}@pos{pos}"

    def row_balance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows [R], residual [R])``: the row nodes and, for each, ``value - (sum of incoming
        edge weights + const + dropped)`` in float64; zero up to rounding for an exact graph."""
        rows = (~self.value.isnan()).nonzero().flatten()
        incoming = torch.zeros(self.n_nodes, dtype=torch.float64).index_add_(0, self.edge_dst, self.edge_weight.double())
        return rows, self.value[rows] - (incoming[rows] + self.const[rows] + self.dropped[rows])

    def row_target(self, i: int) -> Target:
        """The :class:`Target` row node ``i`` stands for: a target, or a feature's pre-activation."""
        if int(self.kind[i]) == TARGET:
            return self.targets[int((self.target_nodes == i).nonzero()[0, 0])]
        if int(self.kind[i]) != FEATURE:
            raise ValueError(f"{self.label(i)} is a source only; it has no incoming edges")
        return Target("feature", int(self.pos[i]), layer=int(self.layer[i]), feature=int(self.feature[i]))

    def incoming(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(source nodes, weights)`` of the edges into node ``i``."""
        m = self.edge_dst == i
        return self.edge_src[m], self.edge_weight[m]
