"""Check a graph against interventions.

- Edges: removing a source's write in the frozen model (everything else held) must change the
  edge's row by exactly minus the edge weight.
- Nodes: ablating a feature in the linearised frozen model (other features follow their
  pre-activations, active set frozen) must change each target by the graph's total effect,
  the sum over all graph paths (exact when the graph holds every active feature; with a
  node budget the gap is what the left-out features carry). The same ablation in the free
  replacement model measures how far the linear picture is from the real computation.
- Faithfulness of circuits of growing size k (Marks et al. 2024; Ameisen et al. 2025):
  ``F(C) = (m(C) - m(empty)) / (m(model) - m(empty))``, where C holds the k most influential
  features, every other active feature (graph node) is mean-ablated, inactive features and
  the first position (the attention sink) stay free, and error nodes stay at their clean
  values, in the free replacement model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .graph import FEATURE, TARGET, Graph
from .heads import node_writes
from .interventions import (
    FeatureEdit,
    ReplacementRunner,
    frozen_target_values,
    intervene_frozen,
)
from .replacement import LocalReplacement


@dataclass
class VerifyReport:
    """Predicted versus measured effects; all values in the rows' units (nats for logits)."""

    edges: list[dict] = field(default_factory=list)
    nodes: list[dict] = field(default_factory=list)
    faithfulness: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def predicted_total_effects(graph: Graph, node: int) -> torch.Tensor:
    """``[n_targets]``: the change in each target when feature ``node`` is ablated, summed over
    every path of the graph with features responding linearly (``delta a = delta pre``)."""
    if int(graph.kind[node]) != FEATURE:
        raise ValueError(f"{graph.label(node)} is not a feature node")
    src, dst, w = graph.edge_src, graph.edge_dst, graph.edge_weight.double()
    from_feature = graph.kind[src] == FEATURE
    coef = torch.zeros_like(w)
    coef[from_feature] = w[from_feature] / graph.activation[src[from_feature]]
    delta_a = torch.zeros(graph.n_nodes, dtype=torch.float64)
    delta_a[node] = -graph.activation[node]
    is_feature = graph.kind == FEATURE
    for layer in sorted(set(graph.layer[is_feature].tolist())):
        rows = is_feature & (graph.layer == layer) & ~torch.isnan(graph.value)
        into = rows[dst] & from_feature
        change = torch.zeros(graph.n_nodes, dtype=torch.float64).index_add_(0, dst[into], coef[into] * delta_a[src[into]])
        upd = rows.clone()
        upd[node] = False  # the ablated feature stays at zero
        delta_a[upd] = change[upd]
    into = (graph.kind[dst] == TARGET) & from_feature
    change = torch.zeros(graph.n_nodes, dtype=torch.float64).index_add_(0, dst[into], coef[into] * delta_a[src[into]])
    return change[graph.target_nodes]


def _feature_ranking(graph: Graph) -> torch.Tensor:
    from .prune import node_influence

    infl = graph.influence if graph.influence is not None else node_influence(graph)
    feats = (graph.kind == FEATURE).nonzero().flatten()
    return feats[infl[feats].argsort(descending=True)]


@torch.no_grad()
def check_edges(rep: LocalReplacement, graph: Graph, top: int = 20) -> list[dict]:
    """Remove the source of each of the ``top`` strongest edges (feature, error or embedding
    sources) in the frozen model and compare the row's change with ``-weight``."""
    ok = torch.isin(graph.kind[graph.edge_src], torch.tensor([0, 2, 3]))
    order = graph.edge_weight.abs().masked_fill(~ok, -1).argsort(descending=True)[:top]
    base = rep.forward()
    out = []
    for e in order.tolist():
        if not ok[e]:
            break
        s, d, w = int(graph.edge_src[e]), int(graph.edge_dst[e]), float(graph.edge_weight[e])
        delta = {layer: -v for layer, v in node_writes(rep, graph, s).items()}
        t = graph.row_target(d)
        before = frozen_target_values(rep, base, [t])
        after = frozen_target_values(rep, rep.forward(delta), [t])
        measured = float(after - before)
        out.append({"source": graph.label(s), "row": graph.label(d), "predicted": -w, "measured": measured,
                    "abs_error": abs(measured + w)})
    return out


@torch.no_grad()
def check_nodes(rep: LocalReplacement, graph: Graph, runner: ReplacementRunner | None = None, top: int = 10) -> list[dict]:
    """Ablate each of the ``top`` most influential features: graph prediction versus the
    linearised frozen model and (with ``runner``) the free replacement model."""
    out = []
    for node in _feature_ranking(graph)[:top].tolist():
        edit = FeatureEdit(int(graph.layer[node]), int(graph.feature[node]), "ablate", positions=[int(graph.pos[node])])
        predicted = predicted_total_effects(graph, node)
        b, a = intervene_frozen(rep, [edit], graph.targets, features="linear")
        row = {"node": graph.label(node), "targets": [t.label for t in graph.targets],
               "predicted": predicted.tolist(), "measured_linear": (a - b).double().cpu().tolist()}
        if runner is not None:
            fb, fa = runner.intervene([edit], graph.targets)
            row["measured_free"] = (fa - fb).tolist()
        out.append(row)
    return out


@torch.no_grad()
def faithfulness(runner: ReplacementRunner, graph: Graph, sizes: list[int],
                 means: dict[int, torch.Tensor] | None = None, keep_positions: tuple[int, ...] = (0,)) -> list[dict]:
    """``F(C_k)`` for the ``k`` most influential features (module docstring).

    Args:
        means: ``{layer: [d_sae]}`` mean activations used for ablation (see
            :func:`~transcoders.circuits.interventions.mean_activations`); default: the mean over
            the prompt's positions.
        keep_positions: positions whose features are never ablated. Default: the first, the
            attention sink (BOS), whose features circuit-tracer leaves out of graphs too.
    Returns:
        one dict per k: ``k``, ``F`` per target and their target-weighted mean ``F_mean``.
    """
    clean = runner.clean_activations()
    if means is None:
        means = {layer: a.mean(0) for layer, a in clean.items()}
    targets = graph.targets
    ranking = _feature_ranking(graph)
    # Features at kept positions are never ablated, so they are not candidates for C.
    ranking = ranking[~torch.isin(graph.pos[ranking], torch.tensor(list(keep_positions), dtype=torch.long))]
    full = runner.target_values(runner.run(), targets)
    # The graph's nodes are the features active on the prompt: those outside C are ablated;
    # inactive features are not nodes and stay free (so the whole graph gives F = 1).
    empty_keep = {layer: (a == 0).cpu() for layer, a in clean.items()}
    for m in empty_keep.values():
        m[list(keep_positions)] = True
    empty = runner.target_values(runner.run(keep=empty_keep, means=means), targets)
    weights = torch.tensor([t.weight for t in targets], dtype=torch.float64)
    weights = weights / weights.sum()
    out = []
    for k in sizes:
        keep = {layer: m.clone() for layer, m in empty_keep.items()}
        for node in ranking[:k].tolist():
            keep[int(graph.layer[node])][int(graph.pos[node]), int(graph.feature[node])] = True
        m_c = runner.target_values(runner.run(keep=keep, means=means), targets)
        F = (m_c - empty) / (full - empty)
        out.append({"k": min(k, len(ranking)), "F": F.tolist(), "F_mean": float((F * weights).sum())})
    return out


def verify(rep: LocalReplacement, graph: Graph, *, runner: ReplacementRunner | None = None, top_edges: int = 20,
           top_nodes: int = 10, sizes: list[int] | None = None, means: dict[int, torch.Tensor] | None = None) -> VerifyReport:
    """Run :func:`check_edges`, :func:`check_nodes` and :func:`faithfulness` and summarise.

    ``summary``: ``edge_max_abs_error`` (frozen model, must be ~0), ``node_max_abs_gap_linear``
    (graph paths versus the linearised model; ~0 when the graph holds every active feature),
    ``node_mean_abs_gap_free`` (versus the free replacement model) and the faithfulness curve's
    last ``F_mean``.
    """
    report = VerifyReport()
    report.edges = check_edges(rep, graph, top_edges)
    report.nodes = check_nodes(rep, graph, runner, top_nodes)
    s = report.summary
    s["edge_max_abs_error"] = max((e["abs_error"] for e in report.edges), default=0.0)
    s["edge_max_abs_weight"] = max((abs(e["predicted"]) for e in report.edges), default=0.0)
    gaps = [abs(p - m) for n in report.nodes for p, m in zip(n["predicted"], n["measured_linear"])]
    s["node_max_abs_gap_linear"] = max(gaps, default=0.0)
    if runner is not None:
        free = [abs(p - m) for n in report.nodes for p, m in zip(n["predicted"], n["measured_free"])]
        s["node_mean_abs_gap_free"] = sum(free) / len(free) if free else 0.0
        n_feat = int((graph.kind == FEATURE).sum())
        sizes = sizes or sorted({k for k in (1, 5, 10, 20, 50, 100, 200, 500, n_feat) if k <= n_feat})
        report.faithfulness = faithfulness(runner, graph, sizes, means)
        s["faithfulness"] = {f["k"]: f["F_mean"] for f in report.faithfulness}
    return report
