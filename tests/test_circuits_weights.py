"""Input-invariant analysis (virtual weights, pullbacks, de-embeddings, OV circuits) against
brute-force computations that run the models' own norm, embedding and head modules."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, VOCAB, build_tiny_model, tiny_adapter

from transcoders.circuits.weights import (
    WeightsError,
    chunked_top_abs,
    deembedding,
    deembedding_scores,
    head_deembedding,
    head_deembedding_scores,
    logit_effect_scores,
    logit_effects,
    ov_feature_table,
    ov_norms,
    pullback,
    pullback_scores,
    top_virtual_weights,
    virtual_weights,
)
from transcoders.coders.coder import SparseCoder
from transcoders.coders.config import CoderConfig

F64 = torch.float64
D_SAE = 64


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, single_thread):
    """``(adapter, coders)``: a float64 tiny model and one random float64 transcoder per layer."""
    model = build_tiny_model(request.param, dtype=F64)
    adapter = tiny_adapter(model)
    gen = torch.Generator().manual_seed(7)
    coders = {}
    for layer in range(adapter.n_layers):
        cfg = CoderConfig(kind="transcoder", activation="topk", d_in=32, d_out=32, d_sae=D_SAE, k=4, layer=layer)
        coder = SparseCoder(cfg, dtype=F64)
        with torch.no_grad():  # untied random encoder and decoder
            coder.W_enc.copy_(torch.randn(D_SAE, 32, generator=gen, dtype=F64))
            coder.W_dec.copy_(torch.randn(D_SAE, 32, generator=gen, dtype=F64))
        coders[layer] = coder
    return adapter, coders


def frozen(spec, x: torch.Tensor) -> torch.Tensor:
    """The norm module itself, with its denominator multiplied back out and bias removed:
    the frozen-linear map with denominator 1, computed by the model's own code."""
    y = spec.module(x)
    if spec.bias is not None:
        y = y - spec.bias
    return y * spec.denom(x)[..., None]


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    # Llama/Gemma RMSNorm modules compute in float32 even for float64 models.
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def layer0_embeddings(adapter, tokens: torch.Tensor) -> torch.Tensor:
    """``[n, d]``: what block 0 receives for one-token prompts, minus GPT-2's position embedding."""
    seen = {}

    def hook(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"])[:, 0]

    handle = adapter.layers()[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        adapter.model(input_ids=tokens[:, None])
    finally:
        handle.remove()
    x = seen["x"]
    return x - adapter.model.transformer.wpe.weight[0] if adapter.family == "gpt2" else x


def enc_read(adapter, coders, layer: int, feature: int) -> torch.Tensor:
    """Brute-force residual read direction: ``x -> frozen(ln_mlp, x) @ W_enc[feature]`` as a
    vector, by pushing the identity basis through the norm module."""
    eye = torch.eye(adapter.d_model, dtype=F64)
    return frozen(adapter.block_internals(layer).ln_mlp, eye) @ coders[layer].W_enc.detach()[feature]


# ------------------------------------------------------------------------------------- virtual weights
def test_virtual_weights_brute_force(setup):
    adapter, coders = setup
    V = virtual_weights(coders, 0, 2, adapter, dtype=F64)
    assert V.shape == (D_SAE, D_SAE) and V.dtype == F64
    ln = adapter.block_internals(2).ln_mlp
    W_dec, W_enc = coders[0].W_dec.detach(), coders[2].W_enc.detach()
    for i in range(0, D_SAE, 5):
        y = frozen(ln, W_dec[i])
        for j in range(0, D_SAE, 7):
            close(V[i, j], y @ W_enc[j])
    close(V, frozen(ln, W_dec) @ W_enc.T)  # every pair, row-batched
    raw = virtual_weights(coders, 0, 2, adapter, through_norm=False, dtype=F64)
    close(raw, W_dec @ W_enc.T, rtol=1e-12)
    close(virtual_weights(coders, 0, 2, dtype=F64), raw, rtol=1e-12)  # no adapter: raw


def test_layernorm_centring():
    adapter = tiny_adapter(build_tiny_model("gpt2", dtype=F64))
    gen = torch.Generator().manual_seed(3)
    coders = {}
    for layer in (0, 1):
        cfg = CoderConfig(kind="transcoder", activation="relu", d_in=32, d_out=32, d_sae=16, layer=layer)
        coders[layer] = SparseCoder(cfg, dtype=F64)
        with torch.no_grad():
            coders[layer].W_enc.copy_(torch.randn(16, 32, generator=gen, dtype=F64))
            coders[layer].W_dec.copy_(torch.randn(16, 32, generator=gen, dtype=F64))
    ln = adapter.block_internals(1).ln_mlp
    assert ln.kind == "layernorm"
    V = virtual_weights(coders, 0, 1, adapter, dtype=F64)
    W_dec, W_enc = coders[0].W_dec.detach(), coders[1].W_enc.detach()
    centred = (W_dec - W_dec.mean(-1, keepdim=True)) * ln.weight
    close(V, centred @ W_enc.T, rtol=1e-12)
    uncentred = (W_dec * ln.weight) @ W_enc.T
    assert (V - uncentred).abs().max() > 0.1 * V.abs().max()
    # LayerNorm ignores the all-ones direction: shifting every decoder row by it changes nothing.
    with torch.no_grad():
        coders[0].W_dec += 3.0
    close(virtual_weights(coders, 0, 1, adapter, dtype=F64), V, rtol=1e-10)


def test_top_virtual_weights_match_argsort_and_chunking(setup):
    adapter, coders = setup
    V = virtual_weights(coders, 1, 2, adapter, dtype=F64)
    k = 15
    order = V.abs().flatten().argsort(descending=True)[:k]
    results = [top_virtual_weights(coders, 1, 2, adapter, k, chunk_size=c, dtype=F64) for c in (1, 7, 10_000)]
    for top in results:
        assert len(top) == k
        assert top.src.tolist() == (order // D_SAE).tolist()
        assert top.dst.tolist() == (order % D_SAE).tolist()
        close(top.weight, V.flatten()[order], rtol=1e-12)
        assert [(s, d) for s, d, _ in top] == list(zip(top.src.tolist(), top.dst.tolist()))
    # asking for more than exists returns everything, sorted (chunked GEMMs may round the last bit
    # differently from one whole GEMM)
    gen = torch.Generator().manual_seed(0)
    left, right = torch.randn(3, 4, dtype=F64, generator=gen), torch.randn(2, 4, dtype=F64, generator=gen)
    i, j, w = chunked_top_abs(left, right, 100, chunk_size=2)
    assert len(w) == 6 and (w.abs().diff() <= 0).all()
    close(w, (left @ right.T)[i, j], rtol=1e-14)


def test_pullback_is_virtual_weight_column(setup):
    adapter, coders = setup
    V = virtual_weights(coders, 0, 2, adapter, dtype=F64)
    scores = pullback_scores(coders, 2, 11, 0, adapter, dtype=F64, chunk_size=5)
    close(scores, V[:, 11], rtol=1e-12)
    res = pullback(coders, 2, 11, 0, adapter, k=6, dtype=F64)
    assert res.kind == "feature" and res.layer == 0
    assert res.top_ids.tolist() == V[:, 11].argsort(descending=True)[:6].tolist()
    assert res.bottom_ids.tolist() == V[:, 11].argsort()[:6].tolist()
    assert (res.top_scores.diff() <= 0).all() and (res.bottom_scores.diff() >= 0).all()
    rows = res.rows()
    assert len(rows) == 12 and rows[0][:3] == ("+", res.top_ids[0].item(), f"L0/{res.top_ids[0].item()}")


# ------------------------------------------------------------------------------------- de-embeddings
def test_deembedding_equals_direct_path(setup):
    adapter, coders = setup
    layer, feature = 1, 5
    scores = deembedding_scores(adapter, coders, layer, feature, dtype=F64, chunk_size=9)
    assert scores.shape == (VOCAB,)
    tokens = torch.tensor([0, 3, 17, 42, 99])
    emb = layer0_embeddings(adapter, tokens)  # from a real forward pass
    expected = frozen(adapter.block_internals(layer).ln_mlp, emb) @ coders[layer].W_enc.detach()[feature]
    close(scores[tokens], expected)
    # every token, against the read direction built from the norm module
    close(scores, adapter.embedding_matrix() @ enc_read(adapter, coders, layer, feature))
    close(deembedding_scores(adapter, coders, layer, feature, dtype=F64, denom=4.0), scores / 4.0, rtol=1e-12)
    res = deembedding(adapter, coders, layer, feature, k=7, dtype=F64)
    assert res.top_ids.tolist() == scores.argsort(descending=True)[:7].tolist()
    assert res.bottom_ids.tolist() == scores.argsort()[:7].tolist()
    assert [r[1] for r in res.rows()[:7]] == res.top_ids.tolist()


def _explicit_head(adapter, coders, layer, feature, attn_layer, head, x):
    """Run head ``head`` of ``attn_layer``'s OV circuit with pattern 1 on residual vectors
    ``x [n, d]``, then read the feature through the layer's pre-MLP norm: ``[n]``."""
    bi = adapter.block_internals(attn_layer)
    ov = bi.ov
    v = frozen(bi.ln_attn, x) @ ov.W_V[ov.kv_head(head)]  # [n, d_head]
    out = v @ ov.W_O[head]  # [n, d]
    if bi.attn_out_norm is not None:
        out = frozen(bi.attn_out_norm, out)
    return frozen(adapter.block_internals(layer).ln_mlp, out) @ coders[layer].W_enc.detach()[feature]


def test_head_deembedding_equals_explicit_ov(setup):
    adapter, coders = setup
    layer, feature = 2, 9
    W_E = adapter.embedding_matrix()
    parallel = adapter.block_internals(layer).parallel
    attn_layers = range(layer) if parallel else range(layer + 1)
    for attn_layer in attn_layers:
        for head in range(adapter.block_internals(attn_layer).ov.n_heads):
            scores = head_deembedding_scores(
                adapter, coders, layer, feature, attn_layer, head, dtype=F64, chunk_size=13
            )
            close(scores, _explicit_head(adapter, coders, layer, feature, attn_layer, head, W_E))
    scores = head_deembedding_scores(adapter, coders, layer, feature, 0, 1, dtype=F64)
    res = head_deembedding(adapter, coders, layer, feature, 0, 1, k=4, dtype=F64)
    assert res.kind == "token" and res.top_ids.tolist() == scores.argsort(descending=True)[:4].tolist()
    assert (bi_out := adapter.block_internals(0).attn_out_norm) is None or adapter.family == "gemma"
    if bi_out is not None:  # Gemma's post-attention norm gain is on the path and matters
        assert bi_out.weight.std() > 0.05


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_head_deembedding_gqa_matches_real_attention(family, single_thread):
    """One-token prompts make every attention pattern exactly 1: the per-head values entering
    ``o_proj`` at layer 0 are then ``ln_attn(embedding) @ W_V[kv(h)]``, and the head
    de-embedding (with the real ``ln_attn`` denominator) is what head h's share contributes."""
    model = build_tiny_model(family, dtype=F64)
    adapter = tiny_adapter(model)
    bi = adapter.block_internals(0)
    ov = bi.ov
    assert ov.n_kv_heads < ov.n_heads  # grouped-query attention
    gen = torch.Generator().manual_seed(1)
    cfg = CoderConfig(kind="transcoder", activation="relu", d_in=32, d_out=32, d_sae=8, layer=1)
    coders = {1: SparseCoder(cfg, dtype=F64)}
    with torch.no_grad():
        coders[1].W_enc.copy_(torch.randn(8, 32, generator=gen, dtype=F64))

    tokens = torch.tensor([2, 31, 64, 90])
    seen = {}
    hooks = [
        bi.attention.o_proj.register_forward_pre_hook(lambda _m, a: seen.__setitem__("z", a[0][:, 0])),
        bi.ln_attn.module.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0][:, 0])),
    ]
    try:
        model(input_ids=tokens[:, None])
    finally:
        for h in hooks:
            h.remove()
    x, z = seen["x"], seen["z"].view(len(tokens), ov.n_heads, ov.d_head)  # [n, d], [n, H, d_head]
    x_normed = bi.ln_attn.module(x)
    group = ov.n_heads // ov.n_kv_heads
    for h in range(ov.n_heads):
        assert ov.kv_head(h) == h // group
        close(z[:, h], x_normed @ ov.W_V[ov.kv_head(h)])
        if ov.kv_head(h) != h % ov.n_kv_heads:  # the other plausible layout is detectably wrong
            assert not torch.allclose(z[:, h], x_normed @ ov.W_V[h % ov.n_kv_heads], atol=1e-4)

    denoms = bi.ln_attn.denom(x)
    mlp_ln = adapter.block_internals(1).ln_mlp
    for h in range(ov.n_heads):
        head_out = z[:, h] @ ov.W_O[h]
        if bi.attn_out_norm is not None:
            head_out = frozen(bi.attn_out_norm, head_out)
        expected = frozen(mlp_ln, head_out) @ coders[1].W_enc.detach()[3]
        for t, (tok, dn) in enumerate(zip(tokens.tolist(), denoms.tolist())):
            scores = head_deembedding_scores(adapter, coders, 1, 3, 0, h, attn_denom=dn, dtype=F64)
            close(scores[tok], expected[t])


# ------------------------------------------------------------------------------------- logits and OV
def test_logit_effects(setup):
    adapter, coders = setup
    layer, feature = 1, 20
    scores = logit_effect_scores(adapter, coders, layer, feature, dtype=F64, chunk_size=11)
    head = adapter.model.get_output_embeddings()
    y = frozen(adapter.final_norm(), coders[layer].W_dec.detach()[feature])
    expected = head(y) - (head.bias if getattr(head, "bias", None) is not None else 0)
    close(scores, expected)
    res = logit_effects(adapter, coders, layer, feature, k=5, dtype=F64)
    assert res.top_ids.tolist() == expected.argsort(descending=True)[:5].tolist()
    assert res.bottom_ids.tolist() == expected.argsort()[:5].tolist()


def test_ov_norms(setup):
    adapter, _ = setup
    norms = ov_norms(adapter, dtype=F64)
    ov0 = adapter.block_internals(0).ov
    assert norms.shape == (adapter.n_layers, ov0.n_heads)
    for layer in range(adapter.n_layers):
        ov = adapter.block_internals(layer).ov
        for h in range(ov.n_heads):
            full = ov.W_V[ov.kv_head(h)] @ ov.W_O[h]  # [d, d]
            close(norms[layer, h], torch.linalg.matrix_norm(full), rtol=1e-10)
    assert ov_norms(adapter).dtype == torch.float32


def test_ov_feature_table(setup):
    adapter, coders = setup
    src_layer, dst_layer, attn_layer, k = 0, 2, 1, 6
    bi = adapter.block_internals(attn_layer)
    ov = bi.ov
    W_dec, W_enc = coders[src_layer].W_dec.detach(), coders[dst_layer].W_enc.detach()
    tables = [
        ov_feature_table(adapter, coders, src_layer, dst_layer, attn_layer, k, chunk_size=c, dtype=F64)
        for c in (5, 1000)
    ]
    close(tables[0].ov_norm, ov_norms(adapter, dtype=F64)[attn_layer], rtol=1e-12)
    for h in range(ov.n_heads):
        out = frozen(bi.ln_attn, W_dec) @ ov.W_V[ov.kv_head(h)] @ ov.W_O[h]  # [d_sae_src, d]
        if bi.attn_out_norm is not None:
            out = frozen(bi.attn_out_norm, out)
        M = frozen(adapter.block_internals(dst_layer).ln_mlp, out) @ W_enc.T  # [d_sae_src, d_sae_dst]
        order = M.abs().flatten().argsort(descending=True)[:k]
        for table in tables:
            assert table.src[h].tolist() == (order // D_SAE).tolist()
            assert table.dst[h].tolist() == (order % D_SAE).tolist()
            close(table.weight[h], M.flatten()[order])
    assert len(tables[0].rows()) == ov.n_heads * k and tables[0].rows()[0][0] == 0


# ------------------------------------------------------------------------------------- errors and dtype
def test_errors_and_defaults(setup):
    adapter, coders = setup
    with pytest.raises(WeightsError, match="src_layer < dst_layer"):
        virtual_weights(coders, 2, 2, adapter)
    with pytest.raises(WeightsError, match="out of range"):
        deembedding(adapter, coders, 1, D_SAE)
    with pytest.raises(WeightsError, match="head"):
        head_deembedding(adapter, coders, 2, 0, 0, 99)
    with pytest.raises(WeightsError, match="src_layer < attn_layer"):
        ov_feature_table(adapter, coders, 1, 2, 1)
    with pytest.raises(WeightsError, match="no coder"):
        pullback({0: coders[0]}, 2, 0, 0, adapter)
    if adapter.block_internals(2).parallel:
        with pytest.raises(WeightsError, match="parallel"):
            head_deembedding(adapter, coders, 2, 0, 2, 0)
    else:
        with pytest.raises(WeightsError, match="attn_layer <= layer"):
            head_deembedding(adapter, coders, 1, 0, 2, 0)
    sae = SparseCoder(CoderConfig(kind="sae", activation="relu", d_in=32, d_out=32, d_sae=8, layer=0))
    with pytest.raises(WeightsError, match="SAE"):
        virtual_weights({0: sae, 1: coders[1]}, 0, 1, adapter)
    # float32 by default, whatever the model and coders hold
    assert virtual_weights(coders, 0, 1, adapter).dtype == torch.float32
    assert deembedding_scores(adapter, coders, 0, 0).dtype == torch.float32
