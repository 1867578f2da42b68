"""Input-invariant circuit analysis: what transcoder weights say without any prompt.

A transcoder's features read the residual stream through the pre-MLP norm and write to it
directly, so the model's weights alone give a feature's *direct* connections to earlier
features, to the vocabulary and to the logits (Dunefsky, Chlenski & Nanda 2024, "Transcoders
Find Interpretable LLM Feature Circuits", arXiv 2406.11944, Sec. 4: "input-invariant" analysis,
de-embeddings and pullbacks):

- **virtual weight** from feature ``i`` of layer ``s`` to feature ``j`` of layer ``t > s``:
  ``W_dec[s][i] . N_t(W_enc[t][j])``, the change in ``j``'s pre-activation per unit of ``i``'s
  activation along the direct residual path (Elhage et al. 2021, "A Mathematical Framework for
  Transformer Circuits"; Dunefsky et al. 2024, Sec. 4.1).
- **pullback** of feature ``j`` by layer ``s``: the column ``j`` of those virtual weights,
  ``W_dec[s] @ N_t(W_enc[t][j])`` ``[d_sae_s]`` (Dunefsky et al. 2024, Sec. 4.1).
- **de-embedding** of feature ``j``: ``W_E @ N_t(W_enc[t][j])`` ``[vocab]``, how much each
  token's embedding excites ``j`` directly (Dunefsky et al. 2024, Sec. 4.1); *head
  de-embeddings* route the embedding through one attention head's **OV circuit**
  ``W_V[kv(h)] @ W_O[h]`` with its pattern frozen at 1 on the source token.
- **logit effects** of feature ``j``: ``N_final(W_dec[t][j]) @ W_U`` ``[vocab]``, the direct
  effect of one unit of activation on every logit (the "logit lens" of the decoder row).

Norms (``N``). With no prompt a norm's input-dependent denominator is unknown; every norm is
treated as the frozen-linear map of :mod:`.replacement` with its denominator set to 1: LayerNorm
becomes ``x -> (x - mean(x)) * weight`` and RMSNorm ``x -> x * weight`` (Gemma's ``1 + w``
included); biases are constants and drop out of weight-space analysis. Each function takes the
denominators as ``denom`` arguments (a typical RMS of the norm's input, e.g. measured on a
dataset) for readings in real units; they scale every score of one call by the same factor, so
rankings never depend on them. A norm's frozen-linear map ``N`` reads ``x . N(e)`` for a
read direction ``e`` and its transpose: on the read side the gain multiplies, then LayerNorm
centres (:func:`norm_read`); on the write side LayerNorm centres, then the gain multiplies
(:func:`norm_write`).

Residual layout (as :mod:`.replacement`): features of layer ``l`` write into ``resid_post[l]``;
the MLP of layer ``l`` reads ``resid_mid[l]`` (sequential blocks) or ``resid_pre[l]`` (GPT-NeoX
parallel blocks); attention of layer ``a`` reads ``resid_pre[a]``. So a feature of layer ``s``
reaches a feature of layer ``t`` directly iff ``s < t``, reaches attention of layer ``a`` iff
``s < a``, and attention of layer ``a`` reaches the MLP of layer ``t`` iff ``a <= t``
(sequential) or ``a < t`` (parallel). Skip transcoders' ``W_skip`` path and value/output
biases are left out: they are not features.

Everything is computed in ``dtype`` (float32 by default); large matrices (``W_E``, ``W_U``,
``W_dec``) are cast and multiplied in row chunks, and ``[d_sae, d_sae]`` or ``[vocab, d_sae]``
products are never formed by the ``top_*`` functions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from ..coders.coder import SparseCoder
from ..models.adapters import ModelAdapter, NormSpec

DEFAULT_CHUNK = 4096  # rows of W_E / W_U.T / W_dec cast and multiplied at once


class WeightsError(ValueError):
    """A layer, feature or head index is out of range, or the path between them does not exist."""


# ---------------------------------------------------------------------------------------- results
def _label(tokenizer, token_id: int) -> str:
    return str(token_id) if tokenizer is None else repr(tokenizer.decode([token_id]))


@dataclass
class TopScores:
    """The ``k`` highest and ``k`` lowest entries of one score vector.

    ``kind`` is ``"token"`` (ids index the vocabulary) or ``"feature"`` (ids index the features
    of ``layer``). ``top_ids``/``top_scores`` ``[k]`` are in descending order,
    ``bottom_ids``/``bottom_scores`` ``[k]`` in ascending order (most negative first). Scores
    are in the units of the producing function (pre-activation units per unit of embedding or
    activation; logits for :func:`logit_effects`). When fewer than ``2k`` entries exist the two
    lists overlap.
    """

    kind: str
    top_ids: torch.Tensor
    top_scores: torch.Tensor
    bottom_ids: torch.Tensor
    bottom_scores: torch.Tensor
    layer: int | None = None

    def rows(self, tokenizer=None) -> list[tuple[str, int, str, float]]:
        """``(side, id, label, score)`` per entry, top entries first; ``side`` is ``"+"`` or
        ``"-"``; tokens are decoded with ``tokenizer`` when given, features read ``L{layer}/{id}``."""
        out = []
        for side, ids, scores in (("+", self.top_ids, self.top_scores), ("-", self.bottom_ids, self.bottom_scores)):
            for i, s in zip(ids.tolist(), scores.tolist()):
                label = _label(tokenizer, i) if self.kind == "token" else f"L{self.layer}/{i}"
                out.append((side, i, label, s))
        return out


@dataclass
class TopVirtualWeights:
    """The ``k`` largest virtual weights by magnitude between two layers' features.

    ``src``, ``dst`` ``[k]`` (long) are feature indices of ``src_layer`` and ``dst_layer``;
    ``weight`` ``[k]`` (pre-activation units of ``dst`` per unit of ``src`` activation), in
    descending ``|weight|``. Iterating yields ``(src, dst, weight)`` triples.
    """

    src_layer: int
    dst_layer: int
    src: torch.Tensor
    dst: torch.Tensor
    weight: torch.Tensor

    def rows(self) -> list[tuple[int, int, float]]:
        """``(src, dst, weight)`` triples."""
        return list(zip(self.src.tolist(), self.dst.tolist(), self.weight.tolist()))

    def __iter__(self) -> Iterator[tuple[int, int, float]]:
        return iter(self.rows())

    def __len__(self) -> int:
        return int(self.weight.numel())


@dataclass
class OVFeatureTable:
    """Top virtual weights from ``src_layer`` features through each head's OV circuit of
    ``attn_layer`` into ``dst_layer`` encoders.

    ``src``, ``dst``, ``weight`` are ``[n_heads, k]``: row ``h`` holds head ``h``'s ``k``
    largest ``|weight|`` pairs in descending order; ``ov_norm [n_heads]`` is each head's OV
    Frobenius norm (:func:`ov_norms`).
    """

    src_layer: int
    dst_layer: int
    attn_layer: int
    src: torch.Tensor
    dst: torch.Tensor
    weight: torch.Tensor
    ov_norm: torch.Tensor

    @property
    def n_heads(self) -> int:
        return int(self.weight.shape[0])

    def rows(self) -> list[tuple[int, int, int, float]]:
        """``(head, src, dst, weight)`` per entry, head by head."""
        out = []
        for h in range(self.n_heads):
            for s, d, w in zip(self.src[h].tolist(), self.dst[h].tolist(), self.weight[h].tolist()):
                out.append((h, s, d, w))
        return out


# ---------------------------------------------------------------------------------------- checks
def _coder(coders: Mapping[int, SparseCoder], layer: int, *, writes: bool = False) -> SparseCoder:
    if layer not in coders:
        raise WeightsError(f"no coder for layer {layer}; have layers {sorted(coders)}")
    coder = coders[layer]
    if writes and coder.cfg.kind == "sae":
        raise WeightsError(
            f"layer {layer}'s coder is an SAE: its decoder reconstructs the MLP input, it does not write "
            "into the residual stream; virtual weights, pullbacks and logit effects need transcoders"
        )
    if writes and coder.cfg.training.get("cross_layer_transcoder"):
        raise WeightsError(
            f"layer {layer}'s coder is part of a cross-layer transcoder, whose features write into every later "
            "layer; these virtual weights are defined for per-layer transcoders only (use the attribution graph)"
        )
    return coder


def _check_feature(coder: SparseCoder, layer: int, feature: int) -> int:
    n = coder.cfg.d_sae
    if not 0 <= int(feature) < n:
        raise WeightsError(f"feature {feature} is out of range for layer {layer} (0..{n - 1})")
    return int(feature)


def _check_mlp_path(src_layer: int, dst_layer: int) -> None:
    if not src_layer < dst_layer:
        raise WeightsError(
            f"layer {src_layer}'s features write after layer {dst_layer}'s MLP reads the residual stream; "
            f"direct paths need src_layer < dst_layer"
        )


def _check_attn_path(adapter: ModelAdapter, attn_layer: int, dst_layer: int, parallel: bool) -> None:
    adapter.check_layer(attn_layer)
    if attn_layer > dst_layer or (parallel and attn_layer == dst_layer):
        rule = "attn_layer < layer (parallel blocks)" if parallel else "attn_layer <= layer"
        raise WeightsError(
            f"attention of layer {attn_layer} cannot write into layer {dst_layer}'s MLP input; need {rule}"
        )


def _check_head(adapter: ModelAdapter, attn_layer: int, head: int) -> int:
    n = adapter.block_internals(attn_layer).ov.n_heads
    if not 0 <= int(head) < n:
        raise WeightsError(f"head {head} is out of range (layer {attn_layer} has heads 0..{n - 1})")
    return int(head)


def _device(device, *tensors_or_modules) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in tensors_or_modules:
        if isinstance(t, ModelAdapter):
            return t.device
        if isinstance(t, SparseCoder):
            return t.W_enc.device
    return torch.device("cpu")


def _cast(t: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------- norms
def norm_read(e: torch.Tensor, norm: NormSpec | None, denom: float = 1.0) -> torch.Tensor:
    """Pull read directions back through a frozen norm: ``[..., d] -> [..., d]``.

    If something reads the norm's output as ``N(x) . e``, it reads the norm's input as
    ``x . norm_read(e)``: ``e * weight / denom``, then centred for LayerNorm. ``norm=None`` is
    the identity.
    """
    if norm is None:
        return e
    e = e * norm.weight.to(device=e.device, dtype=e.dtype) / denom
    return e - e.mean(-1, keepdim=True) if norm.kind == "layernorm" else e


def norm_write(x: torch.Tensor, norm: NormSpec | None, denom: float = 1.0) -> torch.Tensor:
    """Push residual vectors through a frozen norm (no bias): ``[..., d] -> [..., d]``.

    ``(x - mean(x)) * weight / denom`` for LayerNorm, ``x * weight / denom`` for RMSNorm;
    ``norm=None`` is the identity. The transpose of :func:`norm_read`.
    """
    if norm is None:
        return x
    if norm.kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return x * norm.weight.to(device=x.device, dtype=x.dtype) / denom


def encoder_directions(
    coders: Mapping[int, SparseCoder],
    layer: int,
    adapter: ModelAdapter | None = None,
    features: torch.Tensor | list[int] | int | None = None,
    *,
    through_norm: bool = True,
    denom: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Residual-stream read directions of layer ``layer``'s features: ``[n, d_model]`` (``[d_model]``
    for one int ``feature``).

    ``norm_read(W_enc[features], ln_mlp[layer], denom)``: a residual vector ``x`` (written where
    the layer's MLP reads) moves feature ``j``'s pre-activation by ``x . directions[j]``. With
    ``adapter=None`` or ``through_norm=False`` the encoder rows are returned as they are.
    """
    coder = _coder(coders, layer)
    device = _device(device, coder)
    W_enc = coder.W_enc
    if isinstance(features, int):
        W_enc = W_enc[_check_feature(coder, layer, features)]
    elif features is not None:
        W_enc = W_enc[torch.as_tensor(features, dtype=torch.long, device=W_enc.device)]
    e = _cast(W_enc, dtype, device)
    if adapter is None or not through_norm:
        return e
    return norm_read(e, adapter.block_internals(layer).ln_mlp, denom)


# ---------------------------------------------------------------------------------------- top-k
def _top_bottom(scores: torch.Tensor, k: int, kind: str, layer: int | None = None) -> TopScores:
    k = min(int(k), scores.numel())
    top = scores.topk(k)
    bottom = scores.topk(k, largest=False)
    return TopScores(kind, top.indices, top.values, bottom.indices, bottom.values, layer)


def chunked_matvec(M: torch.Tensor, v: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``M @ v`` for a tall ``M [n, d]`` (any dtype/layout, e.g. ``W_U.T``) and ``v [d]``,
    casting ``chunk_size`` rows of ``M`` at a time to ``v``'s dtype and device: ``[n]``."""
    out = torch.empty(M.shape[0], dtype=v.dtype, device=v.device)
    for i in range(0, M.shape[0], chunk_size):
        out[i : i + chunk_size] = M[i : i + chunk_size].to(device=v.device, dtype=v.dtype) @ v
    return out


class RunningTopAbs:
    """Keeps the ``k`` largest-magnitude entries seen so far of a matrix ``[n, m]`` fed in row
    blocks (memory ``O(k)`` beyond the current block)."""

    def __init__(self, k: int, n_cols: int):
        self.k, self.m = int(k), int(n_cols)
        self.values: torch.Tensor | None = None
        self.index: torch.Tensor | None = None

    def update(self, block: torch.Tensor, row_offset: int) -> None:
        """Offer ``block [c, m]`` holding rows ``row_offset .. row_offset + c - 1``."""
        flat = block.flatten()
        top = flat.abs().topk(min(self.k, flat.numel())).indices
        values, index = flat[top], top + row_offset * self.m
        if self.values is not None:
            values, index = torch.cat([self.values, values]), torch.cat([self.index, index])
        keep = values.abs().topk(min(self.k, values.numel())).indices
        self.values, self.index = values[keep], index[keep]

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows [k], cols [k], values [k])`` in descending ``|value|``."""
        order = self.values.abs().argsort(descending=True, stable=True)
        values, index = self.values[order], self.index[order]
        return index // self.m, index % self.m, values


def chunked_top_abs(
    left: torch.Tensor, right: torch.Tensor, k: int, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` largest-magnitude entries of ``left @ right.T`` without forming it.

    Args:
        left: ``[n, r]`` (cast chunk by chunk to ``right``'s dtype and device).
        right: ``[m, r]``.
        k: entries wanted (clipped to ``n * m``).
        chunk_size: rows of ``left`` per chunk; peak memory is ``chunk_size * m`` scores.
    Returns:
        ``(rows [k], cols [k], values [k])`` in descending ``|value|``.
    """
    acc = RunningTopAbs(k, right.shape[0])
    for start in range(0, left.shape[0], chunk_size):
        acc.update(left[start : start + chunk_size].to(device=right.device, dtype=right.dtype) @ right.T, start)
    return acc.result()


# ---------------------------------------------------------------------------------------- virtual weights
def virtual_weights(
    coders: Mapping[int, SparseCoder],
    src_layer: int,
    dst_layer: int,
    adapter: ModelAdapter | None = None,
    through_norm: bool = True,
    *,
    denom: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Virtual weights between two layers' transcoder features: ``[d_sae_src, d_sae_dst]``.

    ``W_dec[src] @ N(W_enc[dst]).T`` with ``N`` = :func:`norm_read` through the destination's
    pre-MLP norm (gain, and centring for LayerNorm; denominator ``denom``), the direct-path
    connection of Dunefsky et al. 2024 (arXiv 2406.11944, Sec. 4.1). Entry ``[i, j]`` is the
    change in feature ``j``'s pre-activation per unit of feature ``i``'s activation. The norm is
    applied only when ``adapter`` is given and ``through_norm``; otherwise this is the raw
    ``W_dec[src] @ W_enc[dst].T``.

    This forms the full matrix; use :func:`top_virtual_weights` for large dictionaries.

    Raises:
        WeightsError: a layer has no coder, ``src_layer >= dst_layer``, or the source is an SAE.
    """
    _check_mlp_path(src_layer, dst_layer)
    src = _coder(coders, src_layer, writes=True)
    device = _device(device, src)
    read = encoder_directions(
        coders, dst_layer, adapter, through_norm=through_norm, denom=denom, dtype=dtype, device=device
    )
    return _cast(src.W_dec, dtype, device) @ read.T


def top_virtual_weights(
    coders: Mapping[int, SparseCoder],
    src_layer: int,
    dst_layer: int,
    adapter: ModelAdapter | None = None,
    k: int = 20,
    *,
    through_norm: bool = True,
    denom: float = 1.0,
    chunk_size: int = 1024,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> TopVirtualWeights:
    """The ``k`` largest-``|weight|`` entries of :func:`virtual_weights`, computed over chunks
    of ``chunk_size`` source features (peak memory ``chunk_size x d_sae_dst`` scores)."""
    _check_mlp_path(src_layer, dst_layer)
    src = _coder(coders, src_layer, writes=True)
    device = _device(device, src)
    read = encoder_directions(
        coders, dst_layer, adapter, through_norm=through_norm, denom=denom, dtype=dtype, device=device
    )
    i, j, w = chunked_top_abs(src.W_dec.detach(), read, k, chunk_size)
    return TopVirtualWeights(src_layer, dst_layer, i, j, w)


def pullback_scores(
    coders: Mapping[int, SparseCoder],
    layer: int,
    feature: int,
    src_layer: int,
    adapter: ModelAdapter | None = None,
    *,
    through_norm: bool = True,
    denom: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """The pullback of feature ``feature`` of ``layer`` by the transcoder of ``src_layer``:
    ``W_dec[src_layer] @ N(W_enc[layer][feature])`` ``[d_sae_src]`` (Dunefsky et al. 2024,
    arXiv 2406.11944, Sec. 4.1), i.e. column ``feature`` of :func:`virtual_weights`."""
    _check_mlp_path(src_layer, layer)
    src = _coder(coders, src_layer, writes=True)
    device = _device(device, src)
    read = encoder_directions(
        coders, layer, adapter, int(feature), through_norm=through_norm, denom=denom, dtype=dtype, device=device
    )
    return chunked_matvec(src.W_dec.detach(), read, chunk_size)


def pullback(
    coders: Mapping[int, SparseCoder],
    layer: int,
    feature: int,
    src_layer: int,
    adapter: ModelAdapter | None = None,
    k: int = 20,
    **kwargs,
) -> TopScores:
    """Which ``src_layer`` features excite (``top``) or inhibit (``bottom``) feature ``feature``
    of ``layer`` directly, from weights alone: the ``k`` highest and lowest entries of
    :func:`pullback_scores` (same keyword arguments)."""
    return _top_bottom(pullback_scores(coders, layer, feature, src_layer, adapter, **kwargs), k, "feature", src_layer)


# ---------------------------------------------------------------------------------------- de-embeddings
def deembedding_scores(
    adapter: ModelAdapter,
    coders: Mapping[int, SparseCoder],
    layer: int,
    feature: int,
    *,
    denom: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """The de-embedding of a feature: ``W_E @ N(W_enc[layer][feature])`` ``[vocab]``.

    Score ``t`` is how much token ``t``'s embedding (as layer 0 sees it, Gemma's scale included,
    GPT-2's position embedding excluded) moves the feature's pre-activation along the direct
    residual path, skipping every attention and MLP in between (Dunefsky et al. 2024, arXiv
    2406.11944, Sec. 4.1).
    """
    device = _device(device, adapter)
    read = encoder_directions(coders, layer, adapter, int(feature), denom=denom, dtype=dtype, device=device)
    return chunked_matvec(adapter.embedding_matrix(), read, chunk_size)


def deembedding(
    adapter: ModelAdapter, coders: Mapping[int, SparseCoder], layer: int, feature: int, k: int = 20, **kwargs
) -> TopScores:
    """The ``k`` tokens whose embeddings excite (``top``) and inhibit (``bottom``) a feature
    most along the direct path: top entries of :func:`deembedding_scores`."""
    return _top_bottom(deembedding_scores(adapter, coders, layer, feature, **kwargs), k, "token")


def head_read_direction(
    adapter: ModelAdapter,
    read: torch.Tensor,
    attn_layer: int,
    head: int,
    *,
    attn_denom: float = 1.0,
    attn_out_denom: float = 1.0,
) -> torch.Tensor:
    """Pull a residual read direction ``read [..., d_model]`` back through one head's OV circuit.

    If a reader sees ``x . read`` of what head ``head`` of ``attn_layer`` writes, and the head
    attends with weight 1 to a source position whose residual is ``v``, it sees
    ``v . head_read_direction(read)``, where the forward path is
    ``v -> ln_attn -> W_V[kv(head)] -> W_O[head] -> attn_out_norm (Gemma 2/3)``. Value and
    output biases are constants and left out. Returns ``[..., d_model]``.
    """
    bi = adapter.block_internals(attn_layer)
    ov = bi.ov
    head = _check_head(adapter, attn_layer, head)
    cast = lambda t: t.to(device=read.device, dtype=read.dtype)
    r = norm_read(read, bi.attn_out_norm, attn_out_denom)
    z = r @ cast(ov.W_O[head]).T  # [..., d_head]
    v = z @ cast(ov.W_V[ov.kv_head(head)]).T  # [..., d_model]
    return norm_read(v, bi.ln_attn, attn_denom)


def head_deembedding_scores(
    adapter: ModelAdapter,
    coders: Mapping[int, SparseCoder],
    layer: int,
    feature: int,
    attn_layer: int,
    head: int,
    *,
    denom: float = 1.0,
    attn_denom: float = 1.0,
    attn_out_denom: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """A feature's de-embedding through one attention head: ``[vocab]``.

    ``W_E @ diag(ln_attn) @ W_V[kv(h)] @ W_O[h] @ diag(attn_out_norm) @ N(W_enc[feature])``
    with every norm frozen-linear (LayerNorm centring included): how much token ``t``, read by
    head ``head`` of ``attn_layer`` with attention weight 1, moves the feature's pre-activation
    (Dunefsky et al. 2024, arXiv 2406.11944, Sec. 4.1). ``denom``, ``attn_denom`` and
    ``attn_out_denom`` are the frozen denominators of the feature's pre-MLP norm, the head's
    pre-attention norm and (Gemma 2/3) its post-attention norm.

    Raises:
        WeightsError: ``attn_layer > layer`` (or ``== layer`` for parallel blocks), or a bad head.
    """
    _check_attn_path(adapter, attn_layer, layer, adapter.block_internals(layer).parallel)
    device = _device(device, adapter)
    read = encoder_directions(coders, layer, adapter, int(feature), denom=denom, dtype=dtype, device=device)
    read = head_read_direction(adapter, read, attn_layer, head, attn_denom=attn_denom, attn_out_denom=attn_out_denom)
    return chunked_matvec(adapter.embedding_matrix(), read, chunk_size)


def head_deembedding(
    adapter: ModelAdapter,
    coders: Mapping[int, SparseCoder],
    layer: int,
    feature: int,
    attn_layer: int,
    head: int,
    k: int = 20,
    **kwargs,
) -> TopScores:
    """The ``k`` tokens that excite (``top``) and inhibit (``bottom``) a feature most through
    one head's OV circuit: top entries of :func:`head_deembedding_scores`."""
    return _top_bottom(head_deembedding_scores(adapter, coders, layer, feature, attn_layer, head, **kwargs), k, "token")


# ---------------------------------------------------------------------------------------- logit effects
def logit_effect_scores(
    adapter: ModelAdapter,
    coders: Mapping[int, SparseCoder],
    layer: int,
    feature: int,
    *,
    denom: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Direct effect of one unit of a feature's activation on every logit: ``[vocab]`` (logits).

    ``N_final(W_dec[layer][feature]) @ W_U`` with the final norm frozen-linear (denominator
    ``denom``; centring for LayerNorm); the unembedding bias and Gemma 2's final logit
    soft-cap are left out. This is the logit lens of the feature's output direction.
    """
    coder = _coder(coders, layer, writes=True)
    feature = _check_feature(coder, layer, feature)
    device = _device(device, adapter)
    write = norm_write(_cast(coder.W_dec[feature], dtype, device), adapter.final_norm(), denom)
    W_U, _ = adapter.unembed()
    return chunked_matvec(W_U.T, write, chunk_size)


def logit_effects(
    adapter: ModelAdapter, coders: Mapping[int, SparseCoder], layer: int, feature: int, k: int = 20, **kwargs
) -> TopScores:
    """The ``k`` tokens a feature promotes (``top``) and suppresses (``bottom``) most directly:
    top entries of :func:`logit_effect_scores`."""
    return _top_bottom(logit_effect_scores(adapter, coders, layer, feature, **kwargs), k, "token")


# ---------------------------------------------------------------------------------------- OV circuits
def ov_norms(
    adapter: ModelAdapter, *, dtype: torch.dtype = torch.float32, layers: list[int] | None = None
) -> torch.Tensor:
    """Frobenius norm of every head's OV circuit ``W_V[kv(h)] @ W_O[h]``: ``[n_layers, n_heads]``
    (``[len(layers), n_heads]`` when ``layers`` is given).

    Uses ``||A B||_F^2 = sum((A^T A) * (B B^T))`` with the ``[d_head, d_head]`` Gram matrices,
    so no ``[d_model, d_model]`` product is formed. Norms are not included.
    """
    out = []
    for layer in range(adapter.n_layers) if layers is None else layers:
        ov = adapter.block_internals(layer).ov
        W_V, W_O = ov.W_V.to(dtype), ov.W_O.to(dtype)
        gram_v = W_V.transpose(1, 2) @ W_V  # [n_kv, e, e]
        gram_o = W_O @ W_O.transpose(1, 2)  # [H, e, e]
        kv = torch.tensor([ov.kv_head(h) for h in range(ov.n_heads)], device=W_V.device)
        sq = (gram_v[kv] * gram_o).sum((1, 2))
        out.append(sq.clamp_min(0).sqrt())
    return torch.stack(out)


def ov_feature_table(
    adapter: ModelAdapter,
    coders: Mapping[int, SparseCoder],
    src_layer: int,
    dst_layer: int,
    attn_layer: int,
    k: int = 10,
    *,
    denom: float = 1.0,
    attn_denom: float = 1.0,
    attn_out_denom: float = 1.0,
    chunk_size: int = 1024,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> OVFeatureTable:
    """Virtual weights from ``src_layer`` features through each head's OV circuit of
    ``attn_layer`` into ``dst_layer`` features, top ``k`` by ``|weight|`` per head.

    Head ``h``'s weight from source ``i`` to destination ``j`` is
    ``N_attn(W_dec[src][i]) @ W_V[kv(h)] @ W_O[h] @ N_out . N_mlp(W_enc[dst][j])`` (frozen
    norms as in the module docstring): the change in ``j``'s pre-activation per unit of ``i``'s
    activation at a source position that ``h`` attends to with weight 1 (the OV part of
    Dunefsky et al. 2024, arXiv 2406.11944, Sec. 4.1, following Elhage et al. 2021). Each head's
    matrix factors through ``d_head`` and is searched in chunks of ``chunk_size`` sources.

    Raises:
        WeightsError: the layers admit no such path (need ``src_layer < attn_layer`` and
            ``attn_layer <= dst_layer``, strictly for parallel blocks).
    """
    _check_attn_path(adapter, attn_layer, dst_layer, adapter.block_internals(dst_layer).parallel)
    if not src_layer < attn_layer:
        raise WeightsError(
            f"layer {src_layer}'s features are written after attention of layer {attn_layer} reads; "
            "need src_layer < attn_layer"
        )
    src = _coder(coders, src_layer, writes=True)
    device = _device(device, src)
    bi = adapter.block_internals(attn_layer)
    ov = bi.ov
    read = encoder_directions(coders, dst_layer, adapter, denom=denom, dtype=dtype, device=device)
    read = norm_read(read, bi.attn_out_norm, attn_out_denom)  # [d_sae_dst, d]
    W_V, W_O = _cast(ov.W_V, dtype, device), _cast(ov.W_O, dtype, device)
    right = torch.einsum("md,hed->hme", read, W_O)  # [n_heads, d_sae_dst, d_head]
    accs = [RunningTopAbs(k, read.shape[0]) for _ in range(ov.n_heads)]
    W_dec = src.W_dec.detach()
    for start in range(0, W_dec.shape[0], chunk_size):
        x = norm_write(_cast(W_dec[start : start + chunk_size], dtype, device), bi.ln_attn, attn_denom)
        values = torch.einsum("cd,gde->gce", x, W_V)  # [n_kv, chunk, d_head]
        for h, acc in enumerate(accs):
            acc.update(values[ov.kv_head(h)] @ right[h].T, start)
    rows = [acc.result() for acc in accs]
    stack = lambda i: torch.stack([r[i] for r in rows])
    norms = ov_norms(adapter, dtype=dtype, layers=[attn_layer])[0].to(device)
    return OVFeatureTable(src_layer, dst_layer, attn_layer, stack(0), stack(1), stack(2), norms)
