"""Cross-layer transcoders: circuit-tracer's file format, splicing, and exact attribution.

The central property is the one per-layer graphs have: in the frozen replacement model,
removing a source's write (for a CLT feature, its decoder rows into every later layer, built
here straight from the CLT's tensors) moves each target by exactly its edge, in float64 on tiny
random models with random CLTs.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import build_tiny_model
from safetensors.torch import load_file

from transcoders.circuits import LocalReplacement, attribute
from transcoders.circuits.graph import BIAS, EMBEDDING, ERROR, FEATURE
from transcoders.circuits.interventions import FeatureEdit, ReplacementRunner, frozen_target_values, intervene_frozen
from transcoders.circuits.replacement import ReplacementError
from transcoders.circuits.targets import Target
from transcoders.circuits.verify import check_edges, predicted_total_effects
from transcoders.coders.clt import CrossLayerTranscoder, read_clt, write_clt
from transcoders.coders.coder import SparseCoder
from transcoders.coders.config import CoderConfig
from transcoders.coders.io import CoderFileError
from transcoders.evaluation.clt import evaluate_clt
from transcoders.evaluation.metrics import evaluate_coders
from transcoders.evaluation.splice import coder_replacement, splice_clt, splice_mlps
from transcoders.models import adapter_for

TOKENS = torch.arange(3, 13)


def make_clt(n_layers: int, d: int, *, d_sae: int = 48, activation: str = "relu", reads: str = "mlp_in", seed: int = 0,
             cross: bool = True, dtype=torch.float64) -> CrossLayerTranscoder:
    g = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(n_layers, d, d_sae, activation=activation, reads=reads, dtype=dtype)
    with torch.no_grad():
        for p in (clt.W_enc, clt.b_enc, clt.b_dec):
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * (d**-0.5 if p is clt.W_enc else 0.1))
        clt.b_enc -= 0.1  # about a third of the features fire
        for W in clt.W_dec:
            W.copy_(torch.randn(W.shape, generator=g, dtype=dtype) * 0.2)
            if not cross:
                W[:, 1:] = 0
        if clt.threshold is not None:
            clt.threshold.fill_(0.05)
    return clt.requires_grad_(False)


def per_layer_coders(clt: CrossLayerTranscoder) -> dict[int, SparseCoder]:
    """Independent per-layer transcoders with a CLT's encoders and own-layer decoders."""
    coders = {}
    for layer in range(clt.n_layers):
        cfg = CoderConfig(kind="transcoder", activation=clt.activation, d_in=clt.d_model, d_out=clt.d_model,
                          d_sae=clt.d_sae, k=None, layer=layer)
        c = SparseCoder(cfg, dtype=clt.W_enc.dtype)
        with torch.no_grad():
            c.W_enc.copy_(clt.W_enc[layer])
            c.b_enc.copy_(clt.b_enc[layer])
            c.W_dec.copy_(clt.W_dec[layer][:, 0])
            c.b_dec.copy_(clt.b_dec[layer])
            if c.threshold is not None:
                c.threshold.copy_(clt.threshold[layer])
        coders[layer] = c.requires_grad_(False)
    return coders


# ---------------------------------------------------------------------------- files
def test_files_are_circuit_tracers_layout_and_round_trip(tmp_path):
    clt = make_clt(3, 8, d_sae=16, activation="jumprelu", dtype=torch.float32)
    write_clt(clt, tmp_path / "clt")
    enc, dec = load_file(tmp_path / "clt" / "W_enc_1.safetensors"), load_file(tmp_path / "clt" / "W_dec_1.safetensors")
    assert {k: tuple(v.shape) for k, v in enc.items()} == {"W_enc_1": (16, 8), "b_enc_1": (16,), "b_dec_1": (8,),
                                                            "threshold_1": (16,)}
    assert tuple(dec["W_dec_1"].shape) == (16, 2, 8)  # [d_sae, n_layers - i, d_model]
    assert torch.equal(dec["W_dec_1"][:, 1], clt.W_dec[1][:, 1])
    back = read_clt(tmp_path / "clt")
    assert (back.reads, back.activation) == ("mlp_in", "jumprelu")
    for a, b in zip(clt.parameters(), back.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(FileExistsError, match="--force"):
        write_clt(clt, tmp_path / "clt")
    write_clt(clt, tmp_path / "clt", force=True)


def test_reading_follows_the_config_hook_and_refuses_broken_folders(tmp_path):
    clt = make_clt(2, 8, d_sae=16, dtype=torch.float32)
    folder = write_clt(clt, tmp_path / "clt")
    (folder / "config.yaml").unlink()  # a bare folder, as circuit-tracer's load_clt reads: hook_resid_mid
    assert read_clt(folder).reads == "resid_mid"
    assert read_clt(folder, reads="mlp_in").reads == "mlp_in"
    (folder / "config.yaml").write_text("model_kind: transcoder_set\n")
    with pytest.raises(ValueError, match="model_kind"):
        read_clt(folder)
    (folder / "config.yaml").write_text("feature_input_hook: hook_resid_pre\n")
    with pytest.raises(ValueError, match="feature_input_hook"):
        read_clt(folder)
    (folder / "config.yaml").unlink()
    bad = load_file(folder / "W_dec_1.safetensors")
    from safetensors.torch import save_file

    save_file({"W_dec_1": bad["W_dec_1"][:, :, :4].contiguous()}, folder / "W_dec_1.safetensors")
    with pytest.raises(CoderFileError, match="W_dec_1 has shape"):
        read_clt(folder)
    (folder / "W_enc_1.safetensors").rename(folder / "W_enc_3.safetensors")
    with pytest.raises(CoderFileError, match="without gaps"):
        read_clt(folder)
    with pytest.raises(CoderFileError, match="not a cross-layer transcoder folder"):
        read_clt(tmp_path)


def test_forward_is_the_clt_equation():
    clt = make_clt(3, 8, d_sae=16)
    xs = torch.randn(3, 5, 8, dtype=torch.float64)
    out = clt(xs)
    for t in range(3):
        want = clt.b_dec[t].clone()
        for s in range(t + 1):
            f = torch.relu(xs[s] @ clt.W_enc[s].T + clt.b_enc[s])
            want = want + f @ clt.W_dec[s][:, t - s]
        torch.testing.assert_close(out[t], want)


# ---------------------------------------------------------------------------- splicing
def test_without_cross_decoders_a_clt_splices_like_its_per_layer_transcoders():
    model = build_tiny_model("llama", dtype=torch.float64)
    ad = adapter_for(model)
    clt = make_clt(ad.n_layers, ad.d_model, cross=False)
    coders = per_layer_coders(clt)
    ids = TOKENS[None]
    with splice_mlps(ad, {layer: coder_replacement(c) for layer, c in coders.items()}):
        want = model(ids).logits
    with splice_clt(ad, clt):
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with splice_mlps(ad, {1: coder_replacement(coders[1])}):
        want = model(ids).logits
    with splice_clt(ad, clt, [1]):
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_cross_decoders_write_into_later_layers_when_spliced():
    model = build_tiny_model("llama", dtype=torch.float64)
    ad = adapter_for(model)
    clt = make_clt(ad.n_layers, ad.d_model)
    ids = TOKENS[None]
    outs: dict = {}
    with splice_clt(ad, clt, (), outputs=outs) as acts:  # nothing spliced: the clean model
        clean = model(ids).logits
    torch.testing.assert_close(clean, model(ids).logits, rtol=0, atol=0)
    # Splicing only the last layer: its output is the decoders of every layer's clean features.
    want_last = clt.b_dec[2] + sum(acts[s] @ clt.W_dec[s][:, 2 - s] for s in range(3))

    seen = {}
    with splice_clt(ad, clt, [2]), ad.hook_mlps([2], on_output=lambda _l, _x, y: seen.__setitem__("y", y)):
        model(ids)
    torch.testing.assert_close(seen["y"], want_last)


def test_evaluate_clt_matches_per_layer_evaluation_without_cross_decoders():
    model = build_tiny_model("llama", dtype=torch.float64)
    ad = adapter_for(model)
    clt = make_clt(ad.n_layers, ad.d_model, cross=False)
    tokens = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(1))
    got = evaluate_clt(ad, clt, tokens, batch_size=2, progress=False, skip_first=1)
    want = evaluate_coders(ad, per_layer_coders(clt), tokens, batch_size=2, progress=False, skip_first=1, together=True)
    for layer in ("0", "1", "2"):
        for key in ("l0", "fvu", "ce_spliced", "kl", "ce_zero_ablation", "ce_loss_recovered", "dead_fraction"):
            # evaluate_coders measures reconstructions in float32
            assert got["layers"][layer][key] == pytest.approx(want["layers"][layer][key], rel=1e-6, abs=1e-12), key
    for key in ("ce_spliced", "kl", "ce_zero_ablation", "loss_recovered_vs_zero"):
        assert got["spliced_together"][key] == pytest.approx(want["spliced_together"][key], rel=1e-9), key


# ---------------------------------------------------------------------------- attribution
CASES = [("llama", "mlp_in", "relu"), ("llama", "resid_mid", "jumprelu"), ("gpt2", "resid_mid", "relu"),
         ("gemma2", "resid_mid", "relu"), ("gpt_neox", "mlp_in", "jumprelu")]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(c))
def setup(request):
    family, reads, activation = request.param
    model = build_tiny_model(family, dtype=torch.float64)
    ad = adapter_for(model)
    clt = make_clt(ad.n_layers, ad.d_model, activation=activation, reads=reads)
    rep = LocalReplacement(ad, clt, TOKENS, dtype=torch.float64, constant_positions=(0,))
    f1 = rep.layers[1].features
    targets = [Target("logit", -1, token=5), Target("logit_diff", 6, token=7, token_b=9),
               Target("feature", int(f1.pos[-1]), layer=1, feature=int(f1.feature[-1]))]
    graph = attribute(rep, targets, batch_size=7)
    return ad, clt, rep, graph


def test_the_replacement_model_reproduces_the_model(setup):
    _, _, rep, _ = setup
    ref = rep.model_logits.double()
    assert ((rep.capped(rep.logits) - ref).abs().max() / ref.abs().max()) < 1e-6  # model_logits are kept in float32


def test_rows_balance(setup):
    *_, graph = setup
    rows, residual = graph.row_balance()
    assert len(rows) == graph.meta["feature_rows"] + len(graph.targets)
    assert residual.abs().max() < 1e-9 * graph.value[rows].abs().max()


def test_removing_a_source_moves_each_target_by_its_edge(setup):
    """Writes built here from the CLT's own tensors: a feature at (s, pos) writes a W_dec[s][f, t - s]
    into resid_post[t] for every t >= s."""
    _, clt, rep, graph = setup
    base = frozen_target_values(rep, rep.forward(), graph.targets)
    rng = random.Random(0)
    by_kind = {k: (graph.kind == k).nonzero().flatten().tolist() for k in (EMBEDDING, BIAS, ERROR, FEATURE)}
    nodes = [n for k, ns in by_kind.items() for n in rng.sample(ns, min(8 if k == FEATURE else 4, len(ns)))]
    T, d, L = rep.n_pos, rep.d_model, rep.n_layers
    assert any(int(graph.layer[n]) < L - 1 for n in by_kind[FEATURE])  # some features write into later layers
    for node in nodes:
        kind, layer, pos = int(graph.kind[node]), int(graph.layer[node]), int(graph.pos[node])
        post, attn = {}, {}
        if kind == FEATURE:
            for t in range(layer, L):
                v = torch.zeros(T, d, dtype=torch.float64)
                v[pos] = graph.activation[node] * clt.W_dec[layer][int(graph.feature[node]), t - layer]
                post[t] = -v
        else:
            v = torch.zeros(T, d, dtype=torch.float64)
            if kind == EMBEDDING:
                v[pos], layer = rep.resid0[pos], -1
            elif kind == ERROR:
                v[pos] = rep.layers[layer].error[pos]
            else:
                v[pos] = rep.layers[layer].mlp_const[pos]
                a = torch.zeros(T, d, dtype=torch.float64)
                a[pos] = rep.layers[layer].attn_const[pos]
                attn[layer] = -a
            post[layer] = -v
        after = frozen_target_values(rep, rep.forward(post, attn), graph.targets)
        for i, tnode in enumerate(graph.target_nodes.tolist()):
            edge = graph.edge_weight[(graph.edge_dst == tnode) & (graph.edge_src == node)].double().sum()
            assert abs(float(base[i] - after[i] - edge)) <= 1e-8 * max(abs(float(edge)), 1e-3), (graph.label(node), i)
    for row in check_edges(rep, graph, top=10):  # verify's own check goes through every layer a feature writes
        assert row["abs_error"] <= 1e-8 * max(abs(row["predicted"]), 1e-3), row


def test_graph_paths_predict_the_linearised_model(setup):
    _, _, rep, graph = setup
    feats = (graph.kind == FEATURE).nonzero().flatten().tolist()
    for node in random.Random(2).sample(feats, 4):
        edit = FeatureEdit(int(graph.layer[node]), int(graph.feature[node]), "ablate", positions=[int(graph.pos[node])])
        before, after = intervene_frozen(rep, [edit], graph.targets, features="linear")
        torch.testing.assert_close(after - before, predicted_total_effects(graph, node), rtol=1e-6, atol=1e-9)


def test_the_free_replacement_model_holds_errors_and_moves_with_edits(setup):
    ad, clt, rep, graph = setup
    runner = ReplacementRunner(ad, clt, TOKENS)
    clean = runner.run()
    torch.testing.assert_close(rep.capped(clean["logits"]), ad.model(TOKENS[None]).logits[0], rtol=1e-8, atol=1e-8)
    node = int((graph.kind == FEATURE).nonzero().flatten()[0])
    edit = FeatureEdit(int(graph.layer[node]), int(graph.feature[node]), "ablate", positions=[int(graph.pos[node])])
    acts: dict = {}
    runner.run([edit], record_acts=acts)
    assert acts[edit.layer][edit.positions[0], edit.feature] == 0
    assert not torch.equal(runner.run([edit])["logits"], clean["logits"])


def test_without_cross_decoders_the_graph_is_the_per_layer_graph():
    model = build_tiny_model("llama", dtype=torch.float64)
    ad = adapter_for(model)
    clt = make_clt(ad.n_layers, ad.d_model, cross=False)
    targets = [Target("logit", -1, token=5)]
    a = attribute(LocalReplacement(ad, clt, TOKENS, dtype=torch.float64), targets)
    b = attribute(LocalReplacement(ad, per_layer_coders(clt), TOKENS, dtype=torch.float64), targets)
    assert torch.equal(a.kind, b.kind) and torch.equal(a.feature, b.feature)
    key = lambda g: {(int(s), int(d)): float(w) for s, d, w in zip(g.edge_src, g.edge_dst, g.edge_weight)}
    ka, kb = key(a), key(b)
    assert ka.keys() == kb.keys()
    assert max(abs(ka[k] - kb[k]) for k in ka) < 1e-12


def test_clear_refusals():
    model = build_tiny_model("gpt_neox", dtype=torch.float64)
    ad = adapter_for(model)
    with pytest.raises(ReplacementError, match="parallel block"):
        LocalReplacement(ad, make_clt(ad.n_layers, ad.d_model, reads="resid_mid"), TOKENS, dtype=torch.float64)
    with pytest.raises(ReplacementError, match="spans 2 layers"):
        LocalReplacement(ad, make_clt(2, ad.d_model), TOKENS, dtype=torch.float64)
    rep = LocalReplacement(ad, make_clt(ad.n_layers, ad.d_model), TOKENS, dtype=torch.float64)
    with pytest.raises(ReplacementError, match="per-layer transcoders"):
        rep.require_per_layer("QK attribution")


def test_head_splits_of_clt_edges_sum_to_the_edge(setup):
    from transcoders.circuits.heads import split_edge, split_edge_last

    _, _, rep, graph = setup
    feats = graph.kind[graph.edge_src] == FEATURE
    later = graph.layer[graph.edge_src] < graph.layer[graph.edge_dst] - 1  # the feature also writes past its own layer
    picks = (feats & later).nonzero().flatten()
    picks = picks[graph.edge_weight[picks].abs().argsort(descending=True)[:6]].tolist()
    assert picks
    for e in picks:
        s, d, w = int(graph.edge_src[e]), int(graph.edge_dst[e]), float(graph.edge_weight[e])
        for split in (split_edge, split_edge_last):
            assert sum(p.weight for p in split(rep, graph, s, d)) == pytest.approx(w, rel=1e-8, abs=1e-12)


def test_analyses_defined_for_per_layer_transcoders_refuse_a_clt(setup):
    from transcoders.circuits.qk import qk_attribution
    from transcoders.circuits.weights import WeightsError, logit_effects

    ad, clt, rep, _ = setup
    with pytest.raises(ReplacementError, match="QK attribution needs per-layer"):
        qk_attribution(rep, 1, 0, rep.n_pos - 1, 2)
    with pytest.raises(WeightsError, match="cross-layer"):
        logit_effects(ad, clt, 0, 3)


def test_cli_traces_verifies_and_evaluates_a_clt_folder(tmp_path):
    import json

    from click.testing import CliRunner
    from conftest import build_tiny_tokenizer, write_texts
    from test_cli_circuits import PROMPT
    from transformers import LlamaConfig, LlamaForCausalLM

    from transcoders.cli import main

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=len(tok), max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    write_clt(make_clt(3, 32, dtype=torch.float32, reads="resid_mid"), tmp_path / "clt")
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])
    r = run("trace", tmp_path / "clt", "--model", tmp_path / "m", "--prompt", PROMPT, "--out", tmp_path / "g.json")
    assert r.exit_code == 0, r.output
    r = run("verify", tmp_path / "g.json", "--model", tmp_path / "m", "--run-dir", tmp_path / "clt")
    assert r.exit_code == 0, r.output
    err = float(r.output.split("max |measured - predicted| = ")[1].split()[0])
    assert err < 1e-4  # float32 graph, every edge exact in the frozen model
    train, _ = write_texts(tmp_path)
    r = run("evaluate", tmp_path / "clt", "--model", tmp_path / "m", "--data", train, "--eval-tokens", 256, "--quiet")
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "clt" / "eval" / "train" / "metrics.json").read_text())
    assert set(metrics["layers"]) == {"0", "1", "2"} and metrics["spliced_together"]["layers"] == [0, 1, 2]
    r = run("trace", tmp_path / "clt", "--model", tmp_path / "m", "--prompt", PROMPT, "--out", tmp_path / "h.json", "--qk")
    assert r.exit_code != 0 and "needs per-layer transcoders" in r.output


def test_mean_activations_of_a_clt_read_what_the_clt_reads():
    from transcoders.circuits.interventions import mean_activations

    model = build_tiny_model("llama", dtype=torch.float64)
    ad = adapter_for(model)
    clt = make_clt(ad.n_layers, ad.d_model, reads="resid_mid")
    contexts = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(2))
    seen: dict = {}
    hooks = [ad.block_internals(layer).ln_mlp.module.register_forward_pre_hook(
        lambda _m, args, layer=layer: seen.__setitem__(layer, args[0])) for layer in range(ad.n_layers)]
    try:
        model(contexts)
    finally:
        for h in hooks:
            h.remove()
    got = mean_activations(ad, clt, contexts, batch_size=2)
    for layer in range(ad.n_layers):
        want = torch.relu(seen[layer][:, 1:] @ clt.W_enc[layer].T + clt.b_enc[layer]).mean((0, 1))
        torch.testing.assert_close(got[layer].double(), want, rtol=1e-6, atol=1e-7)
