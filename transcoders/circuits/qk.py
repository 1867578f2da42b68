"""QK attribution: why a head attends where it does.

Attribution graphs freeze attention patterns, so an edge says that head ``L.H`` moved a feature
from key position ``k`` to query position ``q`` but not why the head looked at ``k``. Following
the method Anthropic described in the Circuit Tracing follow-up (Ameisen et al. 2025, "QK
attributions"), the head's pre-softmax score is a bilinear form in the residual streams at ``q``
and ``k``::

    score = scale * Q . K,   Q = R_q D_q W_Q^T N_q(x_q) + c_q,   K = R_k D_k W_K^T N_k(x_k) + c_k

where ``N_p`` is the pre-attention norm with its denominator frozen at position ``p`` (as for
edges), ``D_p`` a per-head ``q_norm``/``k_norm`` frozen likewise (Gemma 3; identity elsewhere),
``R_p`` the rotary embedding at ``p`` (identity for GPT-2) and ``c`` the head's own constant
(norm bias through ``W``, ``b_Q``/``b_K``, through ``D`` and ``R``). Each side is affine in its
residual stream, and in the local replacement model (features and error nodes held, attention
patterns frozen) the residual stream at ``(layer, p)`` is exactly the sum of what every source
node -- embeddings, features, error nodes, bias nodes -- contributes there through the frozen
linear paths (:mod:`.attribution`). So ``Q = sum_s Q_s + c_q`` and ``K = sum_t K_t + c_k`` and

    score = scale * sum_{s, t} Q_s . K_t   (s, t over the sources and the head's own constant)

exactly: a matrix of (query-side source, key-side source) pair terms.

**Positions.** RoPE is a rotation ``R_p`` of the first ``rotary dims`` of each head vector, with
``R_q^T R_k = R_{k - q}``; each pair term is ``a_s^T R_{k - q} b_t`` for the unrotated projections
``a_s``, ``b_t``: positions enter the form only through their offset, and the rotation is folded
into each side's map here. NeoX's partial rotary leaves the remaining dimensions unrotated.

**Cost.** ``Q_s`` for every source at once is ``d_head`` attribution rows (one per coordinate of the
head vector, each a read of the residual stream at ``(layer, q)``), computed by the same explicit
backward sweep as graph edges; the key side likewise. Gemma 2's attention soft-cap
(``softcap * tanh(score / softcap)``) is applied after the score and is not linear: the terms
decompose the score before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attribution import Read, SourceIndex, attribution_rows
from .graph import source_name
from .replacement import LocalReplacement

QK_SCHEMA = "transcoders.qk/1"


class QKError(ValueError):
    """A head, layer or position pair that the model or prompt does not have."""


def rope_matrix(cos: torch.Tensor, sin: torch.Tensor, d_head: int) -> torch.Tensor:
    """``R [d_head, d_head]`` with ``R @ v`` = the rotary embedding of head vector ``v`` at one
    position, as Hugging Face applies it (``v * cos + rotate_half(v) * sin`` on the first
    ``len(cos)`` dimensions; the rest pass through).

    Args:
        cos, sin: ``[rotary dims]`` at that position.
    """
    r, half = cos.numel(), cos.numel() // 2
    eye = torch.eye(d_head, dtype=cos.dtype, device=cos.device)
    x = eye[:, :r]
    rotated = torch.cat([-x[:, half:], x[:, :half]], dim=-1)
    rows = eye.clone()
    rows[:, :r] = x * cos + rotated * sin  # row i = rope(e_i) = column i of R
    return rows.T


@dataclass
class SideMap:
    """One head's query or key side at one position ``pos``, frozen: ``vec = row . x[pos] + const``.

    ``row [d_head, d]``: per coordinate of the head vector, the gradient on the residual stream
    ``resid_pre[layer]`` at ``pos`` (already through the frozen pre-attention norm); ``const
    [d_head]``; ``vec [d_head]``: the rotated (and normed) query or key on the prompt.
    """

    pos: int
    row: torch.Tensor
    const: torch.Tensor
    vec: torch.Tensor

    def grad(self, n_pos: int, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The read as a gradient on the whole stream: ``[n_pos, d]`` for ``sum_i weights[i]
        vec[i]``, or ``[d_head, n_pos, d]`` (one per coordinate) without ``weights``."""
        if weights is None:
            g = self.row.new_zeros(self.row.shape[0], n_pos, self.row.shape[1])
            g[:, self.pos] = self.row
            return g
        g = self.row.new_zeros(n_pos, self.row.shape[1])
        g[self.pos] = weights @ self.row
        return g

    def at(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_head]``: the side's linear part on residual vectors ``x [..., d]`` at ``pos``."""
        return x @ self.row.T


class HeadQK:
    """The frozen query/key maps of one layer of a :class:`LocalReplacement`.

    Raises:
        QKError: the layer is out of range.
    """

    def __init__(self, rep: LocalReplacement, layer: int):
        if not 0 <= layer < rep.n_layers:
            raise QKError(f"layer {layer} is out of range: the model has layers 0..{rep.n_layers - 1}")
        self.rep, self.layer = rep, layer
        qk = rep.adapter.attention_qk(layer)
        cast = lambda t: None if t is None else t.to(device=rep.device, dtype=rep.dtype)
        self.W_Q, self.b_Q, self.W_K, self.b_K = cast(qk.W_Q), cast(qk.b_Q), cast(qk.W_K), cast(qk.b_K)
        self.q_norm, self.k_norm = qk.q_norm, qk.k_norm
        self.scale, self.softcap = qk.scale, qk.softcap
        self.n_heads, self.n_kv = self.W_Q.shape[0], self.W_K.shape[0]
        self.d_head = self.W_Q.shape[-1]
        fl = rep.layers[layer]
        self.fl = fl
        self.normed = fl.ln_attn(rep.resid_pre[layer])  # [T, d]

    def check(self, head: int, q: int, k: int) -> None:
        T = self.rep.n_pos
        if not 0 <= head < self.n_heads:
            raise QKError(f"head {self.layer}.{head} does not exist: layer {self.layer} has heads 0..{self.n_heads - 1}")
        if not (0 <= q < T and 0 <= k < T):
            raise QKError(f"positions q={q}, k={k} must lie in the {T}-token prompt (0..{T - 1})")
        if k > q:
            raise QKError(f"key position {k} is after query position {q}; a causal head cannot attend there "
                          "(give --k at or before --q)")

    def kv_head(self, head: int) -> int:
        return head // (self.n_heads // self.n_kv)

    def side(self, head: int, pos: int, side: str) -> SideMap:
        """The frozen map of ``side`` (``"q"`` for query head ``head``, ``"k"`` for its key/value
        head) at position ``pos``."""
        rep, fl = self.rep, self.fl
        if side == "q":
            W, b, norm = self.W_Q[head], self.b_Q, self.q_norm
            b = None if b is None else b[head]
        else:
            g = self.kv_head(head)
            W, b, norm = self.W_K[g], self.b_K, self.k_norm
            b = None if b is None else b[g]
        M = W.T  # [d_head, d] on the normalised input
        const = torch.zeros(self.d_head, dtype=rep.dtype, device=rep.device)
        if b is not None:
            const = const + b
        if fl.ln_attn.bias is not None:
            const = const + fl.ln_attn.bias @ W
        raw = self.normed[pos] @ W + (0 if b is None else b)
        if norm is not None:  # per-head RMSNorm over d_head, denominator frozen on the prompt
            s = norm.weight.to(rep.device, rep.dtype) / norm.denom(raw)
            M, const, raw = s[:, None] * M, s * const, s * raw
        if fl.rope is not None:
            R = rope_matrix(fl.rope[0][pos], fl.rope[1][pos], self.d_head)
            M, const, raw = R @ M, R @ const, R @ raw
        return SideMap(pos, fl.ln_attn.transpose_at(M, pos), const, raw)

    def score(self, head: int, q: int, k: int) -> float:
        """The frozen pre-softmax score ``scale * Q . K`` (before any soft-cap)."""
        return float(self.scale * (self.side(head, q, "q").vec @ self.side(head, k, "k").vec))


@dataclass
class QKAttribution:
    """The exact pair decomposition of one head's score between query position ``q`` and key
    position ``k`` (module docstring).

    Columns are those of :class:`~.attribution.SourceIndex` plus one more, ``n_cols``: the
    side's own constant (norm bias, ``b_Q`` / ``b_K``).

    Attributes:
        layer, head, q, k: the head and position pair.
        scale: the score scale; ``softcap``: Gemma 2's attention soft-cap or None.
        query, key: ``[rows, d_head]``: the part of the query (key) vector of each source in
            ``q_cols`` (``k_cols``); ``*_cols`` None means every column in order.
        Q, K: ``[d_head]`` the whole query and key vectors.
        q_marg, k_marg: ``[n_cols + 1]`` each source's terms summed over the other side, or None
            to compute them from ``query`` / ``key`` (possible when they hold every column).
        pattern: the model's attention weight ``A[head, q, k]`` on the prompt.
    """

    layer: int
    head: int
    q: int
    k: int
    scale: float
    softcap: float | None
    query: torch.Tensor
    key: torch.Tensor
    Q: torch.Tensor
    K: torch.Tensor
    pattern: float
    q_cols: torch.Tensor | None = None
    k_cols: torch.Tensor | None = None
    q_marg: torch.Tensor | None = None
    k_marg: torch.Tensor | None = None

    @property
    def score(self) -> float:
        """The pre-softmax score, the sum of all pair terms."""
        return float(self.scale * (self.Q @ self.K))

    @property
    def capped_score(self) -> float:
        """The score after the soft-cap (equal to :attr:`score` without one)."""
        s = self.score
        return s if not self.softcap else float(self.softcap * torch.tanh(torch.tensor(s / self.softcap)))

    def query_marginals(self) -> torch.Tensor:
        """``[n_cols + 1]``: each query-side source's terms summed over the key side
        (``scale * Q_s . K``)."""
        return self.q_marg if self.q_marg is not None else self.scale * (self.query @ self.K)

    def key_marginals(self) -> torch.Tensor:
        """``[n_cols + 1]``: each key-side source's terms summed over the query side."""
        return self.k_marg if self.k_marg is not None else self.scale * (self.key @ self.Q)

    def _rows(self, cols: torch.Tensor, have: torch.Tensor | None, side: str) -> torch.Tensor:
        cols = torch.as_tensor(cols, dtype=torch.long, device=self.query.device).flatten()
        if have is None:
            return cols
        where = torch.searchsorted(have, cols).clamp_max(len(have) - 1)
        if not bool((have[where] == cols).all()):
            raise QKError(f"some {side}-side columns are not among the computed candidates; compute every column with "
                          "qk_attribution() for these")
        return where

    def terms(self, q_cols: torch.Tensor, k_cols: torch.Tensor) -> torch.Tensor:
        """``[len(q_cols), len(k_cols)]`` pair terms ``scale * Q_s . K_t`` (columns as in the
        class docstring).

        Raises:
            QKError: a column is not among the computed candidates.
        """
        qr, kr = self._rows(q_cols, self.q_cols, "query"), self._rows(k_cols, self.k_cols, "key")
        return self.scale * (self.query[qr] @ self.key[kr].T)

    def top_pairs(self, n: int = 10, candidates: int = 64) -> list[tuple[int, int, float]]:
        """The ``n`` largest ``|term|`` pairs ``(query col, key col, term)``, searched among each
        side's ``candidates`` sources of largest ``|marginal|`` and of largest vector norm (a
        large term needs a large vector on both sides), or among the computed candidates."""
        def pick(side: torch.Tensor, cols: torch.Tensor | None, marg: torch.Tensor) -> torch.Tensor:
            if cols is not None:
                return cols
            m = min(candidates, side.shape[0])
            return torch.unique(torch.cat([marg.abs().topk(m).indices, side.norm(dim=-1).topk(m).indices]))

        qc = pick(self.query, self.q_cols, self.query_marginals())
        kc = pick(self.key, self.k_cols, self.key_marginals())
        flat = self.terms(qc, kc).flatten()
        top = flat.abs().topk(min(n, flat.numel())).indices
        return [(int(qc[i // len(kc)]), int(kc[i % len(kc)]), float(flat[i])) for i in top.tolist() if float(flat[i]) != 0.0]


@torch.no_grad()
def qk_attribution(rep: LocalReplacement, layer: int, head: int, q: int, k: int, *,
                   index: SourceIndex | None = None, batch_size: int = 64) -> QKAttribution:
    """Decompose head ``layer.head``'s pre-softmax score from query position ``q`` to key position
    ``k`` into (query-side source, key-side source) pair terms, for every pair of sources.

    Costs ``2 * d_head`` attribution rows; :func:`qk_attributions` explains many heads for
    about ``2 + 2 * candidates`` rows each.

    Args:
        rep: the local replacement model of the prompt (float64 makes the identities exact to
            ~1e-12).
        layer, head: the head (a query head; grouped-query key/value heads are found).
        q, k: positions with ``k <= q``; negative values count from the end.
        index: the column layout (built if not given; pass one to share it across heads).
        batch_size: attribution rows per backward sweep.

    Returns:
        a :class:`QKAttribution` holding every column; ``scale * query.sum(0) . key.sum(0)`` is
        the score.

    Raises:
        QKError: the layer, head or positions are out of range, or ``k > q``.
    """
    rep.require_per_layer("QK attribution")
    T = rep.n_pos
    q, k = (q + T if q < 0 else q), (k + T if k < 0 else k)
    maps = HeadQK(rep, layer)
    maps.check(head, q, k)
    index = index or SourceIndex(rep)
    sides = [maps.side(head, q, "q"), maps.side(head, k, "k")]
    query, key = (side_rows(rep, s, layer, index, batch_size) for s in sides)
    pattern = float(rep.layers[layer].pattern[head, q, k])
    return QKAttribution(layer, head, q, k, maps.scale, maps.softcap, query, key, sides[0].vec, sides[1].vec, pattern)


def side_rows(rep: LocalReplacement, side: SideMap, layer: int, index: SourceIndex, batch_size: int = 64) -> torch.Tensor:
    """``[n_cols + 1, d_head]``: each source's part of a frozen query or key vector (the last row:
    the side's constant)."""
    grads = side.grad(rep.n_pos)
    reads = [Read(("post", layer - 1), grads[i], 0.0, float(side.const[i])) for i in range(grads.shape[0])]
    rows = torch.cat([attribution_rows(rep, reads[i : i + batch_size], index) for i in range(0, len(reads), batch_size)])
    return torch.cat([rows.T, side.const[None]])


def column_writes(rep: LocalReplacement, index: SourceIndex, cols: list[int]) -> tuple[dict, dict]:
    """What each source column writes, batched: ``(post, attn)`` with ``post[layer] [N, T, d]``
    added to ``resid_post[layer]`` (layer -1: the embeddings) and ``attn[layer]`` to what
    attention of ``layer`` writes (a bias node's attention constant), for the ``N`` columns."""
    T, N = rep.n_pos, len(cols)
    post: dict[int, torch.Tensor] = {}
    attn: dict[int, torch.Tensor] = {}

    def slot(store: dict, layer: int) -> torch.Tensor:
        if layer not in store:
            store[layer] = torch.zeros(N, T, rep.d_model, dtype=rep.dtype, device=rep.device)
        return store[layer]

    for i, col in enumerate(cols):
        src = column_source(rep, index, col, layer=0, pos=0, side="q")
        layer, pos = src["layer"], src["pos"]
        fl = rep.layers[layer] if layer >= 0 else None
        if src["kind"] == "embedding":
            slot(post, -1)[i, pos] = rep.resid0[pos]
        elif src["kind"] == "error":
            slot(post, layer)[i, pos] = fl.error[pos]
        elif src["kind"] == "bias":
            slot(post, layer)[i, pos] = fl.mlp_const[pos]
            slot(attn, layer)[i, pos] = fl.attn_const[pos]
        else:
            slot(post, layer)[i, pos] = rep.coder_weight(layer, "W_dec")[src["feature"]] * _activation(rep, src)
    return post, attn


def _activation(rep: LocalReplacement, src: dict) -> torch.Tensor:
    f = rep.layers[src["layer"]].features
    return f.activation[int(((f.pos == src["pos"]) & (f.feature == src["feature"])).nonzero()[0, 0])]


@torch.no_grad()
def propagate(rep: LocalReplacement, post: dict, attn: dict, layers: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    """Carry batched writes through the frozen linear model (features and error nodes held:
    only attention with its frozen patterns, the residual stream and ``W_skip`` paths move
    them) and return, for each ``layer`` in ``layers``, the batch's contribution to
    ``resid_pre[layer]`` at the listed positions, ``[N, len(positions), d]``."""
    N = next(iter(post.values() or attn.values())).shape[0]
    x = post.get(-1, torch.zeros(N, rep.n_pos, rep.d_model, dtype=rep.dtype, device=rep.device))
    out = {}
    for layer in range(max(layers) + 1):
        if layer in layers:
            out[layer] = x[:, layers[layer]]
        fl = rep.layers[layer]
        a = fl.attention(fl.ln_attn.linear(x), with_bias=False) + attn.get(layer, 0)
        mid = x if fl.parallel else x + a
        x = mid + (a if fl.parallel else 0) + post.get(layer, 0)
        if fl.W_skip is not None:
            x = x + fl.ln_mlp.linear(mid) @ fl.W_skip
    return out


@torch.no_grad()
def qk_attributions(rep: LocalReplacement, triples: list[tuple[int, int, int, int]], *, candidates: int = 16,
                    index: SourceIndex | None = None, batch_size: int = 64) -> list[QKAttribution]:
    """QK attribution of many ``(layer, head, q, k)`` at once, for about ``2 + 2 * candidates``
    attribution rows each instead of ``2 * d_head``.

    Each side's terms summed over the other side (the marginals) come exactly, for every
    source, from one attribution row per side (the read ``scale * K . dQ/dx``). The vectors
    ``Q_s``, ``K_t`` of each side's ``candidates`` sources of largest ``|marginal|`` come from
    carrying their writes forward through the frozen model (:func:`propagate`), all heads'
    candidates in one batch; their pair terms are exact. The pairs between other sources are
    not enumerated (their total is the score minus the candidate block).

    Raises:
        QKError: a layer, head or position is out of range, or ``k > q``.
    """
    rep.require_per_layer("QK attribution")
    index = index or SourceIndex(rep)
    T = rep.n_pos
    maps: dict[int, HeadQK] = {}
    specs = []
    for layer, head, q, k in triples:
        q, k = (q + T if q < 0 else q), (k + T if k < 0 else k)
        if layer not in maps:
            maps[layer] = HeadQK(rep, layer)
        m = maps[layer]
        m.check(head, q, k)
        specs.append((layer, head, q, k, m.side(head, q, "q"), m.side(head, k, "k")))
    # One row per side: the marginals.
    reads = []
    for layer, _h, _q, _k, qs, ks in specs:
        sc = maps[layer].scale
        reads.append(Read(("post", layer - 1), qs.grad(T, sc * ks.vec), 0.0, 0.0))
        reads.append(Read(("post", layer - 1), ks.grad(T, sc * qs.vec), 0.0, 0.0))
    order = sorted(range(len(reads)), key=lambda i: reads[i].site[1])  # similar depths share a sweep
    rows = torch.empty(len(reads), index.n_cols, dtype=rep.dtype, device=rep.device)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        rows[chunk] = attribution_rows(rep, [reads[j] for j in chunk], index)
    # Candidates of every head, carried forward together.
    picks = []
    for j, (layer, _h, _q, _k, qs, ks) in enumerate(specs):
        sc = maps[layer].scale
        q_marg = torch.cat([rows[2 * j], (sc * qs.const @ ks.vec)[None]])
        k_marg = torch.cat([rows[2 * j + 1], (sc * ks.const @ qs.vec)[None]])
        top = lambda marg: marg[:-1].abs().topk(min(candidates, index.n_cols)).indices
        picks.append((q_marg, k_marg, top(q_marg), top(k_marg)))
    union = sorted({int(c) for _, _, a, b in picks for c in torch.cat([a, b]).tolist()})
    need: dict[int, set[int]] = {}
    for layer, _h, q, k, _qs, _ks in specs:
        need.setdefault(layer, set()).update((q, k))
    need_l = {layer: sorted(p) for layer, p in need.items()}
    contrib = propagate(rep, *column_writes(rep, index, union), need_l) if union else {}
    col_row = {c: i for i, c in enumerate(union)}
    out = []
    def vectors(layer: int, cols: torch.Tensor, side: SideMap, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        cols = cols.sort().values
        at = contrib[layer][[col_row[int(c)] for c in cols], need_l[layer].index(pos)]  # [n, d]
        vec = side.at(at)  # [n, d_head]
        return torch.cat([cols, torch.tensor([index.n_cols], device=cols.device)]), torch.cat([vec, side.const[None]])

    for (layer, head, q, k, qs, ks), (q_marg, k_marg, qc, kc) in zip(specs, picks):
        q_cols, query = vectors(layer, qc, qs, q)
        k_cols, key = vectors(layer, kc, ks, k)
        out.append(QKAttribution(layer, head, q, k, maps[layer].scale, maps[layer].softcap, query, key, qs.vec, ks.vec,
                                 float(rep.layers[layer].pattern[head, q, k]), q_cols, k_cols, q_marg, k_marg))
    return out


# ----------------------------------------------------------------------------- naming sources
def column_source(rep: LocalReplacement, index: SourceIndex, col: int, *, layer: int, pos: int, side: str) -> dict:
    """What column ``col`` of a QK side stands for: ``{"kind", "layer", "pos", "feature"}``
    (``kind`` one of embedding, bias, error, feature, or ``head_bias``: the head's own constant at
    ``layer``, ``pos``, with ``side`` ``q`` or ``k``)."""
    T = index.n_pos
    if col == index.n_cols:
        return {"kind": "head_bias", "layer": layer, "pos": pos, "feature": -1, "side": side}
    if col < index.bias0:
        return {"kind": "embedding", "layer": -1, "pos": col, "feature": -1}
    if col < index.feature0:
        kind = "bias" if col < index.error0 else "error"
        rel = col - (index.bias0 if kind == "bias" else index.error0)
        return {"kind": kind, "layer": rel // T, "pos": rel % T, "feature": -1}
    for lyr in range(index.n_layers):
        sl = index.features(lyr)
        if sl.start <= col < sl.stop:
            f = rep.layers[lyr].features
            j = col - sl.start
            return {"kind": "feature", "layer": lyr, "pos": int(f.pos[j]), "feature": int(f.feature[j])}
    raise IndexError(f"column {col} is outside the {index.n_cols} sources")


def column_positions(rep: LocalReplacement, index: SourceIndex) -> torch.Tensor:
    """``[n_cols + 1]`` the prompt position of each source column (the last, a side's own
    constant, gets -1)."""
    T, L = index.n_pos, index.n_layers
    parts = [torch.arange(T), torch.arange(T).repeat(2 * L)] + [fl.features.pos.cpu() for fl in rep.layers]
    return torch.cat(parts + [torch.tensor([-1])])


def position_terms(a: QKAttribution, positions: torch.Tensor) -> dict[str, list[tuple[int, float]]]:
    """Each side's terms summed by source position, largest ``|terms|`` first:
    ``{"query": [(pos, terms)], "key": [...]}`` (the side's own constant at position -1)."""
    out = {}
    for side, marg in (("query", a.query_marginals()), ("key", a.key_marginals())):
        sums = torch.zeros(int(positions.max()) + 2, dtype=marg.dtype).index_add_(0, positions + 1, marg.cpu())
        order = sums.abs().argsort(descending=True)
        out[side] = [(int(p) - 1, float(sums[p])) for p in order.tolist() if float(sums[p]) != 0.0]
    return out


def source_label(src: dict, token_strs: list[str] | None = None) -> str:
    """``L3 f901 @pos4``, ``err L3 @pos4``, ``bias L3 @pos4``, ``emb 'x' @pos4``, ``b_Q L20 @pos9``
    (:func:`~.graph.source_name`, plus a side's own constant)."""
    if src["kind"] == "head_bias":
        return f"b_{src.get('side', 'q').upper()} L{src['layer']} @pos{src['pos']}"
    return source_name(src["kind"], src["layer"], src["pos"], src.get("feature", -1), token_strs)


@torch.no_grad()
def side_heads(rep: LocalReplacement, a: QKAttribution, writes: list[tuple[int, int, torch.Tensor]], side: str) -> list[list]:
    """How sources reach one side of a head: each source's terms on ``side`` (``"q"`` or
    ``"k"``), split by the first component that carries its write there
    (:func:`~.heads.split_write`): the residual stream at its own position, a skip path, or head
    ``L.H`` moving it from its position towards the query or key position -- e.g. the
    previous-token head that brings an earlier token's feature to an induction head's key.

    Args:
        writes: per source ``(layer, pos, write [d])``: what it writes into ``resid_post[layer]``
            at ``pos`` (layer -1: the embeddings); all share one backward sweep.

    Returns:
        per source, :class:`~.heads.EdgeComponent` list, largest first; its weights sum to the
        source's terms on that side (its entry of :meth:`QKAttribution.query_marginals` /
        ``key_marginals``).
    """
    from .heads import split_write

    maps = HeadQK(rep, a.layer)
    pos, other = (a.q, a.K) if side == "q" else (a.k, a.Q)
    s = maps.side(a.head, pos, side)
    read = Read(("post", a.layer - 1), s.grad(rep.n_pos, a.scale * other), 0.0, 0.0)
    record: dict = {}
    attribution_rows(rep, [read], SourceIndex(rep), record=record)
    G_attn = {m: g[0] for m, g in record.get("attn", {}).items()}
    G_post = {m: g[0] for m, g in record.get("post", {}).items()}
    cache: dict = {}
    return [split_write(rep, read, G_attn, G_post, layer, p, w, cache=cache) for layer, p, w in writes]
