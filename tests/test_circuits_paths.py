"""Paths in the target's units, what they explain, and total effects.

Three checks of different strength: a planted circuit in a hand-set GPT-2 (``planted.py``) whose
chain, weight and share are known from the model's own forward pass; brute-force enumeration
of every path of small random graphs; and total effects against the forward propagation that
``verify`` uses for ablations.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from planted import A, B, build
from test_circuits_graph import random_graph

from transcoders.circuits import LocalReplacement, attribute, top_logit_targets
from transcoders.circuits.contributions import explained_shares, per_unit_effects, top_effects, total_effects
from transcoders.circuits.graph import BIAS, EMBEDDING, ERROR, FEATURE, TARGET, Graph
from transcoders.circuits.heads import heads_into_position
from transcoders.circuits.paths import (
    edge_gains,
    expanded,
    format_path,
    greedy_paths,
    middle_layers,
    path_weight,
    top_paths,
)
from transcoders.circuits.verify import predicted_total_effects

HYP = settings(max_examples=25, deadline=None)
IDS, VOCAB, T_TOKEN, SPARE = [3, 5, 7, 9], 20, 11, [12, 13, 14]


# ----------------------------------------------------------------------------- the planted circuit

@pytest.fixture(scope="module")
def planted():
    from transcoders.models import adapter_for

    p = build(IDS, VOCAB, T_TOKEN, SPARE)
    rep = LocalReplacement(adapter_for(p.model), p.coders, p.ids, dtype=torch.float64)
    graph = attribute(rep, top_logit_targets(rep.logits))
    return p, rep, graph


def test_planted_model_is_what_it_claims(planted):
    p, rep, graph = planted
    assert p.a_B > 0 and p.chain > 0 and p.direct > 0
    assert p.centred_logit == pytest.approx(p.chain + p.direct, rel=1e-12)  # nothing else reaches the logit
    # the graph's default targets start with the model's top logit, as a centred logit
    with torch.no_grad():
        logits = p.model(p.ids[None]).logits[0, -1]
    assert graph.targets[0].token == int(logits.argmax()) == T_TOKEN and graph.targets[0].centered
    assert float(graph.value[graph.target_nodes[0]]) == pytest.approx(p.centred_logit, rel=1e-12)


def test_planted_chain_is_the_top_path_with_its_weight_and_share(planted):
    p, _, graph = planted
    last = len(IDS) - 1
    best = top_paths(graph, n=3)  # default target: the most probable
    chain = [int(graph.nodes_of_kind("embedding")[0]), graph.find_feature(0, 0, A), graph.find_feature(1, last, B),
             int(graph.target_nodes[0])]
    assert best[0].nodes == chain
    assert best[0].weight == pytest.approx(p.chain, rel=1e-10)
    assert best[0].weight == pytest.approx(path_weight(graph, chain), rel=1e-12)
    assert all(abs(q.weight) < 1e-9 for q in best[1:])  # nothing else passes through a feature
    shares = explained_shares(graph, 0, best[:1])
    assert shares.share(shares.listed) == pytest.approx(p.chain / (p.chain + p.direct), rel=1e-10)
    assert shares.parts["embeddings via features"] == pytest.approx(p.chain, rel=1e-10)
    assert shares.parts["embeddings directly"] == pytest.approx(p.direct, rel=1e-10)
    for k in ("bias nodes", "error nodes", "constants", "left out of the graph"):
        assert abs(shares.parts[k]) < 1e-9, k
    assert sum(shares.parts.values()) == pytest.approx(shares.value, rel=1e-12)
    # with every source and direct edges allowed, the direct token edge is the runner-up path
    both = top_paths(graph, n=2, sources=None, min_length=1)
    assert [q.nodes for q in both] == [chain, [int(graph.nodes_of_kind("embedding")[last]), chain[-1]]]
    assert both[1].weight == pytest.approx(p.direct, rel=1e-10)


def test_planted_head_carries_the_chain(planted):
    p, rep, graph = planted
    flow = heads_into_position(rep, graph, 0)
    (layer, head, amount), *rest = flow.heads
    assert (layer, head) == (1, 0) and amount == pytest.approx(p.chain, rel=1e-9) and not rest
    assert flow.total == pytest.approx(p.chain, rel=1e-9)
    effects = dict(top_effects(graph, 0))
    # B's total effect is the chain; so is A's (its only way to the logit is through B)
    assert effects[graph.find_feature(1, len(IDS) - 1, B)] == pytest.approx(p.chain, rel=1e-10)
    assert effects[graph.find_feature(0, 0, A)] == pytest.approx(p.chain, rel=1e-10)


# ----------------------------------------------------------------------------- brute force

def enumerate_paths(g: Graph, targets: dict[int, float], sources=("embedding", "feature"), min_length: int = 2,
                    rank: str = "weight") -> list[tuple[list[int], float, float, int]]:
    """Every path from an allowed start to a chosen target: ``(nodes, weight, score, target)``,
    by walking incoming edges from each target (independent of the searches' DP)."""
    kinds = {"embedding": EMBEDDING, "bias": BIAS, "error": ERROR, "feature": FEATURE}
    row = ~g.value.isnan()
    w = g.edge_weight.double().tolist()
    absin = torch.zeros(g.n_nodes, dtype=torch.float64).index_add_(0, g.edge_dst, g.edge_weight.double().abs())
    inc: dict[int, list[tuple[int, int]]] = {}
    for e, (s, d) in enumerate(zip(g.edge_src.tolist(), g.edge_dst.tolist())):
        inc.setdefault(d, []).append((s, e))
    out = []

    def walk(node, nodes, edges, ti):
        k = int(g.kind[node])
        if k != TARGET and not (k == FEATURE and bool(row[node])):  # a start
            if (sources is None or k in {kinds[x] for x in sources}) and len(edges) >= min_length:
                path = nodes[::-1]
                weight = 1.0
                for i, e in zip(path, edges[::-1]):
                    a = float(g.activation[i]) if int(g.kind[i]) == FEATURE and bool(row[i]) else 1.0
                    weight *= w[e] / a
                if int(g.kind[path[0]]) == FEATURE and bool(row[path[0]]):
                    weight *= float(g.activation[path[0]])
                if rank == "weight":
                    score = abs(weight)
                else:
                    score = math.prod(abs(w[e]) / float(absin[int(g.edge_dst[e])]) for e in edges) ** (1 / len(edges))
                out.append((path, weight, score * targets[ti], ti))
            return
        for s, e in inc.get(node, ()):
            walk(s, nodes + [s], edges + [e], ti)

    for ti in targets:
        walk(int(g.target_nodes[ti]), [int(g.target_nodes[ti])], [], ti)
    return out


def chosen(g: Graph, target):
    w = [t.weight for t in g.targets]
    if target is None:
        return {max(range(len(w)), key=lambda i: (w[i], -i)): 1.0}
    if target == "all":
        return {i: x / sum(w) for i, x in enumerate(w)}
    return {target: 1.0}


@HYP
@given(st.integers(0, 10_000), st.integers(1, 12), st.sampled_from([None, "all", 1]), st.sampled_from(["weight", "per-edge"]),
       st.integers(1, 3), st.sampled_from([("embedding", "feature"), None, ("bias",)]))
def test_top_paths_match_enumeration(seed, n, target, rank, min_length, sources):
    g = random_graph(seed, unexpanded=0.3)
    brute = sorted(enumerate_paths(g, chosen(g, target), sources, min_length, rank), key=lambda t: -t[2])
    got = top_paths(g, n=n, target=target, rank=rank, min_length=min_length, sources=sources)
    assert len(got) == min(n, len(brute))
    assert [p.score for p in got] == pytest.approx([b[2] for b in brute[: len(got)]], rel=1e-10)
    weights = {(tuple(b[0]), b[3]): b[1] for b in brute}
    for p in got:
        assert p.weight == pytest.approx(weights[(tuple(p.nodes), p.target)], rel=1e-10)
        assert p.weight == pytest.approx(path_weight(g, p.nodes), rel=1e-10)
        assert len(p.edges) == len(p.nodes) - 1 >= min_length and p.weight == pytest.approx(math.prod(p.edges), rel=1e-12)


@HYP
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_constraints_match_enumeration(seed, n):
    g = random_graph(seed, n_layers=4, unexpanded=0.2)
    feats = (g.kind == FEATURE).nonzero().flatten().tolist()
    through = feats[:: 3]
    everything = enumerate_paths(g, chosen(g, None), min_length=1)
    cases = [
        (dict(through=through), lambda nodes: any(i in through for i in nodes)),
        (dict(via_layers=(1, 2)), lambda nodes: any(int(g.kind[i]) == FEATURE and 1 <= int(g.layer[i]) <= 2 for i in nodes)),
        (dict(through=through, via_layers=(2, 3)), lambda nodes: any(i in through for i in nodes) and any(
            int(g.kind[i]) == FEATURE and 2 <= int(g.layer[i]) <= 3 for i in nodes)),
        (dict(max_depth=2, positions=[0, 1]),
         lambda nodes: len(nodes) <= 3 and all(int(g.pos[i]) in (0, 1) for i in nodes[1:-1])),
    ]
    for kwargs, ok in cases:
        brute = sorted((b for b in everything if ok(b[0])), key=lambda t: -t[2])
        got = top_paths(g, n=n, min_length=1, **kwargs)
        assert [p.score for p in got] == pytest.approx([b[2] for b in brute[:n]], rel=1e-10), kwargs
        assert all(ok(p.nodes) for p in got), kwargs


def test_top_paths_chunked_merge_is_exact(monkeypatch):
    from transcoders.circuits import paths

    g = random_graph(11, p_edge=0.6, max_feats=3)
    whole = top_paths(g, n=7, target="all", min_length=1)
    monkeypatch.setattr(paths, "_CANDIDATES", 7)  # one edge per chunk
    chunked = top_paths(g, n=7, target="all", min_length=1)
    assert [p.nodes for p in chunked] == [p.nodes for p in whole]


@HYP
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(2, 4))
def test_greedy_paths_follow_the_same_rules(seed, beam, depth):
    g = random_graph(seed, unexpanded=0.3)
    exact = top_paths(g, n=1)
    got = greedy_paths(g, beam=beam, depth=depth)
    brute = {tuple(b[0]): b[1] for b in enumerate_paths(g, chosen(g, None))}
    for p in got:
        assert int(g.kind[p.nodes[0]]) in (EMBEDDING, FEATURE)  # never a bias- or error-only explanation
        assert 2 <= len(p.edges) <= depth and p.weight == pytest.approx(brute[tuple(p.nodes)], rel=1e-10)
    if exact and got:
        assert got[0].score <= exact[0].score * (1 + 1e-12)  # greedy never beats the exact optimum
    assert all(a.score >= b.score for a, b in zip(got, got[1:]))


def test_bad_arguments():
    g = random_graph(3)
    for kwargs, msg in ((dict(target=7), "no target 7"), (dict(target="best"), "no target"),
                        (dict(rank="short"), "unknown rank"), (dict(min_length=0), "min_length"),
                        (dict(sources=["embeddings"]), "unknown node kinds"), (dict(through=[10_000]), "outside the graph")):
        with pytest.raises(ValueError, match=msg):
            top_paths(g, **kwargs)


# ----------------------------------------------------------------------------- shares and effects

@HYP
@given(st.integers(0, 10_000))
def test_shares_sum_to_the_value_and_effects_enumerate_paths(seed):
    g = random_graph(seed, unexpanded=0.3)
    for ti in range(len(g.targets)):
        shares = explained_shares(g, ti)
        value = float(g.value[g.target_nodes[ti]])
        assert sum(shares.parts.values()) == pytest.approx(value, rel=1e-9, abs=1e-9)
        effect = total_effects(g, ti)
        every = enumerate_paths(g, {ti: 1.0}, sources=None, min_length=1)
        by_start: dict[int, float] = {}
        for nodes, weight, _, _ in every:
            by_start[nodes[0]] = by_start.get(nodes[0], 0.0) + weight
        starts = (~expanded(g) & (g.kind != TARGET)).nonzero().flatten().tolist()
        for s in starts:
            assert float(effect[s]) == pytest.approx(by_start.get(s, 0.0), rel=1e-9, abs=1e-12)
        emb_direct = sum(w for nodes, w, _, _ in every if len(nodes) == 2 and int(g.kind[nodes[0]]) == EMBEDDING)
        assert shares.parts["embeddings directly"] == pytest.approx(emb_direct, abs=1e-12)


def test_total_effects_are_verifys_ablation_predictions():
    from test_circuits_graph import _real_graph

    g = _real_graph(max_feature_nodes=20)  # with dropped terms and every target kind
    feats = (g.kind == FEATURE).nonzero().flatten().tolist()
    for ti in range(len(g.targets)):
        effect = total_effects(g, ti)
        for f in feats[:12]:
            assert float(effect[f]) == pytest.approx(-float(predicted_total_effects(g, f)[ti]), rel=1e-9, abs=1e-12)
        shares = explained_shares(g, ti)
        assert sum(shares.parts.values()) == pytest.approx(float(g.value[g.target_nodes[ti]]), rel=1e-9, abs=1e-9)
        assert abs(shares.parts["left out of the graph"]) > 0
        assert per_unit_effects(g, ti)[g.target_nodes[ti]] == 1.0


def test_gains_and_format(planted):
    _, _, graph = planted
    gains = edge_gains(graph)
    thru = expanded(graph)[graph.edge_src]
    a = graph.activation.double()[graph.edge_src]
    assert torch.allclose(gains[thru] * a[thru], graph.edge_weight.double()[thru])
    assert torch.equal(gains[~thru], graph.edge_weight.double()[~thru])
    text = format_path(graph, top_paths(graph, n=1)[0])
    assert text.startswith("logit(#11)@pos3 <- L1 f1 @pos3 <- L0 f0 @pos0 <- emb") and text.endswith(" nats)")
    assert middle_layers(30) == (7, 22) and middle_layers(2) == (0, 1)


# ----------------------------------------------------------------------------- the CLI on the planted model

PROMPT = " the state of union"  # " the" opens it: feature A fires on it all over the corpus, so it has a label


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """The planted GPT-2 saved with the tiny tokenizer (prompt ids from it), its exact
    transcoders in a run folder, and a feature store of that run."""
    from click.testing import CliRunner
    from conftest import build_tiny_tokenizer

    from transcoders.cli import main
    from transcoders.coders.io import save_coder

    root = tmp_path_factory.mktemp("planted")
    tok = build_tiny_tokenizer()
    ids = tok(PROMPT).input_ids
    ids = list(dict.fromkeys(ids))  # the planted builder wants distinct ids; keep the first of each
    prompt = tok.decode(ids)
    assert tok(prompt).input_ids == ids
    free = [i for i in range(1, len(tok)) if i not in ids]
    p = build(ids, len(tok), free[0], free[1:4], dtype=torch.float32)
    p.model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for layer, c in p.coders.items():
        c.cfg = c.cfg.model_copy(update={"model_name": str(root / "model")})
        save_coder(c, root / "run" / f"layers.{layer}.mlp")
    args = ["--tokens", "300", "--top-k", "5", "--n-samples", "6", "--model-batch", "4", "--device", "cpu", "--quiet"]
    too_long = CliRunner().invoke(main, ["features", str(root / "run"), "--model", str(root / "model"), *args])
    assert too_long.exit_code == 2 and "pass --ctx-len 64 or less" in too_long.output  # the default 256 > 64
    result = CliRunner().invoke(main, ["features", str(root / "run"), "--model", str(root / "model"), "--ctx-len", "32",
                                       *args])
    assert result.exit_code == 0, result.output
    return root, prompt, p, tok


def cli(*args):
    from click.testing import CliRunner

    from transcoders.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def section(stdout: str, heading: str) -> list[str]:
    """The indented lines under the first heading line starting with ``heading``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    out = []
    for line in lines[start + 1:]:
        if not line.startswith(" "):
            break
        out.append(line)
    return out


def test_trace_shows_the_planted_chain_its_share_and_labels(planted_run):
    from transcoders.coders.io import coders_fingerprint
    from transcoders.features.store import FeatureStore

    root, prompt, p, tok = planted_run
    out = root / "g.json"
    result = cli("trace", root / "run", "--model", root / "model", "--prompt", prompt, "--out", out)
    assert result.exit_code == 0, result.output
    text = result.stdout
    target = f"logit({tok.decode([p.target_token])!r})"
    assert f"targets (most probable first): 0: {target}@{len(p.ids) - 1}" in text
    first = section(text, "paths (")[0]
    last = len(p.ids) - 1
    chain = first.strip().split("  (")[0].split(" <- ")
    assert chain[0] == f"{target}@pos{last}" and chain[1].startswith(f"L1 f{B} @pos{last}")
    assert chain[2].startswith(f"L0 f{A} @pos0") and chain[3] == f"emb {tok.decode([int(p.ids[0])])!r} @pos0"
    assert float(first.split("  (")[1].split()[0]) == pytest.approx(p.chain, rel=1e-3)
    # the store's label of A is shown next to it (the store was made for these very weights)
    labels, stale = FeatureStore(root / "run" / "features").labels_for({0: coders_fingerprint({0: p.coders[0]})})
    label_a = labels[0][str(A)]
    assert not stale
    assert FeatureStore(root / "run" / "features").labels_for({0: "other weights"}) == ({}, [0])
    assert f"[{label_a[:39]}" in chain[2]
    shares = {line.strip().rsplit(maxsplit=2)[0]: (float(line.split()[-2]), float(line.split()[-1][:-1]))
              for line in section(text, "what makes up")}
    assert shares["listed paths (1)"][1] == pytest.approx(100 * p.chain / (p.chain + p.direct), abs=0.1)
    assert shares["embeddings directly"][0] == pytest.approx(p.direct, rel=1e-3)
    assert shares["total"][1] == pytest.approx(100.0)
    heads = next(line for line in text.splitlines() if line.startswith("heads moving the most"))
    assert heads.split("): ")[1].startswith("1.0 +")
    assert "paths through the middle layers" in text
    assert f"labels from {root / 'run' / 'features'}" in text


def test_paths_target_through_and_errors(planted_run):
    root, prompt, p, tok = planted_run
    out = root / "g2.json"
    assert cli("trace", root / "run", "--model", root / "model", "--prompt", prompt, "--out", out).exit_code == 0
    last = len(p.ids) - 1
    one = cli("paths", out, "-n", "1", "--through", f"1.{B}@{last}")
    assert one.exit_code == 0, one.output
    [line] = section(one.stdout, "paths (")
    assert f"L1 f{B} @pos{last}" in line and f"L0 f{A} @pos0" in line
    assert "none" in section(cli("paths", out, "--through", f"0.{A}", "--via-layers", "5-9").stdout, "paths (")[0]
    # --target picks another target; its paths end there
    second = cli("paths", out, "--target", "1")
    assert second.exit_code == 0, second.output
    from transcoders.circuits.export import load_graph

    g = load_graph(out)
    assert f"what makes up {g.targets[1].label}@" in second.stdout
    from conftest import assert_one_line_error

    assert_one_line_error(cli("paths", out, "--target", "zzz"), "no target of the graph matches 'zzz'")
    assert_one_line_error(cli("paths", out, "--through", "0.99"), "not a node of this graph")
    assert_one_line_error(cli("paths", out, "--through", "x"), "LAYER.FEATURE")
    assert_one_line_error(cli("paths", out, "--via-layers", "a-b"), "--via-layers")
    assert_one_line_error(cli("paths", out, "--greedy", "--through", f"0.{A}"), "exact search only")


@HYP
@given(st.integers(0, 10_000))
def test_one_pass_by_level_is_the_power_series(seed):
    from transcoders.circuits.prune import propagate

    g = random_graph(seed, n_layers=4, unexpanded=0.2)
    x0 = torch.rand(g.n_nodes, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    v = edge_gains(g)
    series = propagate(g.n_nodes, g.edge_src, g.edge_dst, v, x0)
    assert torch.allclose(propagate(g.n_nodes, g.edge_src, g.edge_dst, v, x0, g.layer), series, rtol=1e-12, atol=1e-12)
    # levels that do not order the rows fall back to the series
    flipped = -g.layer
    assert torch.allclose(propagate(g.n_nodes, g.edge_src, g.edge_dst, v, x0, flipped), series, rtol=1e-12, atol=1e-12)
