"""A tiny GPT-2 with one hand-planted circuit, and transcoders that compute its MLPs exactly.

The chain: the first prompt token's embedding (direction ``d1``) -> feature A (layer 0, index 0;
reads ``d1``, writes ``d2``) -> the only head of layer 1 (attention is uniform: zero queries and
keys; its OV circuit copies ``d2`` into ``d3``) -> feature B (layer 1, index 1; reads ``d3``,
writes ``d4``) -> the logit of token T (unembedding column ``d4``, tied to the embedding). The
last prompt token's embedding has a small ``d4`` part as well, which reaches the logit directly
(the planted "embeddings directly" share). Every direction is a zero-mean basis pair
``e_2k - e_2k+1``, so LayerNorm's centring never mixes them; every bias is zero and each
transcoder *is* its layer's ReLU MLP (``W_enc = W_fc^T``, ``W_dec = W_proj``), so error nodes
are zero and the centred logit of T is exactly ``chain + direct``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

D_MODEL, D_MLP = 16, 16
A, B = 0, 1  # feature indices in layers 0 and 1
S_A, S_V, S_B, C_DIRECT = 0.5, 2.0, 0.5, 0.25


def direction(k: int, dtype=torch.float64) -> torch.Tensor:
    v = torch.zeros(D_MODEL, dtype=dtype)
    v[2 * k], v[2 * k + 1] = 1.0, -1.0
    return v


@dataclass
class Planted:
    model: torch.nn.Module
    coders: dict
    ids: torch.Tensor  # [T] the prompt
    target_token: int
    a_B: float  # B's activation at the last position (a forward hook on the HF model)
    sigma_final: float  # std of the final residual at the last position (ln_f's input, with eps)
    chain: float  # the planted chain's contribution to the centred logit of T
    direct: float  # the last token's direct contribution
    centred_logit: float  # from the HF model's logits


def build(ids: list[int], vocab_size: int, target_token: int, spare: list[int], dtype=torch.float64) -> Planted:
    """Plant the circuit for a prompt ``ids`` (distinct ids) in a GPT-2 with ``vocab_size``
    tokens; ``spare``: three ids outside the prompt and unequal to ``target_token`` that hold
    the negated embeddings (so the mean embedding, hence the mean logit's read direction, is 0)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from transcoders.coders.coder import SparseCoder
    from transcoders.coders.config import CoderConfig

    assert len(set(ids)) == len(ids) and target_token not in ids and not set(spare) & (set(ids) | {target_token})
    cfg = GPT2Config(n_layer=2, n_embd=D_MODEL, n_head=1, n_inner=D_MLP, vocab_size=vocab_size, n_positions=64,
                     activation_function="relu", bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).to(dtype).eval()
    d1, d2, d3, d4, d5 = (direction(k, dtype) for k in range(5))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for m in model.modules():  # LayerNorms: weight 1, bias 0
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1.0)
        wte = model.transformer.wte.weight
        last = d5 + C_DIRECT * d4
        wte[ids[0]], wte[ids[-1]], wte[target_token] = d1, last, d4
        wte[spare[0]], wte[spare[1]], wte[spare[2]] = -d1, -last, -d4
        h0, h1 = model.transformer.h
        h0.mlp.c_fc.weight[:, A] = S_A * d1
        h0.mlp.c_proj.weight[A] = d2
        h1.attn.c_attn.weight[:, 2 * D_MODEL:] = S_V * torch.outer(d2, d2) / 2
        h1.attn.c_proj.weight[:] = torch.outer(d2, d3) / 2
        h1.mlp.c_fc.weight[:, B] = S_B * d3
        h1.mlp.c_proj.weight[B] = d4
    model.tie_weights()
    coders = {}
    for layer, h in enumerate(model.transformer.h):
        c = SparseCoder(CoderConfig(kind="transcoder", activation="relu", d_in=D_MODEL, d_out=D_MODEL, d_sae=D_MLP,
                                    k=None, layer=layer), dtype=dtype)
        with torch.no_grad():
            c.W_enc.copy_(h.mlp.c_fc.weight.T)
            c.b_enc.zero_()
            c.W_dec.copy_(h.mlp.c_proj.weight)
            c.b_dec.zero_()
        coders[layer] = c

    # Independent measurements with plain forward hooks on the Hugging Face modules.
    seen = {}
    hooks = [model.transformer.h[1].mlp.act.register_forward_hook(lambda _m, _i, o: seen.__setitem__("hidden", o)),
             model.transformer.ln_f.register_forward_hook(lambda _m, i, _o: seen.__setitem__("final", i[0]))]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    for h in hooks:
        h.remove()
    a_B = float(seen["hidden"][0, -1, B])
    x = seen["final"][0, -1]
    sigma = float((x.var(unbiased=False) + cfg.layer_norm_epsilon).sqrt())
    chain = a_B * float(d4 @ d4) / sigma
    direct = C_DIRECT * float(d4 @ d4) / sigma
    return Planted(model, coders, torch.tensor(ids), target_token, a_B, sigma, chain, direct,
                   float(logits[target_token] - logits.mean()))
