"""QK attribution on tiny random models of every family in float64.

The central property, as for edges: the (query-side source, key-side source) pair terms sum to
the head's pre-softmax score recomputed independently (Hugging Face's own projections and rotary
code on the frozen normalised residual stream), and removing one source's write moves the score
by exactly the sum of its terms.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import build_tiny_model
from test_circuits_attribution import make_coders

from transcoders.circuits import LocalReplacement
from transcoders.circuits.attribution import SourceIndex
from transcoders.circuits.qk import QKError, column_source, qk_attribution, rope_matrix, source_label
from transcoders.circuits.replacement import _eager_attention
from transcoders.models import adapter_for

FAMILIES = ("gpt2", "gpt_neox", "llama", "gemma2", "gemma3")
MODULES = {"gpt2": "gpt2", "gpt_neox": "gpt_neox", "llama": "llama", "gemma2": "gemma2", "gemma3": "gemma3"}
TOKENS = torch.arange(3, 15)
# Random skip transcoders write large feature vectors that their error nodes cancel, so pair terms
# reach 1e4 for scores of 1e-2: their explicit sum is exact only to float64 rounding of the terms.
VARIANTS = [("transcoder", "topk"), ("skip_transcoder", "relu")]
CASES = [(2, 1, 11, 4), (2, 3, 11, 11), (1, 2, 7, 0), (0, 0, 5, 3)]


def build(family: str) -> torch.nn.Module:
    if family != "gemma3":
        return build_tiny_model(family, dtype=torch.float64)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           intermediate_size=48, vocab_size=100, max_position_embeddings=64, sliding_window=6,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # Gemma norms start at zero weight (scale 1 + w): make q_norm/k_norm matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model.to(torch.float64).eval().requires_grad_(False)


@pytest.fixture(scope="module", params=[(f, v) for f in FAMILIES for v in VARIANTS], ids=lambda p: f"{p[0]}-{p[1][0]}")
def setup(request):
    """``(family, rep, model scores {layer: [H, T, T]} as Hugging Face computed them)``."""
    family, (kind, activation) = request.param
    model = build(family)
    adapter = adapter_for(model)
    coders = make_coders(adapter.n_layers, kind, activation)
    mod = importlib.import_module(f"transformers.models.{MODULES[family]}.modeling_{MODULES[family]}")
    original, scores = mod.eager_attention_forward, {}

    def recording(module, query, key, value, attention_mask, *args, **kwargs):
        scaling = kwargs["scaling"] if "scaling" in kwargs else args[0]
        keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        scores[module.layer_idx] = (query @ keys.transpose(2, 3))[0] * scaling
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    mod.eager_attention_forward = recording
    try:
        rep = LocalReplacement(adapter, coders, TOKENS, dtype=torch.float64)
    finally:
        mod.eager_attention_forward = original
    return family, rep, scores


def reference_scores(family: str, rep: LocalReplacement, layer: int, resid: torch.Tensor | None = None,
                     key_resid: torch.Tensor | None = None) -> torch.Tensor:
    """``[H, T, T]`` pre-softmax scores from Hugging Face's projection, q/k-norm and rotary code,
    applied to the frozen normalised residual stream (``resid``: the query side's stream,
    ``key_resid`` the key side's; default the prompt's)."""
    ad, fl = rep.adapter, rep.layers[layer]
    attn = ad.block_internals(layer).attention
    mod = importlib.import_module(f"transformers.models.{MODULES[family]}.modeling_{MODULES[family]}")
    H = int(ad.config.num_attention_heads)
    base = rep.resid_pre[layer]

    def qk(x):
        xn = fl.ln_attn(x)
        T = xn.shape[0]
        if family == "gpt2":
            q, k, _ = attn.c_attn(xn).split(ad.d_model, dim=-1)
            return q.view(T, H, -1), k.view(T, H, -1)
        if family == "gpt_neox":
            q, k, _ = attn.query_key_value(xn).view(T, H, -1).chunk(3, dim=-1)
        else:
            d_head = attn.head_dim
            q, k = attn.q_proj(xn).view(T, -1, d_head), attn.k_proj(xn).view(T, -1, d_head)
            if family == "gemma3":  # the per-head RMSNorms in float64 (HF's run in float32), frozen on the prompt
                xb = fl.ln_attn(base)
                qb, kb = attn.q_proj(xb).view(T, -1, d_head), attn.k_proj(xb).view(T, -1, d_head)
                rms = lambda v, vb, m: v / (vb.pow(2).mean(-1, keepdim=True) + m.eps).sqrt() * (1 + m.weight)
                q, k = rms(q, qb, attn.q_norm), rms(k, kb, attn.k_norm)
        cos, sin = fl.rope
        q, k = mod.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
        return q[0].transpose(0, 1), k[0].transpose(0, 1)

    q, _ = qk(base if resid is None else resid)
    _, k = qk(base if key_resid is None else key_resid)
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    return torch.einsum("qhe,khe->hqk", q, k) * attn.scaling


def test_pair_terms_sum_to_the_recomputed_score(setup):
    family, rep, model_scores = setup
    index = SourceIndex(rep)
    for layer, head, q, k in CASES:
        a = qk_attribution(rep, layer, head, q, k, index=index)
        terms = a.terms(torch.arange(a.query.shape[0]), torch.arange(a.key.shape[0]))
        ref = float(reference_scores(family, rep, layer)[head, q, k])
        rounding = 1e-15 * float(terms.abs().sum()) if rep.layers[0].W_skip is not None else 0.0
        assert abs(float(terms.sum()) - ref) < 1e-9 * abs(ref) + rounding, (family, layer, head, q, k)
        assert a.score == pytest.approx(ref, rel=1e-9)
        # The real model agrees to float32 rounding: Hugging Face computes RMSNorm in float32 even
        # in a float64 model (exactly for the LayerNorm families).
        tol = 1e-9 if family in ("gpt2", "gpt_neox") else 1e-5
        assert float(model_scores[layer][head, q, k]) == pytest.approx(ref, rel=tol)
        # The pattern is the softmax of these scores over the keys the mask lets through (Gemma 3's
        # sliding layers see the last 6 positions only).
        seen = (torch.arange(q + 1) > q - 6) if family == "gemma3" and layer != 1 else torch.ones(q + 1, dtype=torch.bool)
        weights = torch.softmax(model_scores[layer][head, q, : q + 1].masked_fill(~seen, -torch.inf), -1)
        assert a.pattern == pytest.approx(float(weights[k]), rel=1e-4, abs=1e-12)


def _write(rep: LocalReplacement, src: dict) -> tuple[int, torch.Tensor]:
    """``(layer, [T, d])``: the residual write of a source (layer -1: the embeddings)."""
    out = torch.zeros(rep.n_pos, rep.d_model, dtype=rep.dtype)
    if src["kind"] == "feature":
        f = rep.layers[src["layer"]].features
        j = int(((f.pos == src["pos"]) & (f.feature == src["feature"])).nonzero()[0, 0])
        out[src["pos"]] = f.activation[j] * rep.coder_weight(src["layer"], "W_dec")[src["feature"]]
    elif src["kind"] == "error":
        out[src["pos"]] = rep.layers[src["layer"]].error[src["pos"]]
    elif src["kind"] == "embedding":
        out[src["pos"]] = rep.resid0[src["pos"]]
    return src["layer"], out


def test_removing_a_source_moves_the_score_by_the_sum_of_its_terms(setup):
    family, rep, _ = setup
    layer, head, q, k = 2, 1, 11, 4
    index = SourceIndex(rep)
    a = qk_attribution(rep, layer, head, q, k, index=index)
    base = float(reference_scores(family, rep, layer)[head, q, k])
    mq, mk = a.query_marginals(), a.key_marginals()
    # The strongest query-side feature, error node and embedding, and the strongest key-side feature.
    picks = []
    for kind in ("feature", "error", "embedding"):
        for col in mq[:-1].abs().argsort(descending=True).tolist():
            src = column_source(rep, index, col, layer=layer, pos=q, side="q")
            if src["kind"] == kind:
                picks.append((col, src))
                break
    assert len(picks) == 3
    for col, src in picks:
        src_layer, write = _write(rep, src)
        run = rep.forward(delta_post={src_layer: -write})
        removed = run.resid_pre[layer]
        # Query side only (the key keeps its stream): the score moves by minus the source's row.
        moved = float(reference_scores(family, rep, layer, resid=removed)[head, q, k]) - base
        assert moved == pytest.approx(-float(mq[col]), rel=1e-8, abs=1e-12 * abs(base)), (family, src)
        # Both sides: minus its row and its column, plus the term it shares with itself.
        both = float(reference_scores(family, rep, layer, resid=removed, key_resid=removed)[head, q, k]) - base
        own = float(a.terms(torch.tensor([col]), torch.tensor([col]))[0, 0])
        assert both == pytest.approx(-float(mq[col]) - float(mk[col]) + own, rel=1e-8, abs=1e-12 * abs(base))
    for col in mk[:-1].abs().argsort(descending=True).tolist():
        src = column_source(rep, index, col, layer=layer, pos=k, side="k")
        if src["kind"] != "bias":
            break
    src_layer, write = _write(rep, src)
    removed = rep.forward(delta_post={src_layer: -write}).resid_pre[layer]
    moved = float(reference_scores(family, rep, layer, key_resid=removed)[head, q, k]) - base
    assert moved == pytest.approx(-float(mk[col]), rel=1e-8)


def test_top_pairs_are_the_largest_terms(setup):
    _, rep, _ = setup
    a = qk_attribution(rep, 2, 0, 11, 6)
    every = a.terms(torch.arange(a.query.shape[0]), torch.arange(a.key.shape[0]))
    top = a.top_pairs(5)
    assert [t for _, _, t in top] == pytest.approx(every.flatten()[every.flatten().abs().topk(5).indices].tolist())
    for qc, kc, t in top:
        assert float(every[qc, kc]) == t


def test_rope_matrix_is_huggingfaces_rotation():
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    torch.manual_seed(0)
    d_head, r = 8, 4  # partial rotary: the last 4 dimensions pass through
    cos, sin = torch.randn(r, dtype=torch.float64), torch.randn(r, dtype=torch.float64)
    v = torch.randn(d_head, dtype=torch.float64)
    expected, _ = apply_rotary_pos_emb(v.view(1, 1, 1, -1), v.view(1, 1, 1, -1), cos.view(1, 1, -1), sin.view(1, 1, -1))
    assert torch.allclose(rope_matrix(cos, sin, d_head) @ v, expected.flatten(), rtol=0, atol=1e-15)


def test_bad_heads_and_positions_are_refused(setup):
    _, rep, _ = setup
    with pytest.raises(QKError, match="after query position"):
        qk_attribution(rep, 1, 0, 3, 5)
    with pytest.raises(QKError, match="heads 0..3"):
        qk_attribution(rep, 1, 4, 5, 3)
    with pytest.raises(QKError, match="out of range"):
        qk_attribution(rep, 3, 0, 5, 3)
    with pytest.raises(QKError, match="12-token prompt"):
        qk_attribution(rep, 1, 0, 12, 3)


def test_sources_are_named():
    src = {"kind": "feature", "layer": 3, "pos": 4, "feature": 901}
    assert source_label(src) == "L3 f901 @pos4"
    assert source_label({"kind": "embedding", "layer": -1, "pos": 1, "feature": -1}, ["a", "b"]) == "emb 'b' @pos1"
    assert source_label({"kind": "head_bias", "layer": 2, "pos": 5, "feature": -1, "side": "k"}) == "b_K L2 @pos5"


def test_removing_a_source_by_intervention_frozen_and_free(setup):
    from transcoders.circuits.qk_check import check_source, free_pattern

    family, rep, _ = setup
    layer, head, q, k = 2, 1, 11, 4
    index = SourceIndex(rep)
    a = qk_attribution(rep, layer, head, q, k, index=index)
    mk = a.key_marginals()
    for kind in ("embedding", "feature", "error"):
        col = next(c for c in mk[:-1].abs().argsort(descending=True).tolist()
                   if column_source(rep, index, c, layer=layer, pos=k, side="k")["kind"] == kind)
        src = column_source(rep, index, col, layer=layer, pos=k, side="k")
        check = check_source(rep, a, col, src)
        assert check.score == pytest.approx(a.score) and check.pattern == pytest.approx(a.pattern)
        # Frozen: the score moves by exactly minus the source's terms.
        assert check.score_frozen - check.score == pytest.approx(check.predicted_change, rel=1e-8, abs=1e-14)
        assert 0.0 <= check.pattern_frozen <= 1.0 and 0.0 <= check.pattern_free <= 1.0
    # Free, for an embedding, is the model run on embeddings with that row removed.
    col = next(c for c in mk[:-1].abs().argsort(descending=True).tolist()
               if column_source(rep, index, c, layer=layer, pos=k, side="k")["kind"] == "embedding")
    p = column_source(rep, index, col, layer=layer, pos=k, side="k")["pos"]
    mask = torch.ones(rep.n_pos, 1, dtype=rep.dtype)
    mask[p] = 0.0

    def zero_row(_module, args, kwargs):
        if args:
            return (args[0] * mask, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * mask}

    hook = rep.adapter.layers()[0].register_forward_pre_hook(zero_row, with_kwargs=True)
    try:
        with _eager_attention(rep.adapter.model):
            expected = rep.adapter.model(input_ids=rep.tokens[None], output_attentions=True).attentions[layer][0]
    finally:
        hook.remove()
    write = torch.zeros(rep.n_pos, rep.d_model, dtype=rep.dtype)
    write[p] = rep.resid0[p]
    assert torch.allclose(free_pattern(rep, layer, {-1: write}), expected, rtol=0, atol=1e-12)
    # Removing nothing changes nothing.
    nothing = {1: torch.zeros_like(write), -1: torch.zeros_like(write)}
    assert torch.allclose(free_pattern(rep, layer, nothing), rep.layers[layer].pattern, rtol=0, atol=1e-12)


def test_a_source_split_by_the_heads_that_bring_it_sums_to_its_terms(setup):
    from transcoders.circuits.qk import side_heads
    from transcoders.circuits.qk_check import source_write

    _, rep, _ = setup
    layer, head, q, k = 2, 1, 11, 4
    index = SourceIndex(rep)
    a = qk_attribution(rep, layer, head, q, k, index=index)
    for side, marg, pos in (("k", a.key_marginals(), k), ("q", a.query_marginals(), q)):
        # The strongest source at an earlier position: it reaches the side only through attention.
        for col in marg[:-1].abs().argsort(descending=True).tolist():
            src = column_source(rep, index, col, layer=layer, pos=pos, side=side)
            if src["kind"] in ("feature", "embedding") and src["pos"] < pos:
                break
        src_layer, write = source_write(rep, src)
        parts = side_heads(rep, a, [(src_layer, src["pos"], write[src["pos"]])], side)[0]
        assert sum(p.weight for p in parts) == pytest.approx(float(marg[col]), rel=1e-9)
        assert all(p.kind != "residual" or p.weight == 0.0 for p in parts)
        assert any(p.kind == "head" and p.dst_pos == pos for p in parts)


def test_many_heads_at_once_match_the_full_breakdown_on_their_candidates(setup):
    from transcoders.circuits.qk import qk_attributions

    _, rep, _ = setup
    index = SourceIndex(rep)
    triples = [(2, 1, 11, 4), (2, 3, 11, 11), (1, 2, 7, 0), (0, 0, 5, 3)]
    for a, (layer, head, q, k) in zip(qk_attributions(rep, triples, candidates=6, index=index), triples):
        full = qk_attribution(rep, layer, head, q, k, index=index)
        assert a.score == pytest.approx(full.score, rel=1e-10)
        # Marginals over every source come from one row per side; they equal the full ones.
        assert torch.allclose(a.query_marginals(), full.query_marginals(), rtol=1e-9, atol=1e-12 * abs(full.score))
        assert torch.allclose(a.key_marginals(), full.key_marginals(), rtol=1e-9, atol=1e-12 * abs(full.score))
        assert float(a.query_marginals().sum()) == pytest.approx(full.score, rel=1e-9)
        # The candidates are the strongest sources by |marginal|, and their vectors (carried forward
        # through the frozen model) are the full breakdown's rows.
        top = full.query_marginals()[:-1].abs().topk(6).indices.sort().values
        assert torch.equal(a.q_cols[:-1], top)
        assert torch.allclose(a.query, full.query[a.q_cols], rtol=1e-9, atol=1e-13)
        assert torch.allclose(a.key, full.key[a.k_cols], rtol=1e-9, atol=1e-13)
        assert torch.allclose(a.terms(a.q_cols, a.k_cols), full.terms(a.q_cols, a.k_cols), rtol=1e-9, atol=1e-13)
        with pytest.raises(QKError, match="candidates"):
            a.terms(torch.tensor([int(torch.ones(index.n_cols).index_fill(0, a.q_cols[:-1], 0).nonzero()[0, 0])]),
                    a.k_cols[:1])


def test_because_names_the_strongest_pair_pushing_the_score_its_way():
    from transcoders.circuits.head_loadings import because

    src = lambda f: {"kind": "feature", "layer": 1, "pos": 2, "feature": f}
    h = {"score": 5.0, "pattern": 0.5, "pairs": [{"query": src(1), "key": src(2), "term": -3.0},
                                                  {"query": src(3), "key": src(4), "term": 2.0},
                                                  {"query": src(5), "key": src(6), "term": 1.0}]}
    assert because(h) == "because query-side L1 f3 @pos2 matches key-side L1 f4 @pos2 (+2 of score +5, attention 0.50)"
    h["score"] = -5.0
    assert "L1 f1 @pos2" in because(h)


def test_terms_by_source_position_sum_each_sides_columns(setup):
    from transcoders.circuits.qk import column_positions, position_terms

    _, rep, _ = setup
    index = SourceIndex(rep)
    a = qk_attribution(rep, 2, 1, 11, 4, index=index)
    pos = column_positions(rep, index)
    for c in torch.randint(0, index.n_cols, (20,)).tolist():
        assert pos[c] == column_source(rep, index, c, layer=2, pos=11, side="q")["pos"]
    terms = position_terms(a, pos)
    mk = a.key_marginals()
    for p, t in terms["key"]:
        assert t == pytest.approx(float(mk[pos == p].sum()), rel=1e-12)
    assert sum(t for _, t in terms["query"]) == pytest.approx(a.score, rel=1e-9)
    assert max(p for p, _ in terms["key"]) <= 4 and max(p for p, _ in terms["query"]) <= 11  # causal
