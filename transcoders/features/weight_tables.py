"""What every feature of a coder does and reads, from weights alone, for all features at once.

Per feature (Dunefsky, Chlenski & Nanda 2024, arXiv 2406.11944, Sec. 4: input-invariant
analysis; definitions and norm handling in :mod:`transcoders.circuits.weights`):

- **logit effects**: the ``k`` tokens whose logits one unit of activation raises most and lowers
  most, ``N_final(W_dec[f]) @ W_U`` (logits per unit of activation);
- **de-embedding**: the ``k`` tokens whose embeddings excite the feature most directly,
  ``W_E @ N(W_enc[f])``;
- **pullback**: the ``k`` features of the previous layer's transcoder with the largest
  virtual weights into it (when the run has that layer);
- **OV heads**: the heads whose OV circuit can write most into its read direction,
  ``||head_read_direction(N(W_enc[f]))||`` (per unit of source-residual norm, pattern 1);
- **decoder neighbours**: the features with the most similar decoder direction (cosine), which
  supply near-miss examples.

All ``[d_sae, vocab]`` products are formed in chunks of features and reduced to their top
entries at once; nothing vocab-sized is kept.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..circuits.weights import encoder_directions, head_read_direction, norm_write
from ..coders.coder import SparseCoder
from ..models.adapters import ModelAdapter

CHUNK = 1024  # features per matmul


def _top_both(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1)
    bottom = scores.topk(k, dim=1, largest=False)
    return top.indices, top.values, bottom.indices, bottom.values


@torch.inference_mode()
def weight_tables(adapter: ModelAdapter, coders: Mapping[int, SparseCoder], layer: int, coder: SparseCoder,
                  *, k: int = 10, n_heads: int = 5, n_neighbours: int = 8) -> dict[str, torch.Tensor]:
    """Per-feature tables of one coder (``coder``, at ``layer``), from weights alone.

    ``coders`` are the run's other per-layer coders (for the pullback from ``layer - 1``).

    Returns ``{name: tensor}``, every tensor ``[d_sae, ...]``: ``logit_top_ids/_scores``,
    ``logit_bottom_ids/_scores`` (``[d_sae, k]``, logits per unit of activation; skipped for
    SAEs, which do not write), ``deemb_top_ids/_scores`` ``[d_sae, k]``, ``pullback_ids/_scores``
    ``[d_sae, k]`` (largest ``|virtual weight|`` from layer ``layer - 1``), ``ov_heads``
    ``[d_sae, n_heads, 2]`` (attention layer, head) and ``ov_scores`` ``[d_sae, n_heads]``,
    ``neighbour_ids/_cos`` ``[d_sae, n_neighbours]``.
    """
    d_sae = coder.cfg.d_sae
    device = adapter.device
    own = {**coders, layer: coder}
    read = encoder_directions(own, layer, adapter, dtype=torch.float32, device=device)  # [d_sae, d_model]
    out: dict[str, list[torch.Tensor]] = {}

    def add(**named: torch.Tensor) -> None:
        for name, t in named.items():
            out.setdefault(name, []).append(t.cpu())

    W_E = adapter.embedding_matrix().float()
    W_U = adapter.unembed()[0].float() if coder.cfg.kind != "sae" else None
    dec = coder.W_dec.detach().float().to(device)
    dec_unit = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    prev = coders.get(layer - 1)
    prev_dec = prev.W_dec.detach().float().to(device) if prev is not None and prev is not coder else None
    parallel = adapter.block_internals(layer).parallel
    attn_layers = range(layer if parallel else layer + 1)
    heads = [(a, h) for a in attn_layers for h in range(adapter.block_internals(a).ov.n_heads)]
    for lo in range(0, d_sae, CHUNK):
        r = read[lo: lo + CHUNK]
        ti, tv, _, _ = _top_both(r @ W_E.T, k)
        add(deemb_top_ids=ti, deemb_top_scores=tv)
        if W_U is not None:
            w = norm_write(dec[lo: lo + CHUNK], adapter.final_norm())
            ti, tv, bi, bv = _top_both(w @ W_U, k)
            add(logit_top_ids=ti, logit_top_scores=tv, logit_bottom_ids=bi, logit_bottom_scores=bv)
        if prev_dec is not None:
            vw = r @ prev_dec.T  # [chunk, d_sae_prev]
            top = vw.abs().topk(min(k, vw.shape[1]), dim=1).indices
            add(pullback_ids=top, pullback_scores=vw.gather(1, top))
        if heads:
            norms = torch.stack([head_read_direction(adapter, r, a, h).norm(dim=-1) for a, h in heads], 1)
            top = norms.topk(min(n_heads, len(heads)), dim=1)
            add(ov_heads=torch.tensor(heads)[top.indices.cpu()], ov_scores=top.values)
        cos = dec_unit[lo: lo + CHUNK] @ dec_unit.T
        cos[torch.arange(cos.shape[0]), torch.arange(lo, lo + cos.shape[0])] = -2.0  # not itself
        top = cos.topk(min(n_neighbours, d_sae - 1), dim=1)
        add(neighbour_ids=top.indices, neighbour_cos=top.values)
    return {name: torch.cat(parts).contiguous() for name, parts in out.items()}
