"""Attribution on the real default model, SmolLM2-135M-Instruct, in float64.

Random TopK transcoders for all 30 layers stand in for trained ones (the property does not
depend on their quality; error nodes absorb the difference): injecting any source node's
output into the frozen model changes each target by exactly its edge weight.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import assert_injections_match_edges

from transcoders.circuits import LocalReplacement, Target, attribute
from transcoders.circuits.graph import ERROR, FEATURE
from transcoders.circuits.interventions import FeatureEdit, ReplacementRunner, intervene_frozen
from transcoders.circuits.verify import predicted_total_effects
from transcoders.coders.coder import SparseCoder
from transcoders.coders.config import CoderConfig
from transcoders.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    loaded = load_model(dtype=torch.float64)
    ad = loaded.adapter
    torch.manual_seed(0)
    coders = {}
    for layer in range(ad.n_layers):
        cfg = CoderConfig(kind="transcoder", activation="topk", d_in=ad.d_model, d_out=ad.d_model, d_sae=128, k=4, layer=layer)
        coders[layer] = SparseCoder(cfg, dtype=torch.float64).requires_grad_(False)
    tokens = loaded.tokenizer("The state of the Union is", return_tensors="pt").input_ids[0]
    rep = LocalReplacement(ad, coders, tokens, dtype=torch.float64, tokenizer=loaded.tokenizer)
    top = int(rep.logits[-1].argmax())
    f = rep.layers[20].features
    targets = [Target("logit", -1, token=top), Target("feature", int(f.pos[-1]), layer=20, feature=int(f.feature[-1]))]
    return loaded, coders, tokens, rep, attribute(rep, targets)


def test_replacement_reproduces_smollm2(setup):
    _, _, _, rep, _ = setup
    assert torch.allclose(rep.logits, rep.model_logits.double(), rtol=0, atol=1e-3)


def test_injected_sources_change_targets_by_their_edges(setup):
    _, _, _, rep, graph = setup
    rng = random.Random(0)
    feats = (graph.kind == FEATURE).nonzero().flatten().tolist()
    errs = (graph.kind == ERROR).nonzero().flatten().tolist()
    assert_injections_match_edges(rep, graph, rng.sample(feats, 8) + rng.sample(errs, 4))


def test_paths_predict_linearised_smollm2_and_noop_is_noop(setup):
    loaded, coders, tokens, rep, graph = setup
    feats = (graph.kind == FEATURE).nonzero().flatten().tolist()
    node = max(feats, key=lambda n: int(graph.layer[n]) < 20 and abs(float(graph.activation[n])))
    edit = FeatureEdit(int(graph.layer[node]), int(graph.feature[node]), "ablate", positions=[int(graph.pos[node])])
    b, a = intervene_frozen(rep, [edit], graph.targets, features="linear")
    torch.testing.assert_close(a - b, predicted_total_effects(graph, node), rtol=1e-6, atol=1e-8)
    runner = ReplacementRunner(loaded.adapter, coders, tokens)
    b, a = runner.intervene([FeatureEdit(3, 0, "scale", 1.0)], graph.targets)
    assert torch.equal(a, b)


def test_qk_pair_terms_sum_to_smollm2s_score_and_a_removal_moves_it_by_its_terms(setup):
    from test_circuits_qk import reference_scores

    from transcoders.circuits.attribution import SourceIndex
    from transcoders.circuits.qk import column_source, qk_attribution

    _, _, _, rep, _ = setup
    index, T = SourceIndex(rep), rep.n_pos
    for layer, head, q, k in [(20, 7, T - 1, 1), (6, 0, T - 1, T - 2), (0, 4, 3, 0)]:
        a = qk_attribution(rep, layer, head, q, k, index=index)
        terms = a.terms(torch.arange(a.query.shape[0]), torch.arange(a.key.shape[0]))
        ref = float(reference_scores("llama", rep, layer)[head, q, k])
        assert abs(float(terms.sum()) - ref) < 1e-9 * abs(ref), (layer, head)
    # Remove the strongest query-side feature of head 20.7: the score moves by minus its terms.
    a = qk_attribution(rep, 20, 7, T - 1, 1, index=index)
    mq = a.query_marginals()
    for col in mq[:-1].abs().argsort(descending=True).tolist():
        src = column_source(rep, index, col, layer=20, pos=T - 1, side="q")
        if src["kind"] == "feature":
            break
    f = rep.layers[src["layer"]].features
    j = int(((f.pos == src["pos"]) & (f.feature == src["feature"])).nonzero()[0, 0])
    write = torch.zeros(T, rep.d_model, dtype=rep.dtype)
    write[src["pos"]] = f.activation[j] * rep.coder_weight(src["layer"], "W_dec")[src["feature"]]
    removed = rep.forward(delta_post={src["layer"]: -write}).resid_pre[20]
    before, after = reference_scores("llama", rep, 20), reference_scores("llama", rep, 20, resid=removed)
    moved = float(after[7, T - 1, 1] - before[7, T - 1, 1])
    assert moved == pytest.approx(-float(mq[col]), rel=1e-8)
