"""A faithfulness benchmark for transcoder circuits, with component- and neuron-level baselines
on the same prompts.

Faithfulness of a circuit ``C`` (Marks et al. 2024; Mueller et al. 2025, "MIB: A Mechanistic
Interpretability Benchmark", arXiv 2504.13151, circuit localization track)::

    F(C) = (m(C) - m(empty)) / (m(full) - m(empty))

where ``m`` is the task metric (:func:`~transcoders.circuits.eap.task_metric`: the targets' values
on the logits, e.g. a logit difference in nats), ``full`` keeps everything (the model) and
``empty`` ablates every candidate. Ablation sets what is outside ``C`` to its value on the
item's *counterfactual* prompt (which must have as many tokens as the prompt) or to its *mean*
over reference text.

Circuits, one per prompt for every method (each prompt has its own attribution graph, so the
baselines are found per prompt too; MIB finds one circuit per task):

- ``features``: the top fraction of the prompt's active transcoder features by graph influence
  (:func:`~transcoders.circuits.prune.node_influence`) in the *free* replacement model
  (:class:`~transcoders.circuits.interventions.ReplacementRunner`: every MLP is its transcoder
  plus the clean error node; attention, norms and features recomputed). Fractions are of
  *features* (graph nodes), not edges: an edge circuit would need every edge patched separately,
  which the free replacement model cannot do (a feature's activation is one number for all of its
  outgoing edges). The feature candidates are the features active on the prompt outside
  ``keep_positions``; features of the graph come first by influence, active features beyond the
  graph's node budget after them by activation. Inactive features and error nodes stay free /
  clean, so the full circuit is the model exactly (as :func:`~transcoders.circuits.verify.faithfulness`).
- ``eap-ig``: the top fraction of the *edges* between attention heads, MLPs, the embeddings and
  the logits of the original model by EAP-IG (:mod:`~transcoders.circuits.eap`), evaluated by
  patching the other edges exactly.
- ``neurons``: the top ``k`` MLP neurons ``(layer, pos, i)`` by attribution
  (:mod:`~transcoders.circuits.neurons`) with the *same k* as the feature circuit at each fraction
  (Dunefsky et al. 2024's features-versus-neurons comparison), so at 100 % the neuron circuit holds
  as many neurons as the prompt has active features (not every neuron: F need not reach 1).

Areas (MIB's ``evaluate_area_under_curve``): the trapezoid rule over the fractions themselves on a
linear axis (``0.001 ... 1``; no point at 0, no rescaling; MIB's default ``log_scale=False``)::

    CPR = sum_i (x_{i+1} - x_i) (F_i + F_{i+1}) / 2                (higher is better)
    CMD = sum_i (x_{i+1} - x_i) (|1 - F_i| + |1 - F_{i+1}|) / 2    (lower is better)

MIB reads CPR off circuits chosen by *signed* scores and CMD off circuits chosen by *absolute*
scores; features are ranked by influence (non-negative), so one curve gives both. Over a task,
F at each fraction is MIB's ratio of means, ``(mean m(C) - mean m(empty)) / (mean m(full) - mean
m(empty))`` over the prompts; the mean of the per-prompt F is reported too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..coders.coder import SparseCoder
from ..models.adapters import ModelAdapter
from .eap import (
    ComponentRunner,
    ablated_outputs,
    check_logit_targets,
    eap_ig_scores,
    edge_circuit_values,
    embeddings_in,
    fraction_sizes,
    task_metric,
)
from .graph import FEATURE, Graph
from .interventions import ReplacementRunner, mean_activations
from .neurons import NeuronRunner, neuron_circuit_values, neuron_scores
from .targets import Target

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
METHODS = ("features", "eap-ig", "neurons")
ABLATIONS = ("counterfactual", "mean")
UNITS = {"features": "features", "eap-ig": "edges", "neurons": "neurons"}


class BenchmarkError(ValueError):
    """A task item or setting the benchmark cannot use (the message names the fix)."""


# ------------------------------------------------------------------------------ F and areas
def faithfulness_values(m_circuit: Sequence[float], m_full: float, m_empty: float) -> list[float]:
    """``F = (m(C) - m(empty)) / (m(full) - m(empty))`` for each circuit; NaN when the full and
    the empty circuit give the same metric (nothing to explain)."""
    den = m_full - m_empty
    return [(m - m_empty) / den if den != 0 else math.nan for m in m_circuit]


def areas(fractions: Sequence[float], F: Sequence[float], *, log_x: bool = False) -> dict[str, float]:
    """MIB's areas of a faithfulness curve (module docstring): ``{"cpr": area under F, "cmd":
    area between F and 1}``, trapezoids over ``fractions`` (``ln(fraction)`` with ``log_x``).

    Raises:
        ValueError: fewer than two points, lengths that differ, or fractions not increasing.
    """
    if len(fractions) != len(F):
        raise ValueError(f"{len(fractions)} fractions but {len(F)} faithfulness values")
    if len(fractions) < 2:
        raise ValueError("an area needs at least two fractions")
    if any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise ValueError(f"fractions must increase, got {list(fractions)}")
    x = [math.log(f) for f in fractions] if log_x else list(fractions)
    cpr = cmd = 0.0
    for i in range(len(x) - 1):
        w = x[i + 1] - x[i]
        cpr += w * (F[i] + F[i + 1]) / 2
        cmd += w * (abs(1.0 - F[i]) + abs(1.0 - F[i + 1])) / 2
    return {"cpr": cpr, "cmd": cmd}


@dataclass
class Curve:
    """The metric along one method's circuits on one prompt.

    ``method`` (``features``, ``eap-ig``, ``neurons``), ``ablation`` (``counterfactual``,
    ``mean``), ``ranking`` (``influence``, ``signed``, ``absolute``), ``unit`` (what the circuit
    counts), ``sizes`` (circuit size at each fraction), ``n_total`` (candidates; for neurons, the
    neuron count), ``m_full``, ``m_empty``, ``m_circuit`` (metric units), ``seconds`` (finding and
    evaluating the circuits).
    """

    method: str
    ablation: str
    ranking: str
    unit: str
    fractions: list[float]
    sizes: list[int]
    n_total: int
    m_full: float
    m_empty: float
    m_circuit: list[float]
    seconds: float = 0.0

    @property
    def F(self) -> list[float]:
        return faithfulness_values(self.m_circuit, self.m_full, self.m_empty)

    def to_dict(self) -> dict:
        return {**asdict(self), "F": self.F}


# ------------------------------------------------------------------------------ features
def feature_ranking(graph: Graph, clean: dict[int, torch.Tensor], keep_positions: Sequence[int] = ()) -> torch.Tensor:
    """``[n, 3]`` long ``(layer, pos, feature)``: the prompt's active features outside
    ``keep_positions``, the graph's features by influence first (descending, computed if the
    graph has none), then active features the graph left out (node budget) by activation.

    Args:
        clean: ``{layer: [T, d_sae]}`` feature activations on the prompt.
    """
    from .prune import node_influence

    infl = graph.influence if graph.influence is not None else node_influence(graph)
    feats = (graph.kind == FEATURE).nonzero().flatten()
    feats = feats[~torch.isin(graph.pos[feats], torch.tensor(list(keep_positions), dtype=torch.long))]
    feats = feats[infl[feats].argsort(descending=True, stable=True)]
    ranked = torch.stack([graph.layer[feats], graph.pos[feats], graph.feature[feats]], dim=1).long()
    in_graph = {tuple(r) for r in ranked.tolist()}
    rest = []
    for layer in sorted(clean):
        a = clean[layer].detach().float().cpu().clone()
        a[list(keep_positions)] = 0
        for pos, f in a.nonzero().tolist():
            if (layer, pos, f) not in in_graph:
                rest.append((float(a[pos, f]), layer, pos, f))
    rest.sort(key=lambda r: (-r[0], r[1], r[2], r[3]))
    if rest:
        ranked = torch.cat([ranked, torch.tensor([r[1:] for r in rest], dtype=torch.long)])
    return ranked


@torch.no_grad()
def faithfulness_curve(runner: ReplacementRunner, graph: Graph, targets: Sequence[Target],
                       fractions: Sequence[float] = FRACTIONS, *, reference: dict[int, torch.Tensor],
                       ablation: str = "counterfactual", keep_positions: Sequence[int] = ()) -> Curve:
    """F of the transcoder circuits made of the top fractions of the prompt's features (module
    docstring) in the free replacement model.

    Args:
        runner: the replacement model of the prompt.
        graph: its attribution graph (influence ranks the features).
        targets: the metric's targets (on the logits).
        fractions: circuit sizes as fractions of the candidate features, in ``(0, 1]``.
        reference: ``{layer: [T, d_sae]}`` the counterfactual prompt's feature activations
            (``ReplacementRunner(adapter, coders, cf_tokens).clean_activations()``) or
            ``{layer: [d_sae]}`` means (:func:`~transcoders.circuits.interventions.mean_activations`).
        ablation: the name recorded (``counterfactual`` or ``mean``).
        keep_positions: positions whose features are never ablated (e.g. the attention sink).

    Raises:
        BenchmarkError: counterfactual activations of another length than the prompt.
    """
    t0 = time.perf_counter()
    check_logit_targets(targets)
    clean = runner.clean_activations()
    T = runner.tokens.numel()
    for ref in reference.values():
        if ref.dim() == 2 and ref.shape[0] != T:
            raise BenchmarkError(f"the counterfactual activations cover {ref.shape[0]} positions but the prompt has "
                                 f"{T}: the counterfactual prompt must have as many tokens as the prompt")
    ranking = feature_ranking(graph, clean, keep_positions)
    sizes = fraction_sizes(fractions, len(ranking))
    free = {layer: (a == 0).cpu() for layer, a in clean.items()}
    for m in free.values():
        m[list(keep_positions)] = True
    m = lambda keep: float(task_metric(targets, runner.run(keep=keep, means=reference)["logits"]))
    full = float(task_metric(targets, runner.run()["logits"]))
    empty = m(free)
    values = []
    for k in sizes:
        keep = {layer: f.clone() for layer, f in free.items()}
        for layer, pos, f in ranking[:k].tolist():
            keep[layer][pos, f] = True
        values.append(m(keep))
    return Curve("features", ablation, "influence", "features", list(fractions), sizes, len(ranking), full, empty,
                 values, time.perf_counter() - t0)


# ------------------------------------------------------------------------------ references
@dataclass
class ReferenceMeans:
    """Mean ablation values over reference text: ``features {layer: [d_sae]}``, ``components
    [n_sources, d]`` (:class:`~transcoders.circuits.eap.ComponentRunner` sources; ``components[0]``
    is the mean embedding IG starts from), ``neurons {layer: [d_mlp]}``, ``resid0 [d]`` (the mean
    embedding block 0 reads, where IG starts for the neurons); None where not needed."""

    features: dict[int, torch.Tensor] | None = None
    components: torch.Tensor | None = None
    neurons: dict[int, torch.Tensor] | None = None
    resid0: torch.Tensor | None = None


@torch.no_grad()
def reference_means(adapter: ModelAdapter, coders: dict[int, SparseCoder], contexts: Sequence[torch.Tensor],
                    methods: Iterable[str] = METHODS) -> ReferenceMeans:
    """Mean activations of each method's units over ``contexts`` (``[ctx]`` token tensors or the
    rows of ``[n, ctx]``), each context's first position (the attention sink) left out.

    Raises:
        ValueError: no positions to average over.
    """
    methods = set(methods)
    contexts = [torch.as_tensor(c, dtype=torch.long).flatten() for c in contexts]
    out = ReferenceMeans()
    if "features" in methods or "neurons" in methods:
        total, count = None, 0
        for c in contexts:
            n = c.numel() - 1
            if n <= 0:
                continue
            means = mean_activations(adapter, coders, c[None])
            total = {k: v.double() * n for k, v in means.items()} if total is None else {
                k: total[k] + v.double() * n for k, v in means.items()}
            count += n
        if not count:
            raise ValueError("no reference positions to average over: give longer or more contexts")
        out.features = {k: (v / count).float() for k, v in total.items()}
    if "eap-ig" in methods:
        out.components = ComponentRunner(adapter).mean_outputs(contexts)
    if "neurons" in methods:
        out.neurons = NeuronRunner(adapter).mean_hidden(contexts)
        embs = [embeddings_in(adapter, c)[1:].double() for c in contexts if c.numel() > 1]
        out.resid0 = (torch.cat(embs).mean(0)).to(adapter.dtype)
    return out


# ------------------------------------------------------------------------------ one prompt
@dataclass
class BenchmarkItem:
    """One task item: ``tokens [T]``, ``cf_tokens [T]`` (the counterfactual prompt, same length),
    ``targets`` (on the logits), and the texts for the report."""

    tokens: torch.Tensor
    cf_tokens: torch.Tensor | None
    targets: list[Target]
    prompt: str = ""
    counterfactual: str = ""
    target_spec: str = ""
    meta: dict = field(default_factory=dict)


def check_item(item: BenchmarkItem, ablations: Sequence[str]) -> None:
    """Raise :class:`BenchmarkError` unless ``item`` can be run with ``ablations``: a
    counterfactual prompt of the prompt's length for counterfactual ablation, logit targets."""
    check_logit_targets(item.targets)
    if "counterfactual" in ablations:
        if item.cf_tokens is None:
            raise BenchmarkError(f"item {item.prompt!r} has no counterfactual prompt; give one or use --ablations mean")
        n, m = int(item.tokens.numel()), int(item.cf_tokens.numel())
        if n != m:
            raise BenchmarkError(f"the prompt {item.prompt!r} has {n} tokens but its counterfactual "
                                 f"{item.counterfactual!r} has {m}; counterfactual patching needs prompts of the same "
                                 "length (change the counterfactual so that it tokenizes to as many tokens)")


def benchmark_prompt(adapter: ModelAdapter, coders: dict[int, SparseCoder], item: BenchmarkItem, *,
                     fractions: Sequence[float] = FRACTIONS, methods: Sequence[str] = METHODS,
                     ablations: Sequence[str] = ABLATIONS, means: ReferenceMeans | None = None, ig_steps: int = 5,
                     max_feature_nodes: int | None = None, keep_positions: Sequence[int] = (0,),
                     constant_positions: Sequence[int] = (), tokenizer=None, batch_size: int = 64,
                     graph_dtype: torch.dtype | None = None) -> list[Curve]:
    """Every method's faithfulness curves on one item (module docstring).

    Args:
        means: mean ablation values (:func:`reference_means`); needed for ``mean``.
        ig_steps: IG steps for EAP-IG and the neuron scores (1: plain attribution patching).
        max_feature_nodes: the attribution graph's feature budget (None: every active feature).
        keep_positions: positions never ablated by any method (features, neurons, and every
            source's output for EAP-IG); default the first, the attention sink.
        constant_positions: positions the attribution graph folds into bias nodes (BOS).
        graph_dtype: dtype of the local replacement model (default: the model's).

    Returns:
        curves: features (influence ranking), then EAP-IG and neurons (signed, then absolute
        ranking), each for every ablation in ``ablations``.

    Raises:
        BenchmarkError: an unknown method or ablation, a counterfactual of another length, or
            mean ablation without ``means``.
    """
    from .attribution import attribute
    from .prune import node_influence
    from .replacement import LocalReplacement

    for m in methods:
        if m not in METHODS:
            raise BenchmarkError(f"unknown method {m!r}; use {', '.join(METHODS)}")
    for a in ablations:
        if a not in ABLATIONS:
            raise BenchmarkError(f"unknown ablation {a!r}; use {', '.join(ABLATIONS)}")
    if "mean" in ablations and means is None:
        raise BenchmarkError("mean ablation needs reference means (reference_means)")
    check_item(item, ablations)
    tokens = item.tokens
    keep_positions = sorted({int(p) for p in keep_positions})
    curves: list[Curve] = []

    runner = ReplacementRunner(adapter, coders, tokens)
    cf_feats = ReplacementRunner(adapter, coders, item.cf_tokens).clean_activations() if "counterfactual" in ablations else None
    feat_ref = {"counterfactual": cf_feats, "mean": means.features if means is not None else None}
    feature_keep = sorted(set(keep_positions) | {int(p) for p in constant_positions})
    if "features" in methods:
        t0 = time.perf_counter()
        rep = LocalReplacement(adapter, coders, tokens, dtype=graph_dtype or adapter.dtype, tokenizer=tokenizer,
                               constant_positions=tuple(constant_positions))
        graph = attribute(rep, list(item.targets), max_feature_nodes=max_feature_nodes, batch_size=batch_size)
        node_influence(graph)
        t_graph = time.perf_counter() - t0
        for ab in ablations:
            c = faithfulness_curve(runner, graph, item.targets, fractions, reference=feat_ref[ab], ablation=ab,
                                   keep_positions=feature_keep)
            c.seconds += t_graph / len(ablations)
            curves.append(c)
        n_features = curves[-1].n_total
    else:
        clean = runner.clean_activations()
        n_features = sum(int((a[[p for p in range(len(tokens)) if p not in feature_keep]] != 0).sum())
                         for a in clean.values())
    sizes_features = fraction_sizes(fractions, n_features)

    if "eap-ig" in methods:
        comp = ComponentRunner(adapter)
        clean_out = comp.outputs(tokens)
        refs = {"counterfactual": comp.outputs(item.cf_tokens) if "counterfactual" in ablations else None,
                "mean": means.components if means is not None else None}
        for ab in ablations:
            t0 = time.perf_counter()
            abl = ablated_outputs(clean_out, refs[ab], keep_positions)
            scores = eap_ig_scores(comp, tokens, item.targets, abl, steps=ig_steps, clean=clean_out)
            t_scores = time.perf_counter() - t0
            sizes = fraction_sizes(fractions, comp.layout.n_edges)
            for absolute in (False, True):
                t1 = time.perf_counter()
                full, empty, values = edge_circuit_values(comp, tokens, item.targets, abl, scores, sizes,
                                                          absolute=absolute)
                curves.append(Curve("eap-ig", ab, "absolute" if absolute else "signed", "edges", list(fractions),
                                    sizes, comp.layout.n_edges, full, empty, values,
                                    t_scores / 2 + time.perf_counter() - t1))

    if "neurons" in methods:
        nr = NeuronRunner(adapter)
        clean_h = nr.hidden(tokens)
        clean0 = embeddings_in(adapter, tokens)
        for ab in ablations:
            t0 = time.perf_counter()
            if ab == "counterfactual":
                ref, base0 = nr.hidden(item.cf_tokens), embeddings_in(adapter, item.cf_tokens)
            else:
                ref, base0 = means.neurons, means.resid0.expand_as(clean0)
            ref = {layer: _keep_at(clean_h[layer], r, keep_positions) for layer, r in ref.items()}
            base0 = _keep_at(clean0, base0, keep_positions)
            scores = neuron_scores(nr, tokens, item.targets, ref, baseline_resid0=base0, steps=ig_steps, clean=clean_h)
            t_scores = time.perf_counter() - t0
            n_neurons = int(scores[:, [p for p in range(len(tokens)) if p not in keep_positions]].numel())
            for absolute in (False, True):
                t1 = time.perf_counter()
                full, empty, values = neuron_circuit_values(nr, tokens, item.targets, ref, scores, sizes_features,
                                                            absolute=absolute, keep_positions=keep_positions)
                curves.append(Curve("neurons", ab, "absolute" if absolute else "signed", "neurons", list(fractions),
                                    list(sizes_features), n_neurons, full, empty, values,
                                    t_scores / 2 + time.perf_counter() - t1))
    return curves


def _keep_at(clean: torch.Tensor, ref: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """``[T, n]`` reference values (``ref`` ``[T, n]``, or ``[n]`` broadcast) with the clean
    values at ``positions``."""
    out = ref.expand_as(clean).clone() if ref.dim() == 1 else ref.clone()
    if out.shape != clean.shape:
        raise BenchmarkError(f"reference values of shape {tuple(out.shape)} do not fit {tuple(clean.shape)}: "
                             "the counterfactual prompt must have as many tokens as the prompt")
    out[list(positions)] = clean[list(positions)]
    return out


# ------------------------------------------------------------------------------ a task
def aggregate(per_prompt: Sequence[Sequence[Curve]], *, log_x: bool = False) -> list[dict]:
    """Average each ``(method, ablation, ranking)`` curve over prompts (module docstring).

    Returns:
        one dict per curve kind: ``method``, ``ablation``, ``ranking``, ``unit``, ``fractions``,
        ``mean_size`` (mean circuit size per fraction), ``F`` (ratio of means, MIB's),
        ``F_prompt_mean`` (mean of per-prompt F, NaN-prompts left out), ``n_prompts``,
        ``n_undefined`` (prompts with ``m(full) = m(empty)``), ``cpr``, ``cmd`` (areas of ``F``),
        ``seconds``.
    """
    groups: dict[tuple, list[Curve]] = {}
    for curves in per_prompt:
        for c in curves:
            groups.setdefault((c.method, c.ablation, c.ranking), []).append(c)
    out = []
    for (method, ablation, ranking), cs in groups.items():
        n = len(cs)
        fr = cs[0].fractions
        full = sum(c.m_full for c in cs) / n
        empty = sum(c.m_empty for c in cs) / n
        m_c = [sum(c.m_circuit[i] for c in cs) / n for i in range(len(fr))]
        F = faithfulness_values(m_c, full, empty)
        per = [c.F for c in cs]
        F_mean = []
        for i in range(len(fr)):
            vals = [f[i] for f in per if not math.isnan(f[i])]
            F_mean.append(sum(vals) / len(vals) if vals else math.nan)
        a = areas(fr, F, log_x=log_x) if not any(math.isnan(f) for f in F) else {"cpr": math.nan, "cmd": math.nan}
        out.append({"method": method, "ablation": ablation, "ranking": ranking, "unit": cs[0].unit, "fractions": fr,
                    "mean_size": [sum(c.sizes[i] for c in cs) / n for i in range(len(fr))], "F": F,
                    "F_prompt_mean": F_mean, "m_full": full, "m_empty": empty, "n_prompts": n,
                    "n_undefined": sum(1 for c in cs if c.m_full == c.m_empty), **a,
                    "seconds": sum(c.seconds for c in cs)})
    return out


def mib_summary(rows: Sequence[dict]) -> list[dict]:
    """Per ``(method, ablation)``: CPR from the signed (or influence) ranking and CMD from the
    absolute (or influence) ranking, as MIB reports them."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["method"], r["ablation"])
        s = out.setdefault(key, {"method": r["method"], "ablation": r["ablation"], "cpr": math.nan, "cmd": math.nan})
        if r["ranking"] in ("signed", "influence"):
            s["cpr"] = r["cpr"]
        if r["ranking"] in ("absolute", "influence"):
            s["cmd"] = r["cmd"]
    return list(out.values())
