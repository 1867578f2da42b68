"""The faithfulness benchmark, checked against computations that do not use its code: the plain
Hugging Face model with forward hooks written here, autograd on leaves injected here, and areas
computed by hand.

- Areas: MIB's trapezoids on a known curve.
- EAP-IG over components: with every edge kept the patched model is the clean model (1e-9 in
  float64); with none it is the counterfactual model; removing every edge out of one source is
  replacing that source's output (an MLP's, one head's) by its counterfactual value in a plain
  hooked run; one IG step equals gradient x activation difference from autograd.
- Neurons: all kept is the clean model; none kept is the model with every hidden activation
  replaced by the counterfactual's in a hooked run.
- Features: the full circuit is the model and the empty one is a hooked run in which every active
  feature outside the first position takes its counterfactual value (error nodes clean), so F is
  1 and 0 there by construction.
- The CLI on a tiny task file prints the table, writes the report and plot, and refuses to
  replace them without --force.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import N_LAYERS, assert_one_line_error, build_tiny_model
from test_circuits_interventions import make_coders
from test_cli_circuits import files  # noqa: F401  (the tiny Llama + random transcoders fixture)

from transcoders.circuits import LocalReplacement, Target, attribute, node_influence
from transcoders.circuits.eap import (
    ComponentError,
    ComponentRunner,
    ablated_outputs,
    eap_ig_scores,
    edge_circuit_values,
    fraction_sizes,
    task_metric,
)
from transcoders.circuits.faithfulness import (
    BenchmarkError,
    BenchmarkItem,
    aggregate,
    areas,
    benchmark_prompt,
    check_item,
    faithfulness_curve,
    faithfulness_values,
    mib_summary,
    reference_means,
)
from transcoders.circuits.interventions import ReplacementRunner
from transcoders.circuits.neurons import NeuronRunner, neuron_circuit_values, neuron_scores
from transcoders.cli import main
from transcoders.models import adapter_for

pytestmark = pytest.mark.usefixtures("single_thread")

D = 32
TOKENS = torch.arange(3, 13)  # 10 positions, no family's BOS id
CF = torch.tensor([3, 4, 5, 60, 61, 8, 70, 71, 72, 73])  # same length, same first tokens
TARGETS = [Target("logit_diff", -1, token=5, token_b=7, label="diff")]


def metric(logits: torch.Tensor) -> float:
    return float(logits[-1, 5].double() - logits[-1, 7].double())


# ------------------------------------------------------------- the model, read directly
def blocks(model, family):
    return {"gpt2": lambda: model.transformer.h, "gpt_neox": lambda: model.gpt_neox.layers}.get(
        family, lambda: model.model.layers)()


def out_proj(model, family, layer):
    b = blocks(model, family)[layer]
    return {"gpt2": lambda: b.attn.c_proj, "gpt_neox": lambda: b.attention.dense}.get(family, lambda: b.self_attn.o_proj)()


def head_write(model, family, layer, z: torch.Tensor, head: int) -> torch.Tensor:
    """Head ``head``'s write ``[T, d]`` from the output projection's input ``z [T, H*dh]``."""
    proj = out_proj(model, family, layer)
    dh = z.shape[-1] // 4
    sl = slice(head * dh, (head + 1) * dh)
    if family == "gpt2":  # Conv1D: x @ W, W [in, out]
        return z[:, sl] @ proj.weight[sl]
    return z[:, sl] @ proj.weight[:, sl].T


def hidden_module(model, family, layer):
    mlp = blocks(model, family)[layer].mlp
    return {"gpt2": lambda: mlp.c_proj, "gpt_neox": lambda: mlp.dense_4h_to_h}.get(family, lambda: mlp.down_proj)()


@torch.no_grad()
def hooked(model, family, tokens, *, mlp_out=None, z_slice=None, hidden=None) -> dict:
    """A plain forward pass recording each MLP output, each output projection's input and each
    MLP hidden activation; ``mlp_out[layer] [T, d]`` replaces an MLP's output, ``z_slice =
    (layer, head, [T, dh])`` one head's slice of the output projection's input, ``hidden[layer]
    [T, d_mlp]`` an MLP's hidden activations."""
    rec = {"mlp": {}, "z": {}, "hidden": {}}
    handles = []
    for layer, block in enumerate(blocks(model, family)):
        def mlp_hook(_m, _a, out, layer=layer):
            rec["mlp"][layer] = out[0]
            if mlp_out and layer in mlp_out:
                return mlp_out[layer][None]

        def z_hook(_m, args, layer=layer):
            z = args[0].clone()
            if z_slice and z_slice[0] == layer:
                dh = z.shape[-1] // 4
                z[0, :, z_slice[1] * dh:(z_slice[1] + 1) * dh] = z_slice[2]
            rec["z"][layer] = z[0]
            return (z,)

        def h_hook(_m, args, layer=layer):
            a = args[0]
            if hidden and layer in hidden:
                a = hidden[layer][None]
            rec["hidden"][layer] = a[0]
            return (a,)

        handles += [block.mlp.register_forward_hook(mlp_hook), out_proj(model, family, layer).register_forward_pre_hook(z_hook),
                    hidden_module(model, family, layer).register_forward_pre_hook(h_hook)]
    try:
        rec["logits"] = model(input_ids=tokens[None]).logits[0]
    finally:
        for h in handles:
            h.remove()
    return rec


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox", "llama"])
def family_model(request):
    model = build_tiny_model(request.param, dtype=torch.float64)
    return request.param, model, adapter_for(model)


# ------------------------------------------------------------- areas
def test_areas_are_mibs_trapezoids_on_a_known_curve():
    fr, F = [0.001, 0.01, 0.1, 1.0], [0.0, 0.5, 0.8, 1.0]
    a = areas(fr, F)
    # by hand: widths 0.009, 0.09, 0.9; CPR = sum w (F_i + F_i+1)/2; CMD = sum w (|1-F_i| + |1-F_i+1|)/2
    assert a["cpr"] == pytest.approx(0.009 * 0.25 + 0.09 * 0.65 + 0.9 * 0.9, abs=1e-15)
    assert a["cmd"] == pytest.approx(0.009 * 0.75 + 0.09 * 0.35 + 0.9 * 0.1, abs=1e-15)
    # overshoot counts in CMD (|1 - F|), not against CPR
    b = areas([0.5, 1.0], [1.5, 1.0])
    assert b == pytest.approx({"cpr": 0.5 * 1.25, "cmd": 0.5 * 0.25})
    # a log axis integrates over ln(fraction)
    c = areas([0.01, 1.0], [0.0, 1.0], log_x=True)
    assert c["cpr"] == pytest.approx(math.log(100) / 2)
    with pytest.raises(ValueError, match="increase"):
        areas([0.1, 0.1], [0, 1])
    with pytest.raises(ValueError, match="two"):
        areas([1.0], [1.0])


def test_sizes_and_faithfulness_values():
    assert fraction_sizes([0.001, 0.29, 0.5, 1.0], 100) == [0, 29, 50, 100]
    assert faithfulness_values([2.0, 3.0, 5.0], m_full=5.0, m_empty=1.0) == [0.25, 0.5, 1.0]
    assert math.isnan(faithfulness_values([1.0], 2.0, 2.0)[0])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        fraction_sizes([0.0, 1.0], 10)


# ------------------------------------------------------------- EAP-IG components
def test_edge_patching_all_none_and_one_source(family_model):
    family, model, ad = family_model
    runner = ComponentRunner(ad)
    lay = runner.layout
    clean, corr = hooked(model, family, TOKENS), hooked(model, family, CF)
    cf_out = runner.outputs(CF)
    run = runner.run(TOKENS, keep=torch.ones_like(lay.real), ablated=cf_out)
    assert (run.logits - clean["logits"]).abs().max() <= 1e-9
    # the sources' outputs are the model's: the heads' writes sum to the attention output, MLPs as hooked
    assert (run.outputs[lay.mlp_source(1)] - clean["mlp"][1]).abs().max() <= 1e-12
    assert (run.outputs[lay.head_source(2, 3)] - head_write(model, family, 2, clean["z"][2], 3)).abs().max() <= 1e-12
    none = runner.run(TOKENS, keep=torch.zeros_like(lay.real), ablated=cf_out)
    assert (none.logits - corr["logits"]).abs().max() <= 1e-9
    assert (clean["logits"] - corr["logits"]).abs().max() > 1e-2  # the counterfactual does differ

    # every edge out of MLP 0 removed = MLP 0's output replaced by its counterfactual value
    keep = torch.ones_like(lay.real)
    keep[lay.mlp_source(0)] = False
    want = hooked(model, family, TOKENS, mlp_out={0: corr["mlp"][0]})["logits"]
    assert (runner.run(TOKENS, keep=keep, ablated=cf_out).logits - want).abs().max() <= 1e-9
    # every edge out of head 1.2 removed = that head's mixed values replaced by the counterfactual's
    keep = torch.ones_like(lay.real)
    keep[lay.head_source(1, 2)] = False
    dh = corr["z"][1].shape[-1] // 4
    want = hooked(model, family, TOKENS, z_slice=(1, 2, corr["z"][1][:, 2 * dh:3 * dh]))["logits"]
    got = runner.run(TOKENS, keep=keep, ablated=cf_out).logits
    assert (got - want).abs().max() <= 1e-9
    assert (got - clean["logits"]).abs().max() > 1e-6  # and that does change something


def _grad_at(model, family, tokens, module, replace) -> torch.Tensor:
    """``dM/dx`` for a leaf ``x`` (equal to the value there) that ``replace(module_io, leaf)``
    injects at one receiver; ``module`` gets a pre-hook (norm inputs) or a forward hook (q/k/v)."""
    store = {}

    def pre(_m, args):
        leaf = args[0][0].detach().clone().requires_grad_(True)
        store["leaf"] = leaf
        return (leaf[None],)

    handle = module.register_forward_pre_hook(pre) if replace is None else module.register_forward_hook(
        lambda m, args, out: replace(m, args, out, store))
    try:
        with torch.enable_grad():
            logits = model(input_ids=tokens[None]).logits[0]
            m = logits[-1, 5] - logits[-1, 7]
            (g,) = torch.autograd.grad(m, store["leaf"])
    finally:
        handle.remove()
    return g


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_one_ig_step_is_attribution_patching_by_autograd(family):
    model = build_tiny_model(family, dtype=torch.float64)
    ad = adapter_for(model)
    runner = ComponentRunner(ad)
    lay = runner.layout
    clean_out = runner.outputs(TOKENS)
    abl = ablated_outputs(clean_out, runner.outputs(CF))
    scores = eap_ig_scores(runner, TOKENS, TARGETS, abl, steps=1)
    clean, corr = hooked(model, family, TOKENS), hooked(model, family, CF)
    # sources, read here: the embeddings, the heads' writes, the MLPs' outputs
    emb = {}

    def emb_hook(_m, args, kwargs):
        emb.setdefault(len(emb), (args[0] if args else kwargs["hidden_states"])[0])

    h = blocks(model, family)[0].register_forward_pre_hook(emb_hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=TOKENS[None])
        model(input_ids=CF[None])
    h.remove()
    diff = {0: emb[0] - emb[1]}
    for layer in range(N_LAYERS):
        for head in range(4):
            diff[lay.head_source(layer, head)] = (head_write(model, family, layer, clean["z"][layer], head)
                                                  - head_write(model, family, layer, corr["z"][layer], head))
        diff[lay.mlp_source(layer)] = clean["mlp"][layer] - corr["mlp"][layer]
    block = lambda layer: blocks(model, family)[layer]
    final = {"gpt2": lambda: model.transformer.ln_f, "gpt_neox": lambda: model.gpt_neox.final_layer_norm}.get(
        family, lambda: model.model.norm)()
    grads = {lay.logits_receiver: _grad_at(model, family, TOKENS, final, None)}
    # heads read here (Llama has 2 key/value heads): distinct per kind, so a mix-up shows
    heads = (("q", 1), ("k", 1), ("v", 0)) if family == "llama" else (("q", 1), ("k", 2), ("v", 3))
    for layer in range(N_LAYERS):
        ln2 = block(layer).ln_2 if family == "gpt2" else block(layer).post_attention_layernorm
        grads[lay.mlp_receiver(layer)] = _grad_at(model, family, TOKENS, ln2, None)
        # a query, key or value head's input: its projection slice of the pre-attention norm of a leaf
        ln1 = block(layer).ln_1 if family == "gpt2" else block(layer).input_layernorm
        for kind, head in heads:
            i = "qkv".index(kind)
            if family == "gpt2":  # c_attn: [q | k | v], each head-major
                proj, start = block(layer).attn.c_attn, i * D + head * 8
            elif family == "gpt_neox":  # query_key_value: per head [q | k | v]
                proj, start = block(layer).attention.query_key_value, head * 24 + i * 8
            else:
                proj, start = getattr(block(layer).self_attn, f"{kind}_proj"), head * 8
            sl = slice(start, start + 8)
            store_x = {}
            hx = ln1.register_forward_pre_hook(lambda _m, args, store_x=store_x: store_x.__setitem__("x", args[0][0]))

            def replace(m, _args, out, store, ln1=ln1, sl=sl, store_x=store_x):
                leaf = store_x["x"].detach().clone().requires_grad_(True)
                store["leaf"] = leaf
                new = out.clone()
                new[0, :, sl] = m.forward(ln1.forward(leaf[None]))[0, :, sl]
                return new

            grads[lay.receiver(layer, kind, head)] = _grad_at(model, family, TOKENS, proj, replace)
            hx.remove()
    # Llama's RMSNorm computes in float32 even in a float64 model, so gradients through it agree
    # to float32 precision only (relative to the sum of |terms|); LayerNorms stay in float64.
    rel = 1e-6 if family == "llama" else 1e-9
    for r, g in grads.items():
        for s in range(int(lay.prefix[r])):
            want = float((diff[s] * g).sum())
            scale = float((diff[s] * g).abs().sum())
            where = (lay.source_labels()[s], lay.receiver_labels()[r])
            assert scores[s, r] == pytest.approx(want, rel=rel, abs=rel * scale + 1e-15), where
    assert (scores[~lay.real] == 0).all()
    assert scores.abs().max() > 1e-3


def test_ig_interpolates_the_input_and_circuits_recover_the_model():
    """More IG steps change the scores (the gradient is taken along the path too), and the
    top-n edge circuits go from the counterfactual model (n = 0) to the model (every edge)."""
    model = build_tiny_model("llama", dtype=torch.float64)
    runner = ComponentRunner(adapter_for(model))
    clean_out = runner.outputs(TOKENS)
    abl = ablated_outputs(clean_out, runner.outputs(CF))
    s1 = eap_ig_scores(runner, TOKENS, TARGETS, abl, steps=1)
    s5 = eap_ig_scores(runner, TOKENS, TARGETS, abl, steps=5)
    assert not torch.allclose(s1, s5)
    n = runner.layout.n_edges
    full, empty, values = edge_circuit_values(runner, TOKENS, TARGETS, abl, s5, [0, n // 2, n])
    assert values[0] == pytest.approx(empty, abs=1e-12) and values[-1] == pytest.approx(full, abs=1e-12)
    assert full == pytest.approx(metric(hooked(model, "llama", TOKENS)["logits"]), abs=1e-9)
    assert empty == pytest.approx(metric(hooked(model, "llama", CF)["logits"]), abs=1e-9)


def test_eap_refuses_what_it_cannot_do():
    gemma = adapter_for(build_tiny_model("gemma2", dtype=torch.float64))
    with pytest.raises(ComponentError, match="post_attention_layernorm"):
        ComponentRunner(gemma)
    runner = ComponentRunner(adapter_for(build_tiny_model("llama", dtype=torch.float64)))
    with pytest.raises(ComponentError, match="same length|as many tokens"):
        ablated_outputs(runner.outputs(TOKENS), runner.outputs(CF[:-1]))
    item = BenchmarkItem(TOKENS, CF[:-1], TARGETS, "a prompt", "a counterfactual")
    with pytest.raises(BenchmarkError, match="same length"):
        check_item(item, ["counterfactual"])
    check_item(item, ["mean"])  # mean ablation needs no counterfactual
    with pytest.raises(ValueError, match="logits"):
        task_metric([Target("feature", -1, layer=0, feature=1)], torch.zeros(10, 5))


# ------------------------------------------------------------- neurons
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_neuron_ablation_all_and_none(family):
    model = build_tiny_model(family, dtype=torch.float64)
    ad = adapter_for(model)
    nr = NeuronRunner(ad)
    clean, corr = hooked(model, family, TOKENS), hooked(model, family, CF)
    ref = nr.hidden(CF)
    for layer in range(N_LAYERS):
        assert (ref[layer] - corr["hidden"][layer]).abs().max() == 0
    all_kept = {layer: torch.ones_like(ref[layer], dtype=torch.bool) for layer in ref}
    assert (nr.run(TOKENS, keep=all_kept, reference=ref) - clean["logits"]).abs().max() <= 1e-12
    none = {layer: torch.zeros_like(ref[layer], dtype=torch.bool) for layer in ref}
    want = hooked(model, family, TOKENS, hidden=corr["hidden"])["logits"]
    assert (nr.run(TOKENS, keep=none, reference=ref) - want).abs().max() <= 1e-12

    scores = neuron_scores(nr, TOKENS, TARGETS, ref)
    assert scores.shape == (N_LAYERS, len(TOKENS), ref[0].shape[-1])
    # one step: (a_clean - a_cf) x dM/da from a leaf added to the hidden activations of layer 1
    delta = torch.zeros_like(ref[1], requires_grad=True)
    h = hidden_module(model, family, 1).register_forward_pre_hook(lambda _m, args: (args[0] + delta[None],))
    with torch.enable_grad():
        g = torch.autograd.grad(metric_t(model(input_ids=TOKENS[None]).logits[0]), delta)[0]
    h.remove()
    assert torch.allclose(scores[1], ((clean["hidden"][1] - corr["hidden"][1]) * g).double(), rtol=1e-9, atol=1e-14)

    ks = [0, 5, scores[:, 1:].numel()]
    full, empty, values = neuron_circuit_values(nr, TOKENS, TARGETS, ref, scores, ks, keep_positions=(0,))
    assert full == pytest.approx(metric(clean["logits"]), abs=1e-12)
    hidden = {layer: torch.cat([clean["hidden"][layer][:1], corr["hidden"][layer][1:]]) for layer in ref}
    assert empty == pytest.approx(metric(hooked(model, family, TOKENS, hidden=hidden)["logits"]), abs=1e-12)
    assert values[0] == pytest.approx(empty, abs=1e-12) and values[-1] == pytest.approx(full, abs=1e-12)


def metric_t(logits):
    return logits[-1, 5] - logits[-1, 7]


# ------------------------------------------------------------- transcoder features
@pytest.fixture(scope="module")
def llama_setup():
    model = build_tiny_model("llama", dtype=torch.float64)
    ad = adapter_for(model)
    coders = make_coders(ad.n_layers)
    rep = LocalReplacement(ad, coders, TOKENS, dtype=torch.float64, constant_positions=())
    graph = attribute(rep, TARGETS)
    node_influence(graph)
    return model, ad, coders, graph


def test_feature_circuits_full_is_the_model_and_empty_a_hooked_run(llama_setup):
    model, ad, coders, graph = llama_setup
    runner = ReplacementRunner(ad, coders, TOKENS)
    cf_acts = ReplacementRunner(ad, coders, CF).clean_activations()
    fr = [0.01, 0.1, 0.5, 1.0]
    curve = faithfulness_curve(runner, graph, TARGETS, fr, reference=cf_acts, keep_positions=(0,))
    clean_acts = runner.clean_activations()
    n_active = sum(int((a[1:] != 0).sum()) for a in clean_acts.values())
    assert curve.n_total == n_active and curve.sizes == [int(f * n_active) for f in fr]
    assert curve.m_full == pytest.approx(metric(hooked(model, "llama", TOKENS)["logits"]), abs=1e-9)
    assert curve.F[-1] == pytest.approx(1.0, abs=1e-12)

    # the empty circuit by hand: every MLP is its transcoder plus the clean error, with each
    # feature active on the prompt (outside position 0) at its counterfactual value
    clean = hooked(model, "llama", TOKENS)
    clean_in = hooked_mlp_in(model, TOKENS)
    error = {layer: clean["mlp"][layer] - coders[layer](clean_in[layer]) for layer in range(N_LAYERS)}
    mlp_in = {}
    handles = []
    for layer, block in enumerate(model.model.layers):
        coder = coders[layer]

        def pre(_m, args, layer=layer):
            mlp_in[layer] = args[0][0]

        def post(_m, _a, out, layer=layer, coder=coder):
            a = coder.encode(mlp_in[layer])
            active = clean_acts[layer] != 0
            active[0] = False
            a = torch.where(active, cf_acts[layer], a)
            return (coder.decode(a) + error[layer])[None]

        handles += [block.mlp.register_forward_pre_hook(pre), block.mlp.register_forward_hook(post)]
    with torch.no_grad():
        empty = metric(model(input_ids=TOKENS[None]).logits[0])
    for h in handles:
        h.remove()
    assert curve.m_empty == pytest.approx(empty, abs=1e-9)
    assert abs(curve.m_full - curve.m_empty) > 1e-3

    means = {layer: torch.rand(64, dtype=torch.float64) for layer in coders}
    mean_curve = faithfulness_curve(runner, graph, TARGETS, fr, reference=means, ablation="mean", keep_positions=(0,))
    assert mean_curve.F[-1] == pytest.approx(1.0, abs=1e-12) and mean_curve.ablation == "mean"
    with pytest.raises(BenchmarkError, match="as many tokens"):
        faithfulness_curve(runner, graph, TARGETS, fr, reference={k: v[:-1] for k, v in cf_acts.items()})


@torch.no_grad()
def hooked_mlp_in(model, tokens):
    rec = {}
    hs = [b.mlp.register_forward_pre_hook(lambda _m, a, i=i: rec.__setitem__(i, a[0][0]))
          for i, b in enumerate(model.model.layers)]
    model(input_ids=tokens[None])
    for h in hs:
        h.remove()
    return rec


def test_benchmark_prompt_runs_every_method_and_aggregates(llama_setup):
    _model, ad, coders, _graph = llama_setup
    means = reference_means(ad, coders, [TOKENS, CF, torch.arange(30, 42)])
    item = BenchmarkItem(TOKENS, CF, TARGETS, "p", "c")
    fr = [0.05, 0.2, 1.0]
    curves = benchmark_prompt(ad, coders, item, fractions=fr, means=means, ig_steps=2, keep_positions=(0,))
    kinds = [(c.method, c.ablation, c.ranking) for c in curves]
    assert kinds == [("features", "counterfactual", "influence"), ("features", "mean", "influence"),
                     ("eap-ig", "counterfactual", "signed"), ("eap-ig", "counterfactual", "absolute"),
                     ("eap-ig", "mean", "signed"), ("eap-ig", "mean", "absolute"),
                     ("neurons", "counterfactual", "signed"), ("neurons", "counterfactual", "absolute"),
                     ("neurons", "mean", "signed"), ("neurons", "mean", "absolute")]
    feats = curves[0]
    for c in curves:
        assert all(math.isfinite(f) for f in c.F), c
        if c.method in ("features", "eap-ig"):
            assert c.F[-1] == pytest.approx(1.0, abs=1e-9)
        if c.method == "neurons":
            assert c.sizes == feats.sizes  # the same k as the feature circuits
    rows = aggregate([curves, curves])
    assert rows[0]["F"] == pytest.approx(feats.F) and rows[0]["cpr"] == pytest.approx(areas(fr, feats.F)["cpr"])
    summary = mib_summary(rows)
    eap_cf = next(s for s in summary if s["method"] == "eap-ig" and s["ablation"] == "counterfactual")
    assert eap_cf["cpr"] == pytest.approx(areas(fr, curves[2].F)["cpr"])
    assert eap_cf["cmd"] == pytest.approx(areas(fr, curves[3].F)["cmd"])


# ------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def bench_files(files, tmp_path_factory):  # noqa: F811
    """The tiny Llama and random transcoders of ``test_cli_circuits`` with a two-item task."""
    root = tmp_path_factory.mktemp("faithfulness")
    task = root / "task.jsonl"
    task.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "Fellow citizens of the Senate", "counterfactual": "Fellow citizens of the House", "target": "diff:#5,#7"},
        {"prompt": "The quick brown fox jumps", "counterfactual": "The quick brown dog jumps", "target": "diff:#9,#11"},
    ]) + "\n")
    return {"model": files["model"], "run": files["run"], "task": task, "root": root}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSCODERS_CACHE", str(tmp_path / "cache"))


def bench(bf, *extra):
    return CliRunner().invoke(main, [str(a) for a in ("benchmark-faithfulness", bf["task"], "--run", bf["run"],
                                                      "--model", bf["model"], "--fractions", "0.1,0.5,1",
                                                      "--ig-steps", "2", "--mean-tokens", "0", "--quiet", *extra)])


def test_cli_writes_report_and_plot_and_refuses_to_replace_them(bench_files, tmp_path):
    out, plot = tmp_path / "report.json", tmp_path / "curve.png"
    result = bench(bench_files, "--out", out, "--plot", plot)
    assert result.exit_code == 0, result.output
    text = result.stdout
    for needle in ("features", "eap-ig", "neurons", "counterfactual", "mean", "CPR", "CMD", "10%", "100%"):
        assert needle in text
    report = json.loads(out.read_text())
    assert len(report["items"]) == 2 and report["complete"] and report["settings"]["fractions"] == [0.1, 0.5, 1.0]
    rows = {(r["method"], r["ablation"], r["ranking"]): r for r in report["aggregate"]}
    assert len(rows) == 10
    assert rows[("features", "counterfactual", "influence")]["F"][-1] == pytest.approx(1.0, abs=1e-5)
    assert rows[("eap-ig", "mean", "signed")]["F"][-1] == pytest.approx(1.0, abs=1e-5)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = bench(bench_files, "--out", out, "--plot", tmp_path / "other.png")
    assert_one_line_error(again, str(out), "--force")
    assert not (tmp_path / "other.png").exists()
    forced = bench(bench_files, "--out", out, "--plot", plot, "--force", "--limit", "1", "--methods", "features",
                   "--ablations", "mean")
    assert forced.exit_code == 0, forced.output
    assert len(json.loads(out.read_text())["items"]) == 1


def test_cli_names_a_counterfactual_of_another_length(bench_files, tmp_path):
    task = tmp_path / "bad.jsonl"
    task.write_text(json.dumps({"prompt": "the state of the union is", "counterfactual": "the state of the senate is",
                                "target": "diff:#5,#7"}) + "\n")
    result = CliRunner().invoke(main, ["benchmark-faithfulness", str(task), "--run", str(bench_files["run"]), "--model",
                                       str(bench_files["model"])])
    assert_one_line_error(result, f"{task}:1", "same length")
    task.write_text('{"prompt": "x"}\n')
    result = CliRunner().invoke(main, ["benchmark-faithfulness", str(task), "--run", str(bench_files["run"])])
    assert_one_line_error(result, f"{task}:1", "target")
