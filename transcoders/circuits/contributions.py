"""What a target's value is made of: each node's total effect, and the explained shares.

In the linearised local replacement model (attention patterns and norms frozen, each active
feature responding linearly to its pre-activation, ``delta a = delta pre``; the model
:mod:`transcoders.circuits.verify` checks graphs against), a row node's value expands exactly
into paths (see :mod:`transcoders.circuits.paths`): for the target ``t``,

    value(t) = sum over paths p from a start s:  weight(p)
             + sum over rows r:  (const(r) + dropped(r) + a(r) - pre(r)) * G(r),

where ``G(r)`` is ``d value(t) / d pre(r)`` (1 for ``t`` itself) and starts are embeddings, bias
and error nodes and features whose inputs were not computed. ``a - pre`` is zero for ReLU,
JumpReLU and TopK transcoders. Grouping the terms by where they start gives the *explained
shares* a reader needs to judge a path listing (is the story shown most of the story?), and
``C(n) = a(n) G(n)`` for a feature is its *total effect*: direct plus indirect, what ablating
it changes the target by in the linearised model (with the sign flipped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .graph import BIAS, EMBEDDING, ERROR, FEATURE, Graph
from .paths import Path, edge_gains, expanded, source_scale, target_units
from .prune import propagate


def total_effects(graph: Graph, target: int) -> torch.Tensor:
    """``[N]`` float64: each node's total (direct plus indirect) contribution to target
    ``graph.targets[target]``, in its units (nats for logits).

    For an embedding, bias or error node and for a feature whose inputs were not computed: the
    sum of the weights of all paths from it. For a feature with computed inputs: ``a * G``,
    its activation times the target's derivative with respect to it (through every path of the
    graph), i.e. minus the change of the target when the feature is ablated in the linearised
    model. Zero for nodes without a path to the target; the target's own entry is its value.

    Raises:
        IndexError: ``target`` is not an index into ``graph.targets``.
    """
    t = int(graph.target_nodes[target])
    out = per_unit_effects(graph, target) * source_scale(graph)
    out[t] = float(graph.value[t])
    return out


def per_unit_effects(graph: Graph, target: int) -> torch.Tensor:
    """``[N]`` float64: for each node, the sum over its paths to target ``graph.targets[target]``
    of the product of edge gains: ``d value / d a`` (= ``d value / d pre``) for a feature with
    computed inputs, the total contribution for every other start; 1 at the target.

    Raises:
        IndexError: ``target`` is not an index into ``graph.targets``.
    """
    t = int(graph.target_nodes[target])
    x0 = torch.zeros(graph.n_nodes, dtype=torch.float64)
    x0[t] = 1.0
    return x0 + propagate(graph.n_nodes, graph.edge_src, graph.edge_dst, edge_gains(graph), x0, graph.layer)


@dataclass
class Shares:
    """The target's value split by where each term starts; ``parts`` sum to ``value``.

    Attributes:
        target: index into ``graph.targets``; ``label``, ``units``: its name and unit.
        value: the target's value.
        parts: ``{name: amount}`` in the target's units: ``embeddings via features`` (paths from
            the prompt's tokens through at least one feature), ``embeddings directly`` (token ->
            target edges: attention and the residual stream only), ``bias nodes``, ``error
            nodes`` (all their paths), ``features without computed inputs``, ``constants``
            (``b_enc`` and the like on every row, ``b_U``), ``left out of the graph`` (features
            beyond the node budget or pruned away) and ``activation offsets`` (``a - pre``).
        listed: the summed weight of the paths passed in (each one a term of the value), and
            ``n_listed`` their number.
    """

    target: int
    label: str
    units: str
    value: float
    parts: dict[str, float] = field(default_factory=dict)
    listed: float = 0.0
    n_listed: int = 0

    def share(self, amount: float) -> float:
        """``amount / value`` (NaN for a zero value)."""
        return amount / self.value if self.value else float("nan")

    def table(self) -> list[str]:
        """Lines for a terminal: each part with its amount and share of the value."""
        rows = [(f"listed paths ({self.n_listed})", self.listed)] if self.n_listed else []
        rows += [(k, v) for k, v in self.parts.items() if k != "activation offsets" or abs(v) > 1e-5 * abs(self.value)]
        width = max(len(k) for k, _ in rows + [("total", 0.0)])
        lines = [f"  {k:<{width}} {v:>+10.3f} {100 * self.share(v):>7.1f}%" for k, v in rows]
        total = sum(self.parts.values())
        lines.append(f"  {'total':<{width}} {total:>+10.3f} {100 * self.share(total):>7.1f}%")
        return lines


def explained_shares(graph: Graph, target: int, paths: list[Path] = ()) -> Shares:
    """How much of target ``graph.targets[target]`` each kind of term carries (module doc).

    Args:
        paths: paths into this target (e.g. from :func:`~transcoders.circuits.paths.top_paths`);
            their summed weight is reported as ``listed``.

    Returns:
        a :class:`Shares` whose ``parts`` sum to the target's value (up to float64 rounding, on
        any graph whose rows satisfy ``value = incoming + const + dropped``).

    Raises:
        IndexError: ``target`` is not an index into ``graph.targets``.
        ValueError: a path ends at another target.
    """
    t = int(graph.target_nodes[target])
    per_unit = per_unit_effects(graph, target)
    effect = per_unit * source_scale(graph)
    kind, thru = graph.kind, expanded(graph)
    start = ~thru & ~torch.isin(torch.arange(graph.n_nodes), graph.target_nodes)
    is_emb = kind == EMBEDDING
    direct_emb = float(graph.edge_weight.double()[is_emb[graph.edge_src] & (graph.edge_dst == t)].sum())
    rows = thru.clone()
    rows[t] = True
    g = torch.where(rows, per_unit, 0.0)
    act_offset = torch.where(thru, graph.activation.double() - graph.value.double(), 0.0)
    total = lambda m: float(effect[m].sum())
    parts = {
        "embeddings via features": total(start & is_emb) - direct_emb,
        "embeddings directly": direct_emb,
        "bias nodes": total(start & (kind == BIAS)),
        "error nodes": total(start & (kind == ERROR)),
        "features without computed inputs": total(start & (kind == FEATURE)),
        "constants": float((graph.const.double().nan_to_num(0.0) * g).sum()),
        "left out of the graph": float((graph.dropped.double().nan_to_num(0.0) * g).sum()),
        "activation offsets": float((act_offset * g).sum()),
    }
    if not bool((start & (kind == FEATURE)).any()):
        del parts["features without computed inputs"]
    for p in paths:
        if p.nodes[-1] != t:
            raise ValueError(f"a path ends at {graph.label(p.nodes[-1])}, not at the target {graph.label(t)}")
    tg = graph.targets[target]
    return Shares(target=target, label=tg.label or tg.kind, units=target_units(graph, target),
                  value=float(graph.value[t]), parts=parts, listed=sum(p.weight for p in paths), n_listed=len(paths))


def top_effects(graph: Graph, target: int, n: int = 12, per_position: int | None = None) -> list[tuple[int, float]]:
    """The ``n`` feature nodes with the largest ``|total effect|`` on the target:
    ``[(node, effect)]``, largest first (see :func:`total_effects`).

    Args:
        per_position: at most this many from one prompt position (None: no cap), so that one
            position (often the first, where attention sinks) cannot fill the list.
    """
    effect = total_effects(graph, target)
    feats = (graph.kind == FEATURE).nonzero().flatten()
    order = feats[effect[feats].abs().argsort(descending=True, stable=True)]
    out, taken = [], {}
    for i in order.tolist():
        pos = int(graph.pos[i])
        if per_position is not None and taken.get(pos, 0) >= per_position:
            continue
        taken[pos] = taken.get(pos, 0) + 1
        out.append((i, float(effect[i])))
        if len(out) == n:
            break
    return out


__all__ = ["Shares", "explained_shares", "per_unit_effects", "top_effects", "total_effects"]
