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
