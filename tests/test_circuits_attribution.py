"""The central property of attribution graphs, on tiny random models of every family.

In the frozen local replacement model, removing any source node's write changes every row by
exactly minus its edge weight; rows are complete (incoming edges + own bias + dropped = value);
the replacement model reproduces the real model; per-head splits sum to edges; graph paths
predict the linearised model's total effects; and an intervention that changes nothing changes
nothing.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FAMILIES, build_tiny_model

from transcoders.circuits import LocalReplacement, ReplacementError, Target, TargetError, attribute
from transcoders.circuits.graph import BIAS, EMBEDDING, ERROR, FEATURE
from transcoders.circuits.heads import split_edge, split_edge_last
from transcoders.circuits.interventions import FeatureEdit, ReplacementRunner, intervene_frozen
from transcoders.circuits.verify import check_edges, predicted_total_effects
from transcoders.coders.coder import SparseCoder
from transcoders.coders.config import CoderConfig
from transcoders.models import adapter_for

D = 32
VARIANTS = [("transcoder", "topk"), ("skip_transcoder", "relu"), ("transcoder", "jumprelu")]


def make_coders(n_layers: int, kind: str, activation: str, seed: int = 0, exact_of=None) -> dict[int, SparseCoder]:
    torch.manual_seed(seed)
    coders = {}
    for layer in range(n_layers):
        cfg = CoderConfig(kind=kind, activation=activation, d_in=D, d_out=D, d_sae=64, k=4, layer=layer)
        c = SparseCoder(cfg, dtype=torch.float64)
        with torch.no_grad():
            c.b_enc.normal_(0, 0.1)
            c.b_dec.normal_(0, 0.1)
            if c.W_skip is not None:
                c.W_skip.normal_(0, 0.1)
            if c.threshold is not None:
                c.threshold.fill_(0.05)
        coders[layer] = c.requires_grad_(False)
    return coders


@pytest.fixture(scope="module", params=[(f, v) for f in FAMILIES for v in VARIANTS], ids=lambda p: f"{p[0]}-{p[1][0]}-{p[1][1]}")
def setup(request):
    family, (kind, activation) = request.param
    model = build_tiny_model(family, dtype=torch.float64)
    adapter = adapter_for(model)
    coders = make_coders(adapter.n_layers, kind, activation)
    tokens = torch.arange(3, 13)
    rep = LocalReplacement(adapter, coders, tokens, dtype=torch.float64)
    f2 = rep.layers[2].features
    feat = int(f2.feature[f2.pos == 6][0])
    targets = [Target("logit", -1, token=5), Target("logit_diff", 4, token=7, token_b=9),
               Target("feature", 6, layer=2, feature=feat),
               Target("direction", 7, layer=2, direction=torch.randn(D, dtype=torch.float64)),
               Target("logit", 5, token=11, centered=True)]
    graph = attribute(rep, targets, batch_size=16)
    return adapter, coders, tokens, rep, graph


def test_logit_specs_are_centred_unless_raw():
    from transcoders.circuits.targets import parse_target

    logits = torch.randn(4, 30, dtype=torch.float64)
    c = parse_target("logit:#5@2", vocab_size=30, n_layers=3)
    r = parse_target("rawlogit:#5@2", vocab_size=30, n_layers=3)
    assert (c.centered, c.label, r.centered, r.label) == (True, "logit(#5)", False, "rawlogit(#5)")
    assert float(c.value(logits)) == pytest.approx(float(logits[2, 5] - logits[2].mean()), rel=1e-12)
    assert float(r.value(logits)) == float(logits[2, 5])


def _target_values(rep, run, graph):
    from transcoders.circuits.interventions import frozen_target_values

    return frozen_target_values(rep, run, graph.targets)


def test_replacement_reproduces_model(setup):
    _, _, _, rep, _ = setup
    ref = rep.model_logits.double()
    err = (rep.capped(rep.logits) - ref).abs().max() / ref.abs().max()
    assert err < 1e-6


def test_rows_are_complete(setup):
    *_, graph = setup
    rows, residual = graph.row_balance()
    assert len(rows) == graph.meta["feature_rows"] + len(graph.targets)
    total = graph.value[rows] - residual  # incoming + const + dropped
    torch.testing.assert_close(total, graph.value[rows], rtol=1e-9, atol=1e-9)
    assert graph.dropped[rows].abs().max() == 0  # no budget: nothing left out


def test_injecting_a_source_changes_each_target_by_its_edge(setup):
    """Central property: for every kind of source, the frozen model's response is the edge."""
    _, _, _, rep, graph = setup
    base = _target_values(rep, rep.forward(), graph)
    rng = random.Random(0)
    by_kind = {k: (graph.kind == k).nonzero().flatten().tolist() for k in (EMBEDDING, BIAS, ERROR, FEATURE)}
    nodes = [n for k, ns in by_kind.items() for n in rng.sample(ns, min(6, len(ns)))]
    T, d = rep.n_pos, rep.d_model
    for node in nodes:
        kind, layer, pos = int(graph.kind[node]), int(graph.layer[node]), int(graph.pos[node])
        post, attn = {}, {}
        v = torch.zeros(T, d, dtype=torch.float64)
        if kind == EMBEDDING:
            v[pos] = rep.resid0[pos]
            post[-1] = -v
        elif kind == ERROR:
            v[pos] = rep.layers[layer].error[pos]
            post[layer] = -v
        elif kind == FEATURE:
            v[pos] = graph.activation[node] * rep.coders[layer].W_dec[int(graph.feature[node])]
            post[layer] = -v
        else:
            v[pos] = rep.layers[layer].mlp_const[pos]
            post[layer] = -v
            a = torch.zeros(T, d, dtype=torch.float64)
            a[pos] = rep.layers[layer].attn_const[pos]
            attn[layer] = -a
        after = _target_values(rep, rep.forward(post, attn), graph)
        for i, tnode in enumerate(graph.target_nodes.tolist()):
            edge = graph.edge_weight[(graph.edge_dst == tnode) & (graph.edge_src == node)].double().sum()
            measured = base[i] - after[i]
            assert abs(measured - edge) <= 1e-4 * max(abs(float(edge)), 1e-3) + 1e-10, (graph.label(node), i)


def test_edges_into_features_match_interventions(setup):
    _, _, _, rep, graph = setup
    for row in check_edges(rep, graph, top=15):
        assert row["abs_error"] <= 1e-4 * max(abs(row["predicted"]), 1e-3) + 1e-10, row


def test_head_split_sums_to_edge(setup):
    _, _, _, rep, graph = setup
    rng = random.Random(1)
    ok = (graph.kind[graph.edge_src] != BIAS).nonzero().flatten().tolist()
    for e in rng.sample(ok, 12):
        s, d = int(graph.edge_src[e]), int(graph.edge_dst[e])
        parts = split_edge(rep, graph, s, d)
        total = sum(p.weight for p in parts)
        assert total == pytest.approx(float(graph.edge_weight[e]), rel=1e-8, abs=1e-12)
        assert all(p.kind in ("residual", "skip", "head") for p in parts)
        if graph.pos[s] != graph.pos[d]:  # a direct residual read needs the same position
            assert all(p.kind != "residual" for p in parts)
            assert any(p.kind == "head" for p in parts)
        last = split_edge_last(rep, graph, s, d)
        assert sum(p.weight for p in last) == pytest.approx(float(graph.edge_weight[e]), rel=1e-8, abs=1e-12)
        assert all(p.dst_pos == int(graph.pos[d]) for p in last)  # the parts that write into the row's position


def test_graph_paths_predict_linearised_model(setup):
    _, _, _, rep, graph = setup
    feats = (graph.kind == FEATURE).nonzero().flatten().tolist()
    for node in random.Random(2).sample(feats, 5):
        edit = FeatureEdit(int(graph.layer[node]), int(graph.feature[node]), "ablate", positions=[int(graph.pos[node])])
        before, after = intervene_frozen(rep, [edit], graph.targets, features="linear")
        torch.testing.assert_close(after - before, predicted_total_effects(graph, node), rtol=1e-6, atol=1e-9)


def test_noop_interventions_change_nothing(setup):
    adapter, coders, tokens, rep, graph = setup
    noop = [FeatureEdit(1, 3, "scale", 1.0), FeatureEdit(0, 5, "scale", 1.0, positions=[2])]
    b, a = intervene_frozen(rep, noop, graph.targets, features="linear")
    assert torch.equal(a, b)
    runner = ReplacementRunner(adapter, coders, tokens)
    b, a = runner.intervene(noop, graph.targets)
    assert torch.equal(a, b)
    # The free replacement model with error nodes held reproduces the frozen one on the clean prompt.
    clean = torch.tensor([float(v) for v in graph.value[graph.target_nodes]], dtype=torch.float64)
    assert torch.allclose(b, clean, rtol=1e-6, atol=1e-6)


def test_error_edges_vanish_for_an_exact_transcoder_and_equal_injection_effects_otherwise():
    """Layer 1's MLP is made a ReLU MLP, ``relu(x W1 + b1) W2 + b2``, and its transcoder *is* that
    MLP (``W_enc = W1^T``, ``b_enc = b1``, ``W_dec = W2``, ``b_dec = b2``), so its error node is zero
    by construction while the MLP itself writes a nonzero output: every edge out of a layer-1 error node must
    vanish. Layers 0 and 2 keep GELU MLPs and random transcoders, so their error nodes are not zero:
    each of their edges must equal the change in its row when that error vector, computed here
    from the real model's MLP input and output, is removed from the frozen model."""
    from transcoders.circuits.interventions import frozen_target_values

    model = build_tiny_model("gpt2", dtype=torch.float64)
    mlp1 = model.transformer.h[1].mlp
    mlp1.act = torch.nn.ReLU()
    adapter = adapter_for(model)
    coders = make_coders(adapter.n_layers, "transcoder", "topk")
    exact = SparseCoder(CoderConfig(kind="transcoder", activation="relu", d_in=D, d_out=D, d_sae=4 * D, layer=1),
                        dtype=torch.float64)
    with torch.no_grad():  # Conv1D computes x @ weight + bias
        exact.W_enc.copy_(mlp1.c_fc.weight.T)
        exact.b_enc.copy_(mlp1.c_fc.bias)
        exact.W_dec.copy_(mlp1.c_proj.weight)
        exact.b_dec.copy_(mlp1.c_proj.bias)
    coders[1] = exact.requires_grad_(False)
    tokens = torch.arange(3, 11)
    T = tokens.numel()

    # The error nodes, computed from the real model's MLP inputs and outputs.
    x, y = {}, {}

    def record(module, args, out):
        x[module.index], y[module.index] = args[0][0], out[0]

    hooks = []
    for i, block in enumerate(model.transformer.h):
        block.mlp.index = i
        hooks.append(block.mlp.register_forward_hook(record))
    with torch.no_grad():
        model(input_ids=tokens[None])
    for h in hooks:
        h.remove()
    error = {layer: y[layer] - (c.encode(x[layer]) @ c.W_dec + c.b_dec) for layer, c in coders.items()}
    assert y[1].norm(dim=-1).min() > 1e-2  # the MLP writes something ...
    assert error[1].abs().max() < 1e-12  # ... and the transcoder reproduces all of it
    assert all(error[layer].norm(dim=-1).min() > 1e-2 for layer in (0, 2))

    rep = LocalReplacement(adapter, coders, tokens, dtype=torch.float64, constant_positions=())
    for layer in (0, 2):
        torch.testing.assert_close(rep.layers[layer].error, error[layer], rtol=1e-9, atol=1e-12)
    f2 = rep.layers[2].features
    targets = [Target("logit", -1, token=5), Target("logit_diff", 4, token=7, token_b=9),
               Target("feature", 6, layer=2, feature=int(f2.feature[f2.pos == 6][0]))]
    graph = attribute(rep, targets)

    def edge(src: int, dst: int) -> float:
        return float(graph.edge_weight[(graph.edge_src == src) & (graph.edge_dst == dst)].double().sum())

    is_error = graph.kind == ERROR
    largest = float(graph.edge_weight.abs().max())
    from_exact = is_error[graph.edge_src] & (graph.layer[graph.edge_src] == 1)
    assert int((is_error & (graph.layer == 1)).sum()) == T  # the nodes exist; their edges are zero
    assert float(graph.edge_weight[from_exact].double().abs().sum()) <= 1e-12 * largest  # measured: ~1e-17 each

    base = frozen_target_values(rep, rep.forward(), targets)
    biggest = 0.0
    for node in (is_error & (graph.layer != 1)).nonzero().flatten().tolist():
        layer, pos = int(graph.layer[node]), int(graph.pos[node])
        delta = torch.zeros(T, D, dtype=torch.float64)
        delta[pos] = -error[layer][pos]
        measured = base - frozen_target_values(rep, rep.forward({layer: delta}), targets)
        predicted = torch.tensor([edge(node, int(t)) for t in graph.target_nodes], dtype=torch.float64)
        torch.testing.assert_close(measured, predicted, rtol=1e-6, atol=1e-9 * largest)
        biggest = max(biggest, float(predicted.abs().max()))
    assert biggest > 1e-2  # nonzero errors do reach the targets


def test_budget_keeps_most_influential_features_and_stays_complete():
    model = build_tiny_model("gpt2", dtype=torch.float64)
    adapter = adapter_for(model)
    coders = make_coders(adapter.n_layers, "transcoder", "relu")
    rep = LocalReplacement(adapter, coders, torch.arange(3, 15), dtype=torch.float64)
    targets = [Target("logit", -1, token=5)]
    full = attribute(rep, targets, batch_size=8)
    seen = []
    small = attribute(rep, targets, max_feature_nodes=20, batch_size=8, progress=lambda d, t: seen.append((d, t)))
    assert (small.kind == FEATURE).sum() == 20 < (full.kind == FEATURE).sum()
    # progress: one call per sweep of at most 8 rows, rising to the budget
    assert seen[-1] == (20, 20) and all(t == 20 for _, t in seen)
    assert all(0 < b - a <= 8 for (a, _), (b, _) in zip([(0, 20), *seen], seen))
    rows, residual = small.row_balance()
    torch.testing.assert_close(small.value[rows] - residual, small.value[rows])
    # Edges shared by both graphs are identical (exact, budget-independent).
    t_full, t_small = int(full.target_nodes[0]), int(small.target_nodes[0])
    for s in small.incoming(t_small)[0][:20].tolist():
        key = (int(small.kind[s]), int(small.layer[s]), int(small.pos[s]), int(small.feature[s]))
        match = ((full.kind == key[0]) & (full.layer == key[1]) & (full.pos == key[2]) & (full.feature == key[3])).nonzero()[0, 0]
        w_full = full.edge_weight[(full.edge_dst == t_full) & (full.edge_src == match)]
        w_small = small.edge_weight[(small.edge_dst == t_small) & (small.edge_src == s)]
        torch.testing.assert_close(w_full, w_small)


def test_bad_inputs_raise_clear_errors():
    model = build_tiny_model("llama", dtype=torch.float64)
    adapter = adapter_for(model)
    coders = make_coders(adapter.n_layers, "transcoder", "topk")
    with pytest.raises(ReplacementError, match="missing layers"):
        LocalReplacement(adapter, {0: coders[0]}, torch.arange(5))
    with pytest.raises(ReplacementError, match="context"):
        LocalReplacement(adapter, coders, torch.zeros(adapter.max_context + 1, dtype=torch.long))
    wrong = {layer: SparseCoder(CoderConfig(kind="transcoder", activation="topk", d_in=16, d_out=16, d_sae=8, k=2))
             for layer in coders}
    with pytest.raises(ReplacementError, match="d_model"):
        LocalReplacement(adapter, wrong, torch.arange(5))
    rep = LocalReplacement(adapter, coders, torch.arange(5), dtype=torch.float64)
    with pytest.raises(TargetError, match="outside"):
        attribute(rep, [Target("logit", 7, token=1)])


def test_faithfulness_is_one_for_the_whole_graph_and_means_match_a_direct_computation():
    from transcoders.circuits.interventions import mean_activations
    from transcoders.circuits.verify import faithfulness

    model = build_tiny_model("gpt_neox", dtype=torch.float64)
    adapter = adapter_for(model)
    coders = make_coders(adapter.n_layers, "transcoder", "topk")
    tokens = torch.arange(3, 13)
    rep = LocalReplacement(adapter, coders, tokens, dtype=torch.float64)
    graph = attribute(rep, [Target("logit", -1, token=5), Target("logit", -1, token=6)])
    contexts = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    means = mean_activations(adapter, coders, contexts, batch_size=2)
    # Direct: the real model's MLP inputs, positions 1.. of each context.
    captured = {}
    hooks = [adapter.mlp_in_module(layer).register_forward_pre_hook(
        lambda _m, a, layer=layer: captured.__setitem__(layer, a[0])) for layer in coders]
    model(input_ids=contexts)
    for h in hooks:
        h.remove()
    for layer, c in coders.items():
        direct = c.encode(captured[layer])[:, 1:].mean((0, 1))
        torch.testing.assert_close(means[layer], direct.float(), rtol=1e-5, atol=1e-6)
    runner = ReplacementRunner(adapter, coders, tokens)
    n = int((graph.kind == FEATURE).sum())
    curve = faithfulness(runner, graph, [0, 5, n], means)
    assert curve[0]["F"] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert curve[-1]["F"] == pytest.approx([1.0, 1.0], abs=1e-6)


def test_constant_positions_fold_features_into_bias_nodes_and_stay_exact():
    model = build_tiny_model("llama", dtype=torch.float64)
    adapter = adapter_for(model)
    coders = make_coders(adapter.n_layers, "transcoder", "topk")
    tokens = torch.arange(3, 13)
    plain = LocalReplacement(adapter, coders, tokens, dtype=torch.float64)
    rep = LocalReplacement(adapter, coders, tokens, dtype=torch.float64, constant_positions=(0,))
    for a, b in zip(plain.layers, rep.layers):
        assert (b.features.pos != 0).all() and len(b.features) == int((a.features.pos != 0).sum())
        torch.testing.assert_close(b.error, a.error)  # same model, same errors
    graph = attribute(rep, [Target("logit", -1, token=5)])
    rows, residual = graph.row_balance()
    torch.testing.assert_close(graph.value[rows] - residual, graph.value[rows])
    # The bias node of layer 1 at position 0 now carries that position's features too.
    node = int(((graph.kind == BIAS) & (graph.layer == 1) & (graph.pos == 0)).nonzero()[0, 0])
    v = torch.zeros(rep.n_pos, rep.d_model, dtype=torch.float64)
    v[0] = rep.layers[1].mlp_const[0]
    a = torch.zeros_like(v)
    a[0] = rep.layers[1].attn_const[0]
    base = rep.forward().logits[-1, 5]
    after = rep.forward({1: -v}, {1: -a}).logits[-1, 5]
    edge = graph.edge_weight[(graph.edge_dst == graph.target_nodes[0]) & (graph.edge_src == node)].sum()
    assert float(base - after) == pytest.approx(float(edge), rel=1e-8, abs=1e-12)


def test_influence_ranking_is_the_dense_power_series():
    """``_influence`` (sparse, scattered) against the same measure with a dense matrix: targets'
    row-normalised |weights|, then each stored row's, summed over paths of every length."""
    from types import SimpleNamespace

    from transcoders.circuits.attribution import _influence

    torch.manual_seed(0)
    n_cols = 12
    target_rows = torch.randn(2, n_cols) * (torch.rand(2, n_cols) > 0.3)
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64)
    rows = {}
    for c in (5, 7, 9, 11):  # feature columns with computed rows; they read only lower columns
        v = torch.randn(c) * (torch.rand(c) > 0.4)
        nz = v.nonzero().flatten()
        rows[c] = (nz.to(torch.int32), v[nz])
    # feature columns 4..11 in layers of two (one row each), so rows read earlier layers' rows
    got = _influence(rows, target_rows, weights, SimpleNamespace(n_cols=n_cols, layer_offset=[4, 6, 8, 10, 12]))

    A = torch.zeros(n_cols, n_cols, dtype=torch.float64)  # A[r, c]: share of row r's |input| from c
    for c, (nz, v) in rows.items():
        A[c, nz.long()] = v.abs().double() / v.abs().double().sum()
    t = target_rows.abs().double()
    cur = weights @ (t / t.sum(-1, keepdim=True))
    want = torch.zeros(n_cols, dtype=torch.float64)
    for _ in range(n_cols):  # every path length
        want += cur
        cur = cur @ A
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert float(got[5]) > 0 and float(got[0]) > 0  # influence reaches through the rows


def test_max_memory_shrinks_the_batch_and_stops_rows_before_the_limit(monkeypatch):
    """With the process's own memory taken as 0, the limit covers the attribution alone: the
    projected peak stays under it, fewer feature rows are computed than asked, and the graph is
    still exact over the nodes it has."""
    import transcoders.hardware
    from transcoders.circuits.attribution import AttributionMemoryError

    monkeypatch.setattr(transcoders.hardware, "resident_bytes", lambda: 0)
    adapter = adapter_for(build_tiny_model("llama", dtype=torch.float64))
    rep = LocalReplacement(adapter, make_coders(adapter.n_layers, "transcoder", "relu"), torch.arange(3, 13),
                           dtype=torch.float64)
    targets = [Target("logit", -1, token=5)]
    full = attribute(rep, targets, max_feature_nodes=60, batch_size=8)
    assert full.meta["feature_rows"] == 60
    n_cols = full.n_nodes - 60 - 1 + full.meta["n_active_features"]
    one_row = (n_cols + 1) * 8 + rep.n_pos * rep.d_model * 8 * 12  # the sweep buffers of one float64 row
    gather = 8 * (n_cols + 1) * 20  # non-zeros of 8 rows gathered at once
    limit = gather + 4 * 3.5 * one_row + 100_000
    g = attribute(rep, targets, max_feature_nodes=60, batch_size=8, max_memory=limit)
    assert g.meta["batch_size"] == int((0.95 * limit - gather) / 4 / one_row) < 8 and g.meta["memory_limited"]
    assert 0 < g.meta["feature_rows"] < 60
    assert g.meta["memory_estimate_bytes"] <= limit
    rows, residual = g.row_balance()
    assert residual.abs().max() < 1e-9  # exact over the nodes it has
    roomy = attribute(rep, targets, max_feature_nodes=60, batch_size=8, max_memory=1e12)
    assert not roomy.meta["memory_limited"] and roomy.meta["feature_rows"] == 60
    assert torch.equal(roomy.feature, full.feature)
    with pytest.raises(AttributionMemoryError, match="raise --max-memory"):
        attribute(rep, targets, max_memory=gather + one_row / 2)


def test_graphs_do_not_depend_on_how_rows_are_batched():
    """Sweeps of one row, of a few rows and of all rows at once (each on its own causal prefix of
    positions) give the same graph: same nodes, same edges to 1e-9 relative (float64)."""
    adapter = adapter_for(build_tiny_model("llama", dtype=torch.float64))
    rep = LocalReplacement(adapter, make_coders(adapter.n_layers, "transcoder", "relu"), torch.arange(3, 13),
                           dtype=torch.float64)
    targets = [Target("logit", -1, token=5), Target("logit", 4, token=9)]
    graphs = [attribute(rep, targets, batch_size=b) for b in (1, 5, 1000)]
    key = lambda g: {(int(s), int(d)): float(w) for s, d, w in zip(g.edge_src, g.edge_dst, g.edge_weight)}
    ref = key(graphs[-1])
    for g in graphs[:-1]:
        assert torch.equal(g.kind, graphs[-1].kind) and torch.equal(g.feature, graphs[-1].feature)
        got = key(g)
        assert got.keys() == ref.keys()
        assert all(abs(got[k] - ref[k]) <= 1e-9 * abs(ref[k]) + 1e-14 for k in ref)
