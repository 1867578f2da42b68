"""Checking a QK attribution by intervention: remove one source's write and watch the head.

Two measurements, as for edges:

- **frozen**: in the local replacement model (features and error nodes held, earlier
  attention patterns and every norm denominator frozen), remove the source's write and
  recompute the head's scores from query position ``q`` to every key; the score at ``k`` moves
  by exactly minus the source's terms (its query-side row plus its key-side column, less the
  term it shares with itself), and the softmax over the keys gives the predicted attention
  weight.
- **free**: remove the same write from the real model (an MLP output, or the embedding) and
  let everything downstream recompute -- later features, attention patterns, norms -- then read
  the head's attention weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .qk import HeadQK, QKAttribution, QKError
from .replacement import LocalReplacement, _eager_attention


@dataclass
class QKCheck:
    """What removing one source does to head ``layer.head`` at ``(q, k)``.

    Attributes:
        source: the removed source (``{"kind", "layer", "pos", "feature"}``).
        predicted_change: minus the source's terms (row + column - own term) in the breakdown.
        score, score_frozen: the pre-softmax score before and after, frozen model.
        pattern, pattern_frozen, pattern_free: the attention weight ``A[head, q, k]`` before, in
            the frozen model after, and in the free (real) model after.
    """

    source: dict
    predicted_change: float
    score: float
    score_frozen: float
    pattern: float
    pattern_frozen: float
    pattern_free: float


def source_write(rep: LocalReplacement, src: dict) -> tuple[int, torch.Tensor]:
    """``(layer, write [T, d])``: what a feature, error node or embedding writes into the residual
    stream (layer -1: the embeddings, i.e. the input of block 0).

    Raises:
        QKError: a bias or head-bias source (constants are not removable), or a feature that is
            not active there.
    """
    out = torch.zeros(rep.n_pos, rep.d_model, dtype=rep.dtype, device=rep.device)
    kind, layer, pos = src["kind"], src["layer"], src["pos"]
    if kind == "feature":
        f = rep.layers[layer].features
        hit = ((f.pos == pos) & (f.feature == src["feature"])).nonzero()
        if hit.numel() == 0:
            raise QKError(f"feature L{layer} f{src['feature']} is not active at pos{pos}")
        out[pos] = f.activation[int(hit[0, 0])] * rep.coder_weight(layer, "W_dec")[src["feature"]]
    elif kind == "error":
        out[pos] = rep.layers[layer].error[pos]
    elif kind == "embedding":
        out[pos] = rep.resid0[pos]
    else:
        raise QKError(f"a {kind} source is a constant; only features, error nodes and embeddings can be removed")
    return layer, out


@torch.no_grad()
def frozen_pattern(rep: LocalReplacement, layer: int, head: int, q: int,
                   resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [q + 1], pattern [q + 1])`` of head ``layer.head`` from query ``q`` to every key,
    with ``resid [T, d]`` in place of ``resid_pre[layer]`` and everything else frozen (keys the
    head's mask hides on the prompt stay hidden). Scores are before any soft-cap; the pattern
    is the softmax after it."""
    maps = HeadQK(rep, layer)
    qs = maps.side(head, q, "q")
    Q = qs.at(resid[q]) + qs.const
    scores = torch.stack([maps.scale * (Q @ (s.at(resid[j]) + s.const))
                          for j, s in ((j, maps.side(head, j, "k")) for j in range(q + 1))])
    capped = maps.softcap * torch.tanh(scores / maps.softcap) if maps.softcap else scores
    visible = rep.layers[layer].pattern[head, q, : q + 1] > 0
    return scores, torch.softmax(capped.masked_fill(~visible, -torch.inf), 0)


@torch.no_grad()
def free_pattern(rep: LocalReplacement, layer: int, writes: dict[int, torch.Tensor]) -> torch.Tensor:
    """``[H, T, T]``: the attention pattern of ``layer`` in the real model with each
    ``writes[l] [T, d]`` subtracted from the MLP output of layer ``l`` (``-1``: from the input of
    block 0), everything downstream recomputed."""
    adapter = rep.adapter
    deltas = {lyr: w.to(adapter.dtype) for lyr, w in writes.items()}
    handles = []
    patterns: dict = {}

    def grab(_module, _args, output):
        patterns["p"] = output[1][0]

    def remove_from_input(_module, args, kwargs):
        if args:
            return (args[0] - deltas[-1], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] - deltas[-1]}

    handles.append(adapter.block_internals(layer).attention.register_forward_hook(grab))
    if -1 in deltas:
        handles.append(adapter.layers()[0].register_forward_pre_hook(remove_from_input, with_kwargs=True))
    mlps = sorted(lyr for lyr in deltas if lyr >= 0)
    try:
        with _eager_attention(adapter.model), adapter.hook_mlps(mlps, on_output=lambda lyr, _x, out: out - deltas[lyr]):
            adapter.model(input_ids=rep.tokens[None].to(adapter.device), output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return patterns["p"].to(rep.dtype)


@torch.no_grad()
def check_source(rep: LocalReplacement, a: QKAttribution, col: int, src: dict) -> QKCheck:
    """Remove source ``src`` (column ``col`` of ``a``) and measure the head, frozen and free
    (module docstring).

    Raises:
        QKError: ``src`` is a constant, or not active.
    """
    src_layer, write = source_write(rep, src)
    if src_layer >= a.layer:
        raise QKError(f"{src['kind']} of layer {src_layer} writes after layer {a.layer}'s attention reads")
    removed = rep.forward(delta_post={src_layer: -write}).resid_pre[a.layer]
    own = float(a.terms(torch.tensor([col]), torch.tensor([col]))[0, 0])
    predicted = -(float(a.query_marginals()[col]) + float(a.key_marginals()[col]) - own)
    scores, pattern = frozen_pattern(rep, a.layer, a.head, a.q, removed)
    free = free_pattern(rep, a.layer, {src_layer: write})
    return QKCheck(src, predicted, a.score, float(scores[a.k]), a.pattern, float(pattern[a.k]),
                   float(free[a.head, a.q, a.k]))
