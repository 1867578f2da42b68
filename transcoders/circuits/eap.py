"""Edge attribution patching with integrated gradients (EAP-IG) over the components of the
original model, and exact evaluation of edge circuits by patching.

The component graph (Hanna, Pezzelle & Belinkov 2024, "Have Faith in Faithfulness: Going Beyond
Circuit Overlap When Finding Model Mechanisms", arXiv 2403.17806; the graph of their EAP-IG code
and of MIB's circuit track, Mueller et al. 2025, arXiv 2504.13151):

- *sources* (what writes into the residual stream): the input (``resid_pre[0]``: token plus
  position embeddings, as block 0 sees them), every attention head's output
  ``z_h W_O[h]`` (``T x d_model``; the output bias ``b_O`` is a constant of every run and no
  node), and every MLP's output (what it adds to the residual stream);
- *receivers* (what reads it): each query head's query input, each key/value head's key and
  value inputs (grouped-query attention shares them), each MLP's input, and the logits (the
  final norm's input);
- an *edge* ``u -> v`` for every source upstream of a receiver (for GPT-NeoX's parallel blocks,
  a layer's heads are not upstream of its own MLP). Edges carry whole ``T x d_model`` writes:
  they are not split by position.

Evaluating an edge circuit ``C`` (a set of edges): every receiver ``v`` reads
``sum_{u -> v in C} out_u + sum_{u -> v not in C} abl_u (+ constants)``, where ``out_u`` is the
source's output *in this patched run* (so changes propagate along circuit edges) and ``abl_u``
its output on the counterfactual prompt (or its mean over reference text). The model's residual
stream at ``v`` is ``sum_u out_u + constants``, so the patched input is computed as that
residual minus ``sum_{u -> v not in C} (out_u - abl_u)``: with every edge in ``C`` the run is the
clean model exactly; with none, every receiver reads the counterfactual residual, so the run is
the counterfactual model (up to rounding). Per-head query/key/value inputs are made by running
the layer's projection modules on the pre-attention norm of each head's own input and keeping
that head's slice of the output (:meth:`~transcoders.models.adapters.ModelAdapter.attention_io`).

Scores (EAP-IG, Hanna et al. 2024, eq. for EAP-IG): for an edge ``u -> v``,
``(out_u(clean) - abl_u) . (1/m) sum_{k=1..m} dM/d(input_v)`` evaluated with the input node
interpolated to ``abl_input + (k/m)(clean_input - abl_input)`` (the model otherwise run
normally). It estimates how much the metric ``M`` *drops* when the edge is ablated: positive
scores support the target (MIB attributes with the metric's loss ``-M``, the same ordering).
``m = 1`` is plain edge attribution patching (the gradient at the clean run). The reference
code (hannamw/EAP-IG) sums ``k = 0..m-1`` (a left Riemann sum); we follow the paper's
``k = 1..m``. MIB's default is ``m = 5``.

Families: those whose attention output is a sum of per-head writes (Llama, Mistral, Qwen2,
GPT-2, GPT-NeoX). Gemma 2/3 normalise the summed attention output (``post_attention_layernorm``),
so heads do not write separately; they raise :class:`ComponentError`.

Everything runs one prompt at a time (batch 1) in the model's dtype; use float64 for exactness
checks. Nothing here is specific to a family: modules come from the adapter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from ..models.adapters import ModelAdapter
from .targets import Target, TargetError


class ComponentError(ValueError):
    """The model's attention cannot be split into per-head writes, or inputs do not fit."""


# ------------------------------------------------------------------------------------ shared
def _first(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs["hidden_states"] if "hidden_states" in kwargs else next(iter(kwargs.values()))


def _with_first(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the first tensor argument (as :func:`_first` finds it) replaced."""
    if args:
        return (new, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, {**kwargs, key: new}


def uncapped_logits(adapter: ModelAdapter, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` with Gemma 2's final soft-cap undone (the logits targets are defined on)."""
    cap = getattr(adapter.config, "final_logit_softcapping", None)
    if not cap:
        return logits
    return cap * torch.atanh((logits / cap).clamp(-1 + 1e-7, 1 - 1e-7))


def check_logit_targets(targets: Sequence[Target]) -> None:
    """Raise :class:`~transcoders.circuits.targets.TargetError` unless every target is read from
    the logits (the baselines patch the original model, which has no transcoder inputs)."""
    if not targets:
        raise TargetError("no targets: give at least one")
    for t in targets:
        if t.kind in ("feature", "direction"):
            raise TargetError(f"target {t.label or t.kind!r} is a {t.kind} target; the faithfulness benchmark needs "
                              "targets on the logits (logit:, rawlogit:, diff:, group:)")


def task_metric(targets: Sequence[Target], logits: torch.Tensor) -> torch.Tensor:
    """The metric ``M``: the targets' values on ``logits [T, vocab]`` (before any soft-cap),
    averaged with the targets' weights; a 0-dim float64 tensor, differentiable in ``logits``.

    Raises:
        TargetError: no targets, a target not read from the logits, or weights summing to 0.
    """
    check_logit_targets(targets)
    w = torch.tensor([float(t.weight) for t in targets], dtype=torch.float64, device=logits.device)
    if float(w.sum()) == 0:
        raise TargetError("the targets' weights sum to zero")
    vals = torch.stack([t.value(logits, dtype=torch.float64) for t in targets])
    return (w * vals).sum() / w.sum()


@contextmanager
def block0_input(adapter: ModelAdapter, *, replace: torch.Tensor | None = None, record: list | None = None):
    """Within the block, block 0's input (``resid_pre[0]``, ``[1, T, d]``) is replaced by
    ``replace [T, d]`` (if given) and appended to ``record`` as ``[T, d]`` (if given)."""

    def fn(_module, args, kwargs):
        x = _first(args, kwargs)
        if replace is not None:
            x = replace[None].to(device=x.device, dtype=x.dtype)
            args, kwargs = _with_first(args, kwargs, x)
        if record is not None:
            record.append(x[0])
        return (args, kwargs) if replace is not None else None

    handle = adapter.layers()[0].register_forward_pre_hook(fn, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def embeddings_in(adapter: ModelAdapter, tokens: torch.Tensor) -> torch.Tensor:
    """``[T, d]``: what block 0 reads on ``tokens [T]`` (the input node's output)."""
    rec: list = []
    with block0_input(adapter, record=rec):
        adapter.model(input_ids=torch.as_tensor(tokens, dtype=torch.long).flatten()[None].to(adapter.device))
    return rec[0]


def fraction_sizes(fractions: Iterable[float], n: int) -> list[int]:
    """``[int(f * n)]`` for each fraction, as MIB counts circuit sizes (floor; a tiny epsilon
    absorbs float error so that ``0.29 * 100`` gives 29).

    Raises:
        ValueError: a fraction outside ``(0, 1]``.
    """
    out = []
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"fractions must be in (0, 1], got {f}")
        out.append(min(n, int(math.floor(f * n + 1e-9))))
    return out


# ------------------------------------------------------------------------------------ layout
class ComponentLayout:
    """Indexing of sources, receivers and edges (module docstring).

    Sources: ``0`` = input; layer ``l`` head ``h`` = ``1 + l (H + 1) + h``; layer ``l``'s MLP =
    ``1 + l (H + 1) + H``. Receivers, per layer ``l`` (``R = H + 2 n_kv + 1`` each): query heads
    ``l R + h``, key heads ``l R + H + g``, value heads ``l R + H + n_kv + g``, the MLP
    ``l R + H + 2 n_kv``; the logits ``L R``.

    Attributes:
        real: ``[n_sources, n_receivers]`` bool, the edges of the graph.
    """

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int, parallel: Sequence[bool]):
        self.n_layers, self.n_heads, self.n_kv = n_layers, n_heads, n_kv_heads
        self.parallel = list(parallel)
        self.per_layer = n_heads + 2 * n_kv_heads + 1
        self.n_sources = 1 + n_layers * (n_heads + 1)
        self.n_receivers = n_layers * self.per_layer + 1
        self.prefix = torch.empty(self.n_receivers, dtype=torch.long)
        for layer in range(n_layers):
            base = layer * self.per_layer
            self.prefix[base : base + n_heads + 2 * n_kv_heads] = self.layer_start(layer)
            self.prefix[self.mlp_receiver(layer)] = self.layer_start(layer) + (0 if self.parallel[layer] else n_heads)
        self.prefix[self.logits_receiver] = self.n_sources
        self.real = torch.arange(self.n_sources)[:, None] < self.prefix[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.real.sum())

    def layer_start(self, layer: int) -> int:
        """Index of layer ``layer``'s first head source (= number of sources before the layer)."""
        return 1 + layer * (self.n_heads + 1)

    def head_source(self, layer: int, head: int) -> int:
        return self.layer_start(layer) + head

    def mlp_source(self, layer: int) -> int:
        return self.layer_start(layer) + self.n_heads

    def receiver(self, layer: int, kind: str, head: int) -> int:
        """Receiver index of query head ``head`` (``kind`` ``q``) or key/value head (``k``, ``v``)."""
        base = layer * self.per_layer
        if kind == "q":
            return base + head
        if kind == "k":
            return base + self.n_heads + head
        if kind == "v":
            return base + self.n_heads + self.n_kv + head
        raise ValueError(f"kind must be q, k or v, got {kind!r}")

    def mlp_receiver(self, layer: int) -> int:
        return layer * self.per_layer + self.n_heads + 2 * self.n_kv

    @property
    def logits_receiver(self) -> int:
        return self.n_layers * self.per_layer

    def source_labels(self) -> list[str]:
        out = ["input"]
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return out

    def receiver_labels(self) -> list[str]:
        out = []
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}<q>" for h in range(self.n_heads)]
            out += [f"a{layer}.g{g}<{kind}>" for kind in "kv" for g in range(self.n_kv)]
            out.append(f"m{layer}")
        return out + ["logits"]


# ------------------------------------------------------------------------------------ runner
@dataclass
class ComponentRun:
    """One run: ``logits [T, vocab]`` (before any soft-cap) and ``outputs [n_sources, T, d]``
    (every source's write in this run; detached unless the run tracked gradients)."""

    logits: torch.Tensor
    outputs: torch.Tensor


class ComponentRunner:
    """Runs the original model with per-edge patching (module docstring).

    Args:
        adapter: the model's adapter (a family whose attention heads write separately).

    Raises:
        ComponentError: the attention output is normalised after the heads are summed (Gemma 2/3).
    """

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        L = adapter.n_layers
        internals = [adapter.block_internals(layer) for layer in range(L)]
        if any(bi.attn_out_norm is not None for bi in internals):
            raise ComponentError(
                f"{adapter.family} normalises each layer's summed attention output (post_attention_layernorm), so "
                "its heads do not write into the residual stream separately; EAP over heads supports Llama, Mistral, "
                "Qwen2, GPT-2 and GPT-NeoX (leave eap-ig out: --methods features,neurons)")
        ov = internals[0].ov
        self.layout = ComponentLayout(L, ov.n_heads, ov.n_kv_heads, [bi.parallel for bi in internals])
        self.ln_attn = [bi.ln_attn.module for bi in internals]
        self.ln_mlp = [bi.ln_mlp.module for bi in internals]
        self.W_O = [bi.ov.W_O for bi in internals]  # [H, d_head, d]
        self.io = [adapter.attention_io(layer) for layer in range(L)]
        self.final_norm = adapter.final_norm().module

    @property
    def n_sources(self) -> int:
        return self.layout.n_sources

    @property
    def n_receivers(self) -> int:
        return self.layout.n_receivers

    def run(self, tokens: torch.Tensor, *, keep: torch.Tensor | None = None, ablated: torch.Tensor | None = None,
            deltas: torch.Tensor | None = None, resid0: torch.Tensor | None = None) -> ComponentRun:
        """One forward pass of the model on ``tokens [T]``.

        Args:
            keep: ``[n_sources, n_receivers]`` bool, the circuit's edges (entries of non-edges are
                ignored); None: every edge (the plain model).
            ablated: ``[n_sources, T, d]``, what each source sends along edges outside ``keep``
                (needed when ``keep`` leaves any edge out).
            deltas: ``[n_receivers, T, d]`` added to every receiver's input (zeros that require grad
                give ``dM/d(input_v)`` by autograd); every receiver's input is then recomputed.
            resid0: ``[T, d]`` replaces the input node's output (the embeddings), as IG interpolates it.

        Raises:
            ComponentError: ``ablated`` is missing or does not fit, or a module ran out of order.
        """
        ad, lay = self.adapter, self.layout
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        T, d = tokens.numel(), ad.d_model
        if keep is not None and bool((~keep & lay.real).any()):
            if ablated is None or tuple(ablated.shape) != (lay.n_sources, T, d):
                raise ComponentError(f"patching needs `ablated` of shape {(lay.n_sources, T, d)}, got "
                                     f"{None if ablated is None else tuple(ablated.shape)}")
        else:
            keep = None  # nothing is left out: the plain model
        outs: list[torch.Tensor] = []
        state: dict = {}

        def patched(x: torch.Tensor, recv: list[int]) -> tuple[torch.Tensor, list[int]]:
            """The inputs ``[n, T, d]`` of those receivers in ``recv`` (all with the same sources
            upstream) that differ from ``x [T, d]``, and their indices in ``recv``."""
            n = int(lay.prefix[recv[0]])
            drop = None if keep is None else ~keep[:n, recv]  # [n_upstream, len(recv)]
            if deltas is not None:
                need = list(range(len(recv)))
            elif drop is not None:
                need = [i for i in range(len(recv)) if bool(drop[:, i].any())]
            else:
                need = []
            if not need:
                return x[:0], []
            X = x.expand(len(need), *x.shape)
            if drop is not None and bool(drop[:, need].any()):
                if len(outs) < n:
                    raise ComponentError(f"receiver {recv[0]} ran before its sources ({len(outs)} of {n} seen)")
                if deltas is None:  # no gradients through the sources: keep their differences in one buffer
                    if "diff" not in state:
                        state["diff"], state["filled"] = ablated.to(device=x.device, dtype=x.dtype).clone(), 0
                    buf, done = state["diff"], state["filled"]
                    if done < n:
                        buf[done:n] = torch.stack(outs[done:n]).detach() - buf[done:n]
                        state["filled"] = n
                    diff = buf[:n]
                else:
                    diff = torch.stack(outs[:n]) - ablated[:n].to(device=x.device, dtype=x.dtype)
                w = drop[:, need].to(device=x.device, dtype=x.dtype).T  # [len(need), n]
                X = X - (w @ diff.reshape(n, -1)).view(len(need), *x.shape)
            if deltas is not None:
                X = X + deltas[[recv[i] for i in need]].to(x.dtype)
            return X, need

        def ln_attn_pre(_module, args, kwargs):
            state["x"] = _first(args, kwargs)[0]

        def qkv_hook(layer, entries):
            recv = [lay.receiver(layer, kind, head) for kind, head, _ in entries]
            ln = self.ln_attn[layer]

            def fn(module, _args, out):
                X, need = patched(state["x"], recv)
                if not need:
                    return None
                Y = module.forward(ln.forward(X))  # [n, T, out]
                new = out.clone()
                for j, i in enumerate(need):
                    sl = entries[i][2]
                    new[0, :, sl] = Y[j, :, sl]
                return new

            return fn

        def out_proj_pre(layer):
            def fn(_module, args, kwargs):
                z = _first(args, kwargs)[0]  # [T, H * d_head]
                W_O = self.W_O[layer].to(device=z.device, dtype=z.dtype)
                H, dh, _ = W_O.shape
                if len(outs) != lay.layer_start(layer):
                    raise ComponentError(f"layer {layer}'s heads ran out of order")
                outs.extend(torch.einsum("the,hed->htd", z.reshape(T, H, dh), W_O).unbind(0))

            return fn

        def ln_mlp_pre(layer):
            r = lay.mlp_receiver(layer)

            def fn(_module, args, kwargs):
                x = _first(args, kwargs)[0]
                X, need = patched(x, [r])
                if not need:
                    return None
                return _with_first(args, kwargs, X[0][None])

            return fn

        def mlp_out(layer, _x, out):
            if len(outs) != lay.mlp_source(layer):
                raise ComponentError(f"layer {layer}'s MLP ran out of order")
            outs.append(out[0])

        def final_pre(_module, args, kwargs):
            X, need = patched(_first(args, kwargs)[0], [lay.logits_receiver])
            if not need:
                return None
            return _with_first(args, kwargs, X[0][None])

        with ExitStack() as stack:
            stack.enter_context(block0_input(ad, replace=resid0, record=outs))
            handles = []
            stack.callback(lambda: [h.remove() for h in handles])
            for layer, io in enumerate(self.io):
                handles.append(self.ln_attn[layer].register_forward_pre_hook(ln_attn_pre, with_kwargs=True))
                for module, entries in io.qkv:
                    handles.append(module.register_forward_hook(qkv_hook(layer, entries)))
                handles.append(io.out_proj.register_forward_pre_hook(out_proj_pre(layer), with_kwargs=True))
                handles.append(self.ln_mlp[layer].register_forward_pre_hook(ln_mlp_pre(layer), with_kwargs=True))
            handles.append(self.final_norm.register_forward_pre_hook(final_pre, with_kwargs=True))
            stack.enter_context(ad.hook_mlps(range(lay.n_layers), on_output=mlp_out))
            logits = ad.model(input_ids=tokens[None].to(ad.device)).logits[0]
        if len(outs) != lay.n_sources:
            raise ComponentError(f"saw {len(outs)} source outputs, expected {lay.n_sources}")
        return ComponentRun(uncapped_logits(ad, logits), torch.stack(outs))

    @torch.no_grad()
    def outputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[n_sources, T, d]``: every source's output on ``tokens [T]`` in the plain model."""
        return self.run(tokens).outputs

    @torch.no_grad()
    def mean_outputs(self, contexts: Iterable[torch.Tensor], *, skip_first: bool = True) -> torch.Tensor:
        """``[n_sources, d]``: each source's output averaged over every position of ``contexts``
        (token id tensors ``[ctx]``, or the rows of a ``[n, ctx]`` tensor), leaving out each
        context's first position (the attention sink) with ``skip_first``.

        Raises:
            ValueError: no positions to average over.
        """
        total, count = None, 0
        start = 1 if skip_first else 0
        for ctx in contexts:
            o = self.outputs(ctx)[:, start:].double()
            total = o.sum(1) if total is None else total + o.sum(1)
            count += o.shape[1]
        if not count:
            raise ValueError("no reference positions to average over: give longer or more contexts")
        return (total / count).to(self.adapter.dtype)


# ------------------------------------------------------------------------------------ scores
def ablated_outputs(clean: torch.Tensor, reference: torch.Tensor, keep_positions: Sequence[int] = ()) -> torch.Tensor:
    """``[n_sources, T, d]`` ablation values: ``reference`` (the counterfactual run's outputs
    ``[n_sources, T, d]``, or means ``[n_sources, d]`` broadcast over positions), except at
    ``keep_positions``, where the clean outputs ``clean [n_sources, T, d]`` are kept."""
    abl = reference[:, None, :].expand_as(clean).clone() if reference.dim() == 2 else reference.clone()
    if tuple(abl.shape) != tuple(clean.shape):
        raise ComponentError(f"the ablation values have shape {tuple(abl.shape)} but the clean run's outputs "
                             f"{tuple(clean.shape)}: the counterfactual prompt must have as many tokens as the prompt")
    for p in keep_positions:
        abl[:, p] = clean[:, p]
    return abl


def eap_ig_scores(runner: ComponentRunner, tokens: torch.Tensor, targets: Sequence[Target], ablated: torch.Tensor,
                  *, steps: int = 5, clean: torch.Tensor | None = None) -> torch.Tensor:
    """EAP-IG edge scores (module docstring) on one prompt.

    Args:
        tokens: ``[T]`` the prompt.
        targets: what the metric reads (:func:`task_metric`).
        ablated: ``[n_sources, T, d]`` ablation values (:func:`ablated_outputs`); ``ablated[0]``
            is the IG baseline of the input node.
        steps: ``m``, the number of interpolation steps (1: plain edge attribution patching).
        clean: the clean outputs if already computed.

    Returns:
        ``[n_sources, n_receivers]`` float64, the estimated drop of the metric (its units, e.g.
        nats) when each edge alone is ablated; zero where there is no edge.

    Raises:
        ValueError: ``steps < 1``.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    lay = runner.layout
    clean = runner.outputs(tokens) if clean is None else clean
    base = ablated[0]
    grads = torch.zeros(lay.n_receivers, *clean.shape[1:], dtype=torch.float64, device=clean.device)
    for k in range(1, steps + 1):
        resid0 = None if k == steps else base + (k / steps) * (clean[0] - base)
        deltas = torch.zeros(lay.n_receivers, *clean.shape[1:], dtype=clean.dtype, device=clean.device,
                             requires_grad=True)
        with torch.enable_grad():
            m = task_metric(targets, runner.run(tokens, deltas=deltas, resid0=resid0).logits)
            (g,) = torch.autograd.grad(m, deltas)
        grads += g.double()
    grads /= steps
    scores = torch.einsum("std,rtd->sr", (clean - ablated).double(), grads)
    return scores.masked_fill(~lay.real.to(scores.device), 0.0).cpu()


def top_edges(scores: torch.Tensor, real: torch.Tensor, n: int, *, absolute: bool = False) -> torch.Tensor:
    """``[n_sources, n_receivers]`` bool: the ``n`` real edges with the highest score (``|score|``
    with ``absolute``), ties broken by index (MIB's ``apply_topn``, without its pruning of dangling
    edges, which does not change what a patched run computes)."""
    s = scores.abs() if absolute else scores.clone()
    s = s.double().masked_fill(~real, -math.inf).flatten()
    keep = torch.zeros(s.numel(), dtype=torch.bool)
    keep[s.argsort(descending=True, stable=True)[: min(n, int(real.sum()))]] = True
    return keep.view_as(real)


@torch.no_grad()
def edge_circuit_values(runner: ComponentRunner, tokens: torch.Tensor, targets: Sequence[Target],
                        ablated: torch.Tensor, scores: torch.Tensor, sizes: Sequence[int], *,
                        absolute: bool = False) -> tuple[float, float, list[float]]:
    """The metric with every edge (the model), with none (every receiver reads the ablated
    sources) and with the top ``n`` edges for each ``n`` in ``sizes``.

    Returns:
        ``(m_full, m_empty, [m(C_n)])`` in the metric's units.
    """
    real = runner.layout.real
    m = lambda keep: float(task_metric(targets, runner.run(tokens, keep=keep, ablated=ablated).logits))
    full = m(None)
    empty = m(torch.zeros_like(real))
    return full, empty, [m(top_edges(scores, real, n, absolute=absolute)) for n in sizes]
