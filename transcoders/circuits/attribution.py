"""Attribution graphs: exact direct effects between nodes of the local replacement model.

The edge from source ``s`` (writing vector ``w_s`` into the residual stream at layer ``l``,
position ``q``) to a row node ``t`` (reading the residual stream through a frozen norm along
``r_t``) is ``w_s . G_t[l, q]``, where ``G_t`` is the gradient of ``t`` with respect to the
residual stream in the frozen linear model (Ameisen et al. 2025). For a feature source the
write is ``a_s W_dec[s]``, so the edge factors into the activation ``a_s`` (input-dependent)
and the virtual weight ``W_dec[s] . G_t`` (input-invariant given the frozen patterns; at the
same position with no attention in between it is ``W_dec[s] . (norm^T W_enc[t])``,
Dunefsky et al. 2024).

``G_t`` for a batch of rows comes from one *explicit* backward sweep over the layers (no
autograd): at each block, the transposed frozen attention (per head, grouped-query aware)
and the transposed ``W_skip`` path; features and error nodes do not pass gradient (they are
held). Cost per row is ``O(layers x T x d x (d + d_kv))``; memory is ``O(batch x T x d)`` plus
the sparse rows.

With a node budget, rows are computed for the targets first, then for features in order of
their current influence on the targets (circuit-tracer's scheme), so the budget goes to the
features that matter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .graph import BIAS, EMBEDDING, ERROR, FEATURE, TARGET, Graph
from .replacement import LocalReplacement
from .targets import Target, TargetError


@dataclass
class Read:
    """How a row node reads the model: gradient ``grad [T, d]`` injected at ``site``.

    ``site``: ``("post", l)`` = ``resid_post[l]`` (l = -1: the embeddings; final logits read
    ``resid_post[n_layers - 1]``), or ``("mlp", l)``: the transcoder input of layer ``l``, already
    transposed through its frozen norm (so it is a gradient on the stream the norm reads).
    """

    site: tuple[str, int]
    grad: torch.Tensor
    value: float
    const: float


@dataclass
class Block:
    """Active features of one layer padded by position, for one batched GEMM: the features in
    slots ``[lo, lo + k)`` of the positions ``pos [P_b]`` (ascending) that have that many.
    ``dec [P_b, d, k]`` (decoder rows into one target layer), ``act [P_b, k]``, ``col [P_b, k]``
    (padding points at the spare column ``n_cols``)."""

    pos: torch.Tensor
    dec: torch.Tensor
    act: torch.Tensor
    col: torch.Tensor


class SourceIndex:
    """Column layout of attribution rows: embeddings ``[T]``, bias nodes ``[L*T]``, error nodes
    ``[L*T]``, then every layer's active features in order.

    Also holds, per layer, the active features' decoder rows padded by position in
    :class:`Block` s, so a sweep computes all feature edges of a layer in a few batched GEMMs.
    One block of width ``k_max`` would waste memory when a few positions have many features (a
    JumpReLU set at 1,024 tokens: 14 GB of padding), so the first block is as wide as 90% of the
    positions need and each further one, twice as wide, holds only the positions that overflow:
    the padding stays within about twice the decoder rows themselves. With a cross-layer
    transcoder, :meth:`pair` gives the blocks of a source layer's decoders into a later layer
    (built when a sweep reaches them; only the own-layer ones are kept).
    """

    def __init__(self, rep: LocalReplacement):
        T, L = rep.n_pos, rep.n_layers
        self.n_pos, self.n_layers = T, L
        self.bias0, self.error0, self.feature0 = T, T + L * T, T + 2 * L * T
        sizes = torch.tensor([len(fl.features) for fl in rep.layers])
        self.layer_offset = [self.feature0 + int(x) for x in torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])]
        self.n_cols = self.layer_offset[-1]
        self.n_features = int(sizes.sum())
        self.rep = rep
        self.slots = [self._slots(rep, layer) for layer in range(L)]
        self.padded = [self._pad(rep, layer, layer) for layer in range(L)]
        # Per layer [T, d, 3]: error node, the MLP's constant, attention's constant.
        self.consts = [torch.stack([fl.error, fl.mlp_const, fl.attn_const], dim=-1) for fl in rep.layers]

    def _slots(self, rep: LocalReplacement, layer: int) -> list[tuple]:
        """Per block: ``(pos, rows, slots, features, act, col)``, where the features (indices
        into the layer's active list) sit at ``(rows, slots)`` of the block."""
        f = rep.layers[layer].features
        T, dev = rep.n_pos, rep.device
        counts = torch.bincount(f.pos, minlength=T).cpu()
        order = torch.argsort(f.pos, stable=True)
        pos = f.pos[order].cpu()
        slot = torch.arange(len(f)) - torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)[:-1]])[pos]
        blocks, lo = [], 0
        width = max(1, int(torch.quantile(counts[counts > 0].double(), 0.9))) if len(f) else 1
        while bool((counts > lo).any()):
            k = min(width, int(counts.max()) - lo)
            at = (counts > lo).nonzero().flatten()  # the positions with a feature in slot lo
            row_of = torch.full((T,), -1, dtype=torch.long)
            row_of[at] = torch.arange(len(at))
            inside = (slot >= lo) & (slot < lo + k)
            rows, slots, which = row_of[pos[inside]], slot[inside] - lo, order[inside].cpu()
            act = torch.zeros(len(at), k, dtype=rep.dtype, device=dev)
            col = torch.full((len(at), k), self.n_cols, dtype=torch.long, device=dev)
            act[rows, slots] = f.activation[which.to(dev)]
            col[rows, slots] = self.layer_offset[layer] + which.to(dev)
            blocks.append((at.to(dev), rows, slots, which, act, col))
            lo, width = lo + k, 2 * width
        return blocks

    def _pad(self, rep: LocalReplacement, source: int, target: int) -> list[Block]:
        decoder = rep.decoder(source, target)
        feature = rep.layers[source].features.feature
        out = []
        for at, rows, slots, which, act, col in self.slots[source]:
            dec = torch.zeros(len(at), act.shape[1], rep.d_model, dtype=rep.dtype, device=rep.device)
            dec[rows, slots] = decoder[feature[which.to(feature.device)]]
            out.append(Block(at, dec.transpose(1, 2).contiguous(), act, col))
        return out

    def pair(self, source: int, target: int) -> list[Block]:
        """The :class:`Block` s of layer ``source``'s features writing into ``resid_post[target]``."""
        return self.padded[source] if source == target else self._pad(self.rep, source, target)

    def features(self, layer: int) -> slice:
        return slice(self.layer_offset[layer], self.layer_offset[layer + 1])


def target_read(rep: LocalReplacement, t: Target) -> Read:
    """The :class:`Read` of a target (or of a feature row when ``t.kind == 'feature'``); its
    ``value`` is :meth:`Target.value` on the replacement model's own run.

    Raises:
        TargetError: the position is outside the prompt, or the kind is unknown.
    """
    t = t.resolved(rep.n_pos)
    T, d = rep.n_pos, rep.d_model
    g = torch.zeros(T, d, dtype=rep.dtype, device=rep.device)
    value = float(t.value(rep.logits, mlp_in=[fl.mlp_in for fl in rep.layers], resid_pre=rep.resid_pre, coders=rep.coders))
    if t.kind in ("logit", "logit_diff", "logit_group"):
        # A linear combination of logits: sum_i c_i logit[tokens_i] (minus sum(c) x the mean logit
        # when centred) reads the final stream along sum_i c_i W_U[:, i] (- sum(c) x mean column).
        if t.kind == "logit_group":
            ids, coefs = t.group_weights(device=rep.device, dtype=rep.dtype)
        else:
            ids = torch.tensor([t.token] + ([t.token_b] if t.kind == "logit_diff" else []), device=rep.device)
            coefs = torch.tensor([1.0] + ([-1.0] if t.kind == "logit_diff" else []), dtype=rep.dtype, device=rep.device)
        u = rep.W_U[:, ids] @ coefs
        centered = t.kind != "logit_diff" and t.centered
        if centered:  # the mean logit reads the stream along the mean unembedding column
            u = u - coefs.sum() * rep.W_U_mean
        g[t.pos] = u
        const = 0.0
        if rep.b_U is not None:
            b_U = rep.b_U.to(rep.dtype)
            const += float(b_U[ids] @ coefs)
            if centered:
                const -= float(coefs.sum() * b_U.mean())
        if rep.final_norm.bias is not None:
            const += float(rep.final_norm.bias @ u)
        return Read(("post", rep.n_layers - 1), rep.final_norm.transpose(g), value, const)
    if t.kind == "feature":
        fl = rep.layers[t.layer]
        w = rep.coders[t.layer].W_enc[t.feature].detach().to(rep.device, rep.dtype)
        b = float(rep.coders[t.layer].b_enc.detach()[t.feature])
        g[t.pos] = w
        const = b + (float(fl.ln_mlp.bias @ w) if fl.ln_mlp.bias is not None else 0.0)
        return Read(("mlp", t.layer), fl.ln_mlp.transpose(g), value, const)
    # direction (Target.value has rejected unknown kinds)
    g[t.pos] = t.direction.to(rep.device, rep.dtype)
    return Read(("post", t.layer - 1), g, value, 0.0)


@torch.no_grad()
def attribution_rows(rep: LocalReplacement, reads: list[Read], index: SourceIndex,
                     record: dict | None = None) -> torch.Tensor:
    """Exact direct effects of every source on a batch of row nodes.

    Args:
        reads: ``B`` row reads.
        record: if a dict, filled with the rows' gradients per layer: ``record["post"][l]``
            on ``resid_post[l]`` and ``record["attn"][l]`` where attention ``l`` writes
            (``resid_mid[l]``, or ``resid_post[l]`` for parallel blocks), each ``[B, T, d]``.
    Returns:
        ``[B, index.n_cols]`` edge weights in ``rep.dtype`` (zeros where no path exists).

    Attention is causal, so a read at position ``p`` sees only sources at positions ``<= p``: the
    sweep runs on the prefix of positions up to the batch's last read position (without
    ``record``), which is what sorting rows by position buys on long prompts.
    """
    B, T, d = len(reads), rep.n_pos, rep.d_model
    rows = torch.zeros(B, index.n_cols + 1, dtype=rep.dtype, device=rep.device)  # + a spare column for padding
    # P: the positions the sweep needs (every read's gradient is zero past its own position)
    P = T if record is not None else max(_last_position(r.grad) for r in reads) + 1
    inject: dict[tuple[str, int], list[tuple[int, torch.Tensor]]] = {}
    for b, r in enumerate(reads):
        inject.setdefault(r.site, []).append((b, r.grad[:P]))
    top = max(r.site[1] for r in reads)
    G = torch.zeros(B, P, d, dtype=rep.dtype, device=rep.device)
    bias_cols = lambda layer: slice(index.bias0 + layer * T, index.bias0 + layer * T + P)
    for layer in range(top, -1, -1):
        fl = rep.layers[layer]
        for b, g in inject.get(("post", layer), ()):
            G[b] += g
        if record is not None:
            record.setdefault("post", {})[layer] = G.clone()
        Gt = G.transpose(0, 1)  # [T, B, d]
        # Sources writing resid_post[layer]: features (one batched GEMM over positions per source
        # layer: just this one, or every earlier one for a CLT), error nodes and the constants.
        for src in rep.write_sources(layer):
            for blk in index.pair(src, layer) if len(rep.layers[src].features) else ():
                n = int(torch.searchsorted(blk.pos, P)) if P < T else len(blk.pos)  # positions < P
                if n == 0:
                    continue
                contiguous = int(blk.pos[n - 1]) == n - 1  # positions 0..n-1: a view, no gather
                Gb = Gt[:n] if contiguous else Gt[blk.pos[:n]]
                w = torch.bmm(Gb, blk.dec[:n]) * blk.act[:n, None, :]  # [n, B, k]
                rows.index_add_(1, blk.col[:n].flatten(), w.permute(1, 0, 2).reshape(B, -1))
        c = torch.bmm(Gt, index.consts[layer][:P])  # [P, B, 3]: error, MLP constant, attention constant
        rows[:, index.error0 + layer * T : index.error0 + layer * T + P] = c[..., 0].T
        bias = c[..., 1].T
        # What the MLP reads (the skip path and feature rows of this layer).
        G_mlp = None
        if fl.W_skip is not None:
            G_mlp = fl.ln_mlp.transpose(G @ fl.W_skip.T)
        for b, g in inject.get(("mlp", layer), ()):
            G_mlp = torch.zeros_like(G) if G_mlp is None else G_mlp
            G_mlp[b] += g
        if fl.parallel or G_mlp is None:
            bias = bias + c[..., 2].T
        if fl.parallel:
            if record is not None:
                record.setdefault("attn", {})[layer] = G.clone()
            G = G + fl.attention_transpose(G) + (0 if G_mlp is None else G_mlp)
        else:
            if G_mlp is not None:
                G = G + G_mlp
                bias = bias + torch.bmm(G.transpose(0, 1), fl.attn_const[:P, :, None])[..., 0].T
            if record is not None:
                record.setdefault("attn", {})[layer] = G.clone()
            G = G + fl.attention_transpose(G)
        rows[:, bias_cols(layer)] = bias
    for b, g in inject.get(("post", -1), ()):
        G[b] += g
    rows[:, :P] = torch.bmm(G.transpose(0, 1), rep.resid0[:P, :, None])[..., 0].T
    return rows[:, : index.n_cols]


def _last_position(grad: torch.Tensor) -> int:
    """The last position where ``grad [T, d]`` is non-zero (0 if none)."""
    nz = grad.abs().amax(-1).nonzero()
    return int(nz.max()) if nz.numel() else 0


def row_read(rep: LocalReplacement, graph: Graph, node: int) -> Read:
    """The :class:`Read` of a graph's row node (a target, or a feature's pre-activation)."""
    return target_read(rep, graph.row_target(node))


def feature_read(rep: LocalReplacement, layer: int, j: int) -> Read:
    """The read of the ``j``-th active feature of ``layer`` (its pre-activation)."""
    f = rep.layers[layer].features
    return target_read(rep, Target("feature", int(f.pos[j]), layer=layer, feature=int(f.feature[j])))


def _influence(rows: dict[int, tuple[torch.Tensor, torch.Tensor]], target_rows: torch.Tensor, weights: torch.Tensor,
               index: SourceIndex) -> torch.Tensor:
    """Influence of every column on the weighted targets through the rows computed so far,
    on the row-normalised absolute adjacency (circuit-tracer's measure): the sum over paths of
    every length, ``w A + w A^2 + ...``.

    ``rows``: column -> sparse row ``(indices, values)``. A feature row's entries point only at
    earlier layers' columns (a feature reads the stream before its own MLP writes), so the rows
    taken from the last layer down form a topological order: one pass, each layer's rows
    scattering their entries times their (by then complete) influence with ``index_add_``. The
    adjacency is never formed, and the temporaries (:data:`INFLUENCE_BYTES` per entry) exist for
    one layer's rows at a time, which bounds memory on long
    prompts.
    """
    t = target_rows.abs().double()
    total = weights.double() @ (t / t.sum(-1, keepdim=True).clamp_min(1e-30))
    if not rows:
        return total
    cols = torch.tensor(sorted(rows), dtype=torch.long)  # feature columns are laid out layer by layer
    layer = torch.searchsorted(torch.tensor(index.layer_offset[1:]), cols, right=True)
    for lay in layer.unique(sorted=True).flip(0).tolist():
        group = cols[layer == lay]
        parts = [rows[int(c)] for c in group]
        counts = torch.tensor([idx.numel() for idx, _ in parts], dtype=torch.long)
        vals = torch.cat([v for _, v in parts]).abs().double()
        r_idx = torch.repeat_interleave(torch.arange(len(group)), counts)
        share = total[group] / torch.zeros(len(group), dtype=torch.float64).index_add_(0, r_idx, vals).clamp_min(1e-30)
        total.index_add_(0, torch.cat([idx for idx, _ in parts]), vals * share[r_idx])
    return total


ROUND_ROWS = 256  # feature rows between influence updates (a node budget picks each round by influence)
NONZERO_ROWS = 8  # rows whose non-zeros are gathered at once
# Memory accounting of ``max_memory`` (bytes per stored row entry, measured from the code paths):
INFLUENCE_BYTES = 36  # while one layer's rows scatter: values, row index, shares, product, columns
ASSEMBLY_BYTES = 64  # per edge kept: assembling the graph (lists, concatenation), then influence and pruning on it
SWEEP_TD_COPIES = 12  # [B, T, d] buffers a sweep holds at once (gradients, attention transposes)
HEADROOM = 0.95  # share of max_memory the projection may reach
NONZERO_BYTES = 20  # per entry of the rows whose non-zeros are gathered at once (two int64 indices, a value)


class AttributionMemoryError(ValueError):
    """``max_memory`` leaves too little room for even one attribution row."""


class _MemoryBudget:
    """What attribution holds against ``max_memory`` (see :func:`attribute`): the resident memory
    at the start, one sweep's buffers, the stored rows, and the larger of the influence and
    assembly temporaries, estimated from the rows stored so far."""

    def __init__(self, max_memory: float, rep: LocalReplacement, index: SourceIndex, batch_size: int, budget: int):
        from ..hardware import resident_bytes

        # 5% headroom: freed memory the allocator keeps, and what the estimates miss
        self.limit, self.base = HEADROOM * float(max_memory), float(resident_bytes() or 0)
        isz = torch.empty(0, dtype=rep.dtype).element_size()
        self.row_bytes = 4 + isz  # int32 column + value
        # per row of a sweep: its row of edges and its [T, d] buffers; per sweep: the non-zero gather
        per_row_sweep = (index.n_cols + 1) * isz + rep.n_pos * rep.d_model * isz * SWEEP_TD_COPIES
        fixed = NONZERO_ROWS * (index.n_cols + 1) * NONZERO_BYTES
        room = self.limit - self.base - fixed
        if room < per_row_sweep:
            gib = 2**30
            raise AttributionMemoryError(
                f"max_memory {max_memory / gib:.2f} GiB leaves {max(self.limit - self.base, 0) / gib:.2f} GiB beyond what "
                f"this process already holds ({self.base / gib:.2f} GiB: model, transcoders, replacement state), but one "
                f"attribution row needs {(fixed + per_row_sweep) / gib:.3f} GiB; raise --max-memory")
        self.batch = max(1, min(batch_size, int(room / 4 / per_row_sweep)))  # a sweep takes at most a quarter
        self.sweep = fixed + self.batch * per_row_sweep
        self.keep_share = budget / max(index.n_features, 1)  # expected share of feature entries kept as edges
        self.feature0 = index.feature0
        self.stored = self.kept = 0.0
        self.by_layer: dict[int, float] = {}
        self.n_rows = self.max_row = 0

    def add(self, layer: int, cols: torch.Tensor) -> None:
        n = cols.numel()
        fixed = int((cols < self.feature0).sum())  # embeddings, biases, errors: always edges of the graph
        self.stored += n
        self.kept += fixed + (n - fixed) * self.keep_share
        self.by_layer[layer] = self.by_layer.get(layer, 0) + n
        self.n_rows += 1
        self.max_row = max(self.max_row, n)

    def projected(self, stored: float, group: float, kept: float) -> float:
        return self.base + self.sweep + stored * self.row_bytes + max(group * INFLUENCE_BYTES, kept * ASSEMBLY_BYTES)

    def rows_that_fit(self, layers: list[int], first_row_entries: float) -> int:
        """How many of the next rows (of these ``layers``, in the order they would be computed)
        keep the projected peak within the limit."""
        per = self.max_row if self.n_rows else first_row_entries  # the largest row so far: rows grow with depth
        if self.stored:
            keep = self.kept / self.stored
        else:  # before any row: its non-feature columns are kept, its feature columns at the budget's share
            fixed = min(per, self.feature0)
            keep = (fixed + (per - fixed) * self.keep_share) / max(per, 1.0)

        def group(n: int) -> float:  # the largest layer's entries after n more rows
            new: dict[int, int] = {}
            for layer in layers[:n]:
                new[layer] = new.get(layer, 0) + 1
            return max([self.by_layer.get(lay, 0) + c * per for lay, c in new.items()] + list(self.by_layer.values()),
                       default=0.0)

        lo, hi = 0, len(layers)
        while lo < hi:  # the projection grows with n: bisect
            n = (lo + hi + 1) // 2
            if self.projected(self.stored + n * per, group(n), self.kept + n * per * keep) <= self.limit:
                lo = n
            else:
                hi = n - 1
        return lo


def attribute(
    rep: LocalReplacement,
    targets: list[Target],
    *,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    max_memory: float | None = None,
) -> Graph:
    """Compute the attribution graph of ``targets`` on the prompt of ``rep``.

    Args:
        rep: the local replacement model of the prompt.
        targets: what to explain; positions may be negative.
        max_feature_nodes: feature budget (None: every active feature). Features are chosen by
            influence on the targets, recomputed after each round of rows.
        batch_size: rows per backward sweep.
        progress: called after each sweep with ``(feature rows done, feature rows planned)``.
        max_memory: bytes this process may hold while attributing (None: no limit). Counted:
            the resident memory when attribution starts (model, transcoders, replacement state;
            read from ``/proc/self/statm``, else taken as 0), one sweep's buffers, the stored
            rows (8 bytes per non-zero in float32) and the larger of the influence and assembly
            temporaries (influence and pruning on the graph included), estimated from the rows so
            far. The batch shrinks so a sweep takes at most a quarter of the room, and feature rows
            stop before the estimate would pass 95% of the limit: the graph then has fewer feature
            nodes than the budget (still exact), and ``meta["memory_limited"]`` is True.

    Returns:
        a :class:`Graph` with exact edges among its nodes; ``meta`` holds timings (s), the
        number of active features and rows computed, and ``max_memory``, ``memory_limited``,
        ``batch_size`` and ``memory_estimate_bytes`` (the projected peak).

    Raises:
        TargetError: a target is out of range.
        AttributionMemoryError: ``max_memory`` is below what the process holds plus one row.
    """
    t0 = time.perf_counter()
    targets = [t.resolved(rep.n_pos) for t in targets]
    if not targets:
        raise TargetError("no targets: give at least one")
    index = SourceIndex(rep)
    budget = index.n_features if max_feature_nodes is None else min(max_feature_nodes, index.n_features)
    memory = None if max_memory is None else _MemoryBudget(max_memory, rep, index, batch_size, budget)
    if memory is not None:
        batch_size = memory.batch
    t_reads = [target_read(rep, t) for t in targets]
    target_rows = torch.cat([attribution_rows(rep, t_reads[i : i + batch_size], index)
                             for i in range(0, len(t_reads), batch_size)])
    weights = torch.tensor([t.weight for t in targets], dtype=torch.float64)
    weights = weights / weights.sum()

    # Feature columns -> (layer, j).
    layer_of = torch.cat([torch.full((len(fl.features),), layer) for layer, fl in enumerate(rep.layers)]).long()
    j_of = torch.cat([torch.arange(len(fl.features)) for fl in rep.layers]).long()
    pos_of = torch.cat([fl.features.pos.cpu() for fl in rep.layers]).long()
    feat_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # column -> sparse row (indices, values)
    reads_meta: dict[int, tuple[float, float]] = {}  # column -> (value, const) of its row
    round_size = max(batch_size, ROUND_ROWS if budget < index.n_features else index.n_features)
    done = torch.zeros(index.n_features, dtype=torch.bool)  # features whose row is computed
    limited = False  # stopped to stay within max_memory
    while len(feat_rows) < budget:
        if budget == index.n_features:
            order = torch.arange(index.n_features)
        else:
            infl = _influence(feat_rows, target_rows, weights, index)[index.feature0 :]
            order = infl.argsort(descending=True)
            order = order[infl[order] > 0]
        todo = order[~done[order]][: min(round_size, budget - len(feat_rows))].tolist()
        if memory is not None:
            fit = memory.rows_that_fit([int(layer_of[c]) for c in todo], float((target_rows != 0).sum(-1).max()))
            limited = bool(todo) and fit == 0  # each round refits with what the rows so far measured
            todo = todo[:fit]
        if not todo:
            break
        # similar layers share a sweep's depth, similar positions its prefix of positions
        todo.sort(key=lambda c: (int(layer_of[c]), int(pos_of[c])))
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            reads = [feature_read(rep, int(layer_of[c]), int(j_of[c])) for c in chunk]
            rows = attribution_rows(rep, reads, index)
            # int32 column indices and no injected gradient kept: memory per row is 8 bytes per
            # nonzero (rows are dense in earlier sources, so this dominates long prompts). A few
            # rows at a time: one nonzero() per row is slow, one per batch holds 20 bytes per
            # entry of the whole batch at once.
            for g in range(0, len(chunk), NONZERO_ROWS):
                part = rows[g : g + NONZERO_ROWS]
                r_idx, c_idx = part.nonzero(as_tuple=True)
                counts = torch.bincount(r_idx, minlength=len(part)).tolist()
                for c, r, nz, vals in zip(chunk[g : g + NONZERO_ROWS], reads[g : g + NONZERO_ROWS],
                                          c_idx.to(torch.int32).split(counts), part[r_idx, c_idx].split(counts)):
                    feat_rows[index.feature0 + c] = (nz, vals)
                    reads_meta[index.feature0 + c] = (r.value, r.const)
                    if memory is not None:
                        memory.add(int(layer_of[c]), nz)
                del r_idx, c_idx
            done[chunk] = True
            if progress is not None:
                progress(len(feat_rows), budget)
    t_rows = time.perf_counter()
    graph = _assemble(rep, targets, t_reads, target_rows, feat_rows, reads_meta, index, layer_of, j_of)
    graph.meta.update(
        n_active_features=index.n_features, feature_rows=len(feat_rows), max_feature_nodes=max_feature_nodes,
        seconds_rows=t_rows - t0, seconds_total=time.perf_counter() - t0, dtype=str(rep.dtype).replace("torch.", ""),
        batch_size=batch_size,
    )
    if memory is not None:
        graph.meta.update(max_memory=float(max_memory), memory_limited=limited,
                          memory_estimate_bytes=memory.projected(memory.stored, max(memory.by_layer.values(), default=0),
                                                                 memory.kept))
    return graph


def _assemble(rep, targets, t_reads, target_rows, feat_rows, reads_meta, index, layer_of, j_of) -> Graph:
    T, L = rep.n_pos, rep.n_layers
    feat_cols = sorted(feat_rows)
    # Graph node order: embeddings, biases, errors, chosen features, targets.
    src_cols = list(range(index.feature0)) + feat_cols
    col_to_node = torch.full((index.n_cols,), -1, dtype=torch.long)
    col_to_node[torch.tensor(src_cols, dtype=torch.long)] = torch.arange(len(src_cols))
    n_src, n_t = len(src_cols), len(targets)
    N = n_src + n_t

    kind = torch.empty(N, dtype=torch.long)
    layer = torch.empty(N, dtype=torch.long)
    pos = torch.empty(N, dtype=torch.long)
    feature = torch.full((N,), -1, dtype=torch.long)
    activation = torch.zeros(N, dtype=torch.float64)
    ar = torch.arange(T)
    kind[:T], layer[:T], pos[:T] = EMBEDDING, -1, ar
    activation[:T] = rep.resid0.norm(dim=-1).double().cpu()
    for k0, code in ((index.bias0, BIAS), (index.error0, ERROR)):
        kind[k0 : k0 + L * T] = code
        layer[k0 : k0 + L * T] = torch.arange(L).repeat_interleave(T)
        pos[k0 : k0 + L * T] = ar.repeat(L)
    for l_, fl in enumerate(rep.layers):
        activation[index.error0 + l_ * T : index.error0 + (l_ + 1) * T] = fl.error.norm(dim=-1).double().cpu()
        bias_vec = fl.mlp_const + fl.attn_const
        activation[index.bias0 + l_ * T : index.bias0 + (l_ + 1) * T] = bias_vec.norm(dim=-1).double().cpu()
    for n_i, c in enumerate(feat_cols, start=index.feature0):
        fi = c - index.feature0
        l_, j = int(layer_of[fi]), int(j_of[fi])
        f = rep.layers[l_].features
        kind[n_i], layer[n_i], pos[n_i], feature[n_i] = FEATURE, l_, int(f.pos[j]), int(f.feature[j])
        activation[n_i] = float(f.activation[j])
    tnodes = torch.arange(n_src, N)
    for i, t in enumerate(targets):
        kind[n_src + i], pos[n_src + i] = TARGET, t.pos
        layer[n_src + i] = t.layer if t.kind in ("feature", "direction") else L
        feature[n_src + i] = t.feature if t.kind == "feature" else -1
        activation[n_src + i] = t_reads[i].value

    value = torch.full((N,), float("nan"), dtype=torch.float64)
    const = torch.full((N,), float("nan"), dtype=torch.float64)
    dropped = torch.full((N,), float("nan"), dtype=torch.float64)
    srcs, dsts, ws = [], [], []
    keep = col_to_node >= 0
    row_items = []
    for i in range(n_t):
        nz = target_rows[i].nonzero().flatten()
        row_items.append((n_src + i, nz, target_rows[i][nz], (t_reads[i].value, t_reads[i].const)))
    row_items += [(int(col_to_node[c]), *feat_rows[c], reads_meta[c]) for c in feat_cols]
    for node, nz, vals, (row_value, row_const) in row_items:
        nz = nz.long()
        inside = keep[nz]
        srcs.append(col_to_node[nz[inside]])
        dsts.append(torch.full((int(inside.sum()),), node, dtype=torch.long))
        ws.append(vals[inside])
        value[node], const[node] = row_value, row_const
        dropped[node] = float(vals[~inside].double().sum())
    return Graph(
        tokens=[int(x) for x in rep.tokens], token_strs=_token_strs(rep), n_layers=L,
        kind=kind, layer=layer, pos=pos, feature=feature, activation=activation,
        value=value, const=const, dropped=dropped,
        edge_src=torch.cat(srcs), edge_dst=torch.cat(dsts), edge_weight=torch.cat(ws),
        targets=targets, target_nodes=tnodes,
        meta={"model": getattr(rep.adapter.model.config, "_name_or_path", ""), "n_layers": L, "d_model": rep.d_model},
    )


def _token_strs(rep: LocalReplacement) -> list[str]:
    tok = getattr(rep, "tokenizer", None)
    if tok is None:
        return [f"#{int(t)}" for t in rep.tokens]
    return [tok.decode([int(t)]) for t in rep.tokens]
