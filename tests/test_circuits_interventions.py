"""Interventions that really change something, checked against computations that do not use the
intervention code: the plain Hugging Face model with forward hooks written here, and the final
norm's formula evaluated by hand.

- Ablating a last-layer feature: the free replacement model and the frozen one (features held)
  must move the final residual stream identically, by ``-a W_dec[f]`` (nothing downstream of the
  last MLP reads the residual stream before the final norm, so there is nothing to recompute).
- Clamping a last-layer feature to ``v``: the free model's logits move exactly as the real model's
  do when ``(v - a) W_dec[f]`` is added to the last MLP's output; the frozen model's move by that
  vector pushed through the final norm with its clean denominator, then the unembedding.
- Steering: the edited greedy generation equals a generation computed here, token by token, with
  a hook that applies the same edit; and a strong clamp does change the generation.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, build_tiny_model, build_tiny_tokenizer

from transcoders.circuits import LocalReplacement, Target
from transcoders.circuits.interventions import FeatureEdit, ReplacementRunner, intervene_frozen, parse_edit, steer
from transcoders.coders.coder import SparseCoder
from transcoders.coders.config import CoderConfig
from transcoders.models import adapter_for

pytestmark = pytest.mark.usefixtures("single_thread")

D = 32
TOKENS = torch.arange(3, 13)  # 10 positions; no family's BOS id, so nothing is folded into bias nodes


def make_coders(n_layers: int, activation: str = "topk", seed: int = 0) -> dict[int, SparseCoder]:
    torch.manual_seed(seed)
    coders = {}
    for layer in range(n_layers):
        cfg = CoderConfig(kind="transcoder", activation=activation, d_in=D, d_out=D, d_sae=64, k=4, layer=layer)
        c = SparseCoder(cfg, dtype=torch.float64)
        with torch.no_grad():
            c.b_enc.normal_(0, 0.1)
            c.b_dec.normal_(0, 0.1)
        coders[layer] = c.requires_grad_(False)
    return coders


# ---------------------------------------------------------------- the model, read directly


def blocks(model, family: str):
    return {"gpt2": lambda: model.transformer.h, "gpt_neox": lambda: model.gpt_neox.layers}.get(
        family, lambda: model.model.layers)()


def mlp_in_module(model, family: str, layer: int):
    """The module whose input is the MLP input (after the pre-MLP norm)."""
    return blocks(model, family)[layer].mlp


def mlp_write_module(model, family: str, layer: int):
    """The module whose output is what the MLP adds to the residual stream (Gemma 2: after its
    post-feedforward norm)."""
    block = blocks(model, family)[layer]
    return block.post_feedforward_layernorm if family == "gemma2" else block.mlp


def final_norm_module(model, family: str):
    return {"gpt2": lambda: model.transformer.ln_f, "gpt_neox": lambda: model.gpt_neox.final_layer_norm}.get(
        family, lambda: model.model.norm)()


def uncapped(model, logits: torch.Tensor) -> torch.Tensor:
    """Logits before Gemma 2's final soft-cap ``c tanh(z / c)`` (what targets are defined on)."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if not cap else cap * torch.atanh(logits / cap)


@torch.no_grad()
def run_hf(model, family: str, tokens: torch.Tensor, add: dict[int, torch.Tensor] | None = None) -> dict:
    """One forward pass of the plain model on ``tokens [T]``; ``add[layer] [T, d]`` is added to
    that layer's MLP write. Returns the MLP inputs, the final norm's input and the logits."""
    rec: dict = {"mlp_in": {}}
    handles = []
    for layer in range(len(blocks(model, family))):
        handles.append(mlp_in_module(model, family, layer).register_forward_pre_hook(
            lambda _m, args, layer=layer: rec["mlp_in"].__setitem__(layer, args[0][0].clone())))
        if add and layer in add:
            handles.append(mlp_write_module(model, family, layer).register_forward_hook(
                lambda _m, _args, out, v=add[layer]: out + v))
    handles.append(final_norm_module(model, family).register_forward_pre_hook(
        lambda _m, args: rec.__setitem__("final_in", args[0][0].clone())))
    try:
        rec["logits"] = uncapped(model, model(input_ids=tokens[None]).logits[0].double())
    finally:
        for h in handles:
            h.remove()
    return rec


def frozen_norm_linear(model, family: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The final norm's response to ``delta [T, d]`` with its denominator held at its value on
    ``x [T, d]`` (written from each family's norm formula)."""
    norm = final_norm_module(model, family)
    w = norm.weight.double()
    if family in ("gpt2", "gpt_neox"):  # LayerNorm: centre, divide by the standard deviation, scale
        denom = (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        return (delta - delta.mean(-1, keepdim=True)) / denom * w
    if family == "gemma2":  # RMSNorm with scale 1 + w
        return delta / (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt() * (1 + w)
    return delta / (x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt() * w


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    family = request.param
    model = build_tiny_model(family, dtype=torch.float64)
    adapter = adapter_for(model)
    coders = make_coders(adapter.n_layers)
    rep = LocalReplacement(adapter, coders, TOKENS, dtype=torch.float64, constant_positions=())
    runner = ReplacementRunner(adapter, coders, TOKENS)
    clean = run_hf(model, family, TOKENS)
    return family, model, adapter, coders, rep, runner, clean


# ---------------------------------------------------------------- free = frozen where nothing reads the edit


def test_free_ablation_of_a_last_layer_feature_equals_the_frozen_effect(setup):
    """In the last layer, the free model's only difference from the frozen one is downstream of the
    edit: recomputed attention, norms and features of later layers. There are none before the final
    norm, so the final residual stream (read before the norm by a ``direction`` target) must move
    identically in both, by exactly ``-a_q W_dec[f] . u`` at every position ``q``, with ``a_q`` the
    feature's activation on the real model's MLP input."""
    family, model, adapter, coders, rep, runner, clean = setup
    L = adapter.n_layers - 1
    coder = coders[L]
    acts = coder.encode(clean["mlp_in"][L])  # [T, d_sae], from our own capture of the MLP input
    # the feature active at the most positions (ties: the larger total activation)
    f = int(((acts > 0).sum(0) * 1e3 + acts.sum(0)).argmax())
    assert (acts[:, f] > 0).sum() >= 1
    u = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    T = TOKENS.numel()
    targets = [Target("direction", q, layer=adapter.n_layers, direction=u) for q in range(T)]
    # reads before the edited MLP: unchanged in both settings
    targets += [Target("direction", -1, layer=L, direction=u), Target("feature", 4, layer=L, feature=f)]
    expected = torch.cat([-acts[:, f] * (coder.W_dec[f] @ u), torch.zeros(2, dtype=torch.float64)])
    assert expected.abs().max() > 1e-2

    for edit in (FeatureEdit(L, f, "ablate"), parse_edit(f"{L}.{f}@2,-1=ablate", n_layers=L + 1, d_sae={L: 64}, n_pos=T)):
        mask = torch.zeros(T + 2, dtype=torch.bool)
        mask[:T] = edit.mask(T)
        want = torch.where(mask, expected, torch.zeros_like(expected))
        b, a = intervene_frozen(rep, [edit], targets, features="held")
        fb, fa = runner.intervene([edit], targets)
        # The frozen model recomputes the MLP inputs in float64 from frozen patterns and norms; the
        # real model computes some norms and softmaxes in float32, hence 1e-6 between the two.
        torch.testing.assert_close(fa - fb, (a - b).double(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(fa - fb, want, rtol=1e-12, atol=1e-12)  # the free run reads the same inputs
        torch.testing.assert_close(fb, b.double(), rtol=1e-6, atol=1e-9)  # same clean values too


# ---------------------------------------------------------------- clamp: exact logit change


def test_clamping_a_last_layer_feature_moves_the_logits_by_its_decoder_row(setup):
    """``L.f@1,-1=clamp:v`` adds ``(v - a_q) W_dec[f]`` to the last MLP's write at positions 1 and
    T-1 (``a_q``: the feature's activation there, zero if inactive). Free model: the logits move as
    the real model's do with that vector added by a hook. Frozen model: by that vector through the
    final norm with its clean denominator, then the unembedding."""
    family, model, adapter, coders, rep, runner, clean = setup
    L, T, v = adapter.n_layers - 1, TOKENS.numel(), 1.5
    coder = coders[L]
    acts = coder.encode(clean["mlp_in"][L])
    f = int(acts[-1].argmax())  # active at the last position: the clamp replaces a nonzero value there
    assert acts[-1, f] > 0
    edit = parse_edit(f"{L}.{f}@1,-1=clamp:{v}", n_layers=L + 1, d_sae={L: 64}, n_pos=T)
    assert edit.positions == [1, T - 1]

    delta = torch.zeros(T, D, dtype=torch.float64)
    for q in (1, T - 1):
        delta[q] = (v - acts[q, f]) * coder.W_dec[f]
    hooked = run_hf(model, family, TOKENS, add={L: delta})
    free_expected = hooked["logits"] - clean["logits"]  # [T, vocab]
    W_U = model.get_output_embeddings().weight.double().T
    frozen_expected = frozen_norm_linear(model, family, clean["final_in"], delta) @ W_U

    tokens = [5, 17, 42, 77]
    targets = [Target("logit", q, token=t) for q in (1, T - 1) for t in tokens]
    targets += [Target("logit_diff", T - 1, token=5, token_b=42), Target("logit", 4, token=5)]  # position 4: untouched
    rows = [(q, t) for q in (1, T - 1) for t in tokens]

    def pick(full):
        return torch.stack([full[q, t] for q, t in rows] + [full[T - 1, 5] - full[T - 1, 42], full[4, 5]])

    fb, fa = runner.intervene([edit], targets)
    want = pick(free_expected)
    assert want.abs().max() > 1e-2 and float(want[-1]) == 0.0
    # Llama's and Gemma's RMSNorm compute in float32 even in a float64 model: hence rtol 1e-5
    torch.testing.assert_close(fa - fb, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))

    b, a = intervene_frozen(rep, [edit], targets, features="held")
    # the frozen model's ``a`` comes from its float64 recomputation of the MLP input (see above)
    torch.testing.assert_close((a - b).double(), pick(frozen_expected), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- steering


@pytest.fixture(scope="module")
def steer_setup(single_thread):
    """A float64 tiny Llama whose vocabulary is the tiny tokenizer's, and random transcoders."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=3, hidden_size=D, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=len(tok), max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).to(torch.float64).eval().requires_grad_(False)
    return model, adapter_for(model), make_coders(3, seed=1), tok


def greedy_with_edit(model, coders, ids: torch.Tensor, edits: list[FeatureEdit], n_new: int, first_edited: int,
                     eos: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding without a KV cache: every step reruns the whole sequence, and at positions
    ``>= first_edited`` each edited layer's MLP output gets ``(new - a) W_dec[f]``, with ``a`` the
    feature's activation on that forward pass's MLP input. Returns the new tokens and, per step,
    the last position's logits."""
    seq = ids.clone()
    out, logits = [], []
    for _ in range(n_new):
        handles = []
        for e in edits:
            mlp, coder = model.model.layers[e.layer].mlp, coders[e.layer]

            def hook(module, args, output, e=e, coder=coder):
                a = coder.encode(args[0].double())[..., e.feature]  # [1, t]
                new = torch.full_like(a, e.value) if e.mode == "clamp" else a * e.value if e.mode == "scale" else 0 * a
                where = (torch.arange(a.shape[-1]) >= first_edited).to(a.dtype)
                return output + ((new - a) * where)[..., None] * coder.W_dec[e.feature]

            handles.append(mlp.register_forward_hook(hook))
        try:
            with torch.no_grad():
                logits.append(model(input_ids=seq).logits[0, -1].double())
        finally:
            for h in handles:
                h.remove()
        nxt = int(logits[-1].argmax())
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        if nxt == eos:
            break
    return out, logits


PROMPT = "the state of the union is"


@pytest.mark.parametrize("only_generated", [True, False])
def test_steering_equals_a_hooked_greedy_generation_and_changes_it(steer_setup, only_generated):
    """``steer`` (which edits through the KV cache, one new token per forward pass) generates what
    a cache-free greedy loop with the edit applied by our own hook generates; the logits of every
    step, recorded at the unembedding while ``steer`` runs, match the loop's too."""
    model, adapter, coders, tok = steer_setup
    ids = tok(PROMPT, return_tensors="pt").input_ids
    n = 6
    # edit features that are active on the prompt, so that ``- a`` in ``(new - a) W_dec`` matters
    x = {}
    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(lambda _m, args, i=i: x.__setitem__(i, args[0][0]))
             for i in (1, 2)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    f1, f2 = (int(coders[i].encode(x[i]).gt(0).sum(0).argmax()) for i in (1, 2))
    assert (coders[1].encode(x[1])[:, f1] > 0).sum() >= 2 and (coders[2].encode(x[2])[:, f2] > 0).sum() >= 2
    edits = [FeatureEdit(1, f1, "clamp", 40.0), FeatureEdit(2, f2, "scale", -2.0)]
    seen = []
    handle = model.lm_head.register_forward_hook(lambda _m, _args, out: seen.append(out[0, -1].double()))
    try:
        base, steered = steer(adapter, coders, tok, PROMPT, edits, max_new_tokens=n, only_generated=only_generated)
    finally:
        handle.remove()

    plain, plain_logits = greedy_with_edit(model, coders, ids, [], n, 0, tok.eos_token_id)
    assert base == tok.decode(plain)
    first = ids.shape[1] if only_generated else 0
    edited, edited_logits = greedy_with_edit(model, coders, ids, edits, n, first, tok.eos_token_id)
    assert steered == tok.decode(edited)
    assert edited != plain  # the clamp is strong enough to change the continuation
    assert len(seen) == len(plain) + len(edited)  # one forward pass per new token, base run first
    # Llama's RMSNorm computes in float32 even in a float64 model
    torch.testing.assert_close(torch.stack(seen[: len(plain)]), torch.stack(plain_logits), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(seen[len(plain):]), torch.stack(edited_logits), rtol=1e-5, atol=1e-6)
    if only_generated:  # the prompt is not edited, so the first new token's logits are the model's own
        torch.testing.assert_close(seen[len(plain)], plain_logits[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- faithfulness at an intermediate k


def dense_influence(graph) -> torch.Tensor:
    """``x0 ((I - A)^-1 - I)`` with ``A`` the row-normalised absolute adjacency (Ameisen et al. 2025)."""
    n = graph.n_nodes
    A = torch.zeros(n, n, dtype=torch.float64)
    A.index_put_((graph.edge_dst, graph.edge_src), graph.edge_weight.double().abs(), accumulate=True)
    A = A / A.sum(1, keepdim=True).clamp_min(1e-300)
    w = torch.tensor([t.weight for t in graph.targets], dtype=torch.float64)
    x0 = torch.zeros(n, dtype=torch.float64)
    x0[graph.target_nodes] = w / w.sum()
    eye = torch.eye(n, dtype=torch.float64)
    return x0 @ (torch.linalg.inv(eye - A) - eye)


@torch.no_grad()
def replacement_logits(model, family: str, coders, tokens, errors, mean_ablate=None, means=None) -> torch.Tensor:
    """The replacement model, written here: every MLP's write becomes ``f @ W_dec + b_dec + error``
    with ``f`` re-encoded from the current MLP input, except that where ``mean_ablate[layer]
    [T, d_sae]`` is True the activation is ``means[layer]`` instead. Returns ``[T, vocab]`` logits."""
    x_in, handles = {}, []
    for layer, coder in coders.items():
        handles.append(mlp_in_module(model, family, layer).register_forward_pre_hook(
            lambda _m, args, layer=layer: x_in.__setitem__(layer, args[0])))

        def write(m, args, out, layer=layer, coder=coder):
            a = coder.encode(x_in[layer][0])
            if mean_ablate is not None:
                a = torch.where(mean_ablate[layer], means[layer].double().expand_as(a), a)
            return (a @ coder.W_dec + coder.b_dec + errors[layer])[None]

        handles.append(mlp_write_module(model, family, layer).register_forward_hook(write))
    try:
        return uncapped(model, model(input_ids=tokens[None]).logits[0].double())
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("explicit_means", [False, True])
def test_faithfulness_at_intermediate_k_matches_a_brute_force_computation(explicit_means):
    """``F(C_k) = (m(C_k) - m(empty)) / (m(model) - m(empty))`` (verify's docstring) for k = 2, 3
    and 7, recomputed from scratch: C_k is the k feature nodes of highest (dense) influence away
    from position 0; every other feature active on the prompt, except at position 0, is replaced
    by its mean (default: its mean over the prompt's positions) in our own replacement model, whose
    error terms are the real MLP outputs minus the transcoders' on the clean prompt."""
    from transcoders.circuits import attribute
    from transcoders.circuits.graph import FEATURE
    from transcoders.circuits.verify import faithfulness

    family = "llama"
    model = build_tiny_model(family, dtype=torch.float64)
    adapter = adapter_for(model)
    coders = make_coders(adapter.n_layers)
    rep = LocalReplacement(adapter, coders, TOKENS, dtype=torch.float64, constant_positions=())
    targets = [Target("logit", -1, token=5, weight=0.7), Target("logit", -1, token=9, weight=0.3)]
    graph = attribute(rep, targets)

    clean = run_hf(model, family, TOKENS)
    outs = {}
    handles = [mlp_write_module(model, family, layer).register_forward_hook(
        lambda _m, _args, out, layer=layer: outs.__setitem__(layer, out[0].clone())) for layer in coders]
    with torch.no_grad():
        model(input_ids=TOKENS[None])
    for h in handles:
        h.remove()
    acts = {layer: c.encode(clean["mlp_in"][layer]) for layer, c in coders.items()}
    errors = {layer: outs[layer] - (acts[layer] @ c.W_dec + c.b_dec) for layer, c in coders.items()}
    gen = torch.Generator().manual_seed(5)
    means = ({layer: 0.5 * torch.rand(64, generator=gen, dtype=torch.float64) for layer in coders} if explicit_means
             else {layer: a.mean(0) for layer, a in acts.items()})

    infl = dense_influence(graph)
    feats = [int(n) for n in (graph.kind == FEATURE).nonzero().flatten() if int(graph.pos[n]) != 0]
    feats.sort(key=lambda n: -float(infl[n]))
    tok = [t.token for t in targets]
    full = clean["logits"][-1, tok]

    def m(circuit: list[int]) -> torch.Tensor:
        ablate = {layer: a > 0 for layer, a in acts.items()}
        for mask in ablate.values():
            mask[0] = False  # the first position is never ablated
        for n in circuit:
            ablate[int(graph.layer[n])][int(graph.pos[n]), int(graph.feature[n])] = False
        return replacement_logits(model, family, coders, TOKENS, errors, ablate, means)[-1, tok]

    empty = m([])
    sizes = [2, 3, 7]
    curve = faithfulness(ReplacementRunner(adapter, coders, TOKENS), graph, sizes, means if explicit_means else None)
    w = torch.tensor([0.7, 0.3], dtype=torch.float64)
    Fs = []
    for k, row in zip(sizes, curve):
        F = (m(feats[:k]) - empty) / (full - empty)
        Fs.append(F)
        assert row["k"] == k
        assert row["F"] == pytest.approx(F.tolist(), rel=1e-6, abs=1e-6)
        assert row["F_mean"] == pytest.approx(float((F * w).sum()), rel=1e-6, abs=1e-6)
    # not a degenerate case: the circuits are partial, and a larger one differs
    assert all(float((F - 1).abs().min()) > 0.01 and float(F.abs().min()) > 0.01 for F in Fs)
    assert float((Fs[0] - Fs[2]).abs().max()) > 0.01
