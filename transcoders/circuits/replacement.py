"""The local replacement model of one prompt.

Following Ameisen et al. (2025, "Circuit Tracing: Revealing Computational Graphs in Language
Models") and Dunefsky, Chlenski & Nanda (2024, arXiv 2406.11944): every MLP is replaced by its
transcoder plus an *error node* ``MLP output - transcoder output`` per layer and position;
attention patterns and norm denominators are frozen at their values on the prompt. Holding
feature activations and error nodes fixed, the residual stream is then a *linear* function of
whatever is written into it, so the direct effect of any source on any target is exact and
computable by one linear backward sweep (see :mod:`.attribution`).

Conventions (``T`` prompt positions, ``d`` = d_model, ``L`` layers):

- ``resid_pre[l]``: block ``l``'s input; ``resid_pre[0]`` is the embedding output (token plus
  position embeddings, Gemma's scale included); ``resid_post[l] = resid_pre[l + 1]``.
- Attention of block ``l`` writes into ``resid_mid[l]`` (or straight into ``resid_post[l]`` for
  GPT-NeoX's parallel blocks, whose MLP reads ``resid_pre[l]``).
- Features, error nodes and the transcoder's constant (``b_dec``) of layer ``l`` write into
  ``resid_post[l]``. A skip transcoder's ``W_skip`` path is linear and is *not* a node: effects
  flow through it.
- With a cross-layer transcoder (:class:`~transcoders.coders.clt.CrossLayerTranscoder`) a
  layer-``l`` feature writes into ``resid_post[t]`` for every ``t >= l`` (through
  ``W_dec[l][:, t - l]``); layer ``t``'s error node is its MLP output minus everything the CLT
  writes there (Ameisen et al. 2025, Sec. 2.2).

Everything is computed in ``dtype`` (float64 for exact checks, float32 for speed).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..coders.clt import CrossLayerTranscoder, require_per_layer
from ..coders.coder import SparseCoder
from ..models.adapters import BlockInternals, ModelAdapter, NormSpec


class ReplacementError(ValueError):
    """The coders do not fit the model, or the prompt does not fit the context."""


@dataclass
class FrozenNorm:
    """A norm with its denominator frozen on the prompt: ``y = P(x) / denom * weight (+ bias)``."""

    kind: str
    weight: torch.Tensor  # [d]
    bias: torch.Tensor | None  # [d]
    denom: torch.Tensor  # [T]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """The linear part ``[..., T, d] -> [..., T, d]`` (no bias)."""
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        return x / self.denom[:, None] * self.weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y if self.bias is None else y + self.bias

    def transpose(self, g: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`linear`: maps a gradient ``[..., P, d]`` on the output to one on the
        input, for the first ``P <= T`` positions."""
        return self._center(g * self.weight / self.denom[: g.shape[-2], None])

    def transpose_at(self, g: torch.Tensor, pos: int) -> torch.Tensor:
        """:meth:`transpose` for gradients ``g [..., d]`` at the one position ``pos``."""
        return self._center(g * self.weight / self.denom[pos])

    def _center(self, g: torch.Tensor) -> torch.Tensor:
        # the centring projection is symmetric
        return g - g.mean(-1, keepdim=True) if self.kind == "layernorm" else g


@dataclass
class ActiveFeatures:
    """The active features of one layer: ``pos [n]``, ``feature [n]``, ``activation [n]`` and
    ``pre_act [n]`` (pre-activations, in the coder's input units)."""

    pos: torch.Tensor
    feature: torch.Tensor
    activation: torch.Tensor
    pre_act: torch.Tensor

    def __len__(self) -> int:
        return int(self.pos.numel())


@dataclass
class FrozenLayer:
    """One block of the local replacement model, frozen on the prompt."""

    ln_attn: FrozenNorm
    ln_mlp: FrozenNorm  # stream -> transcoder input (identity for a CLT that reads resid_mid)
    attn_out_norm: FrozenNorm | None
    W_V: torch.Tensor  # [n_kv, d, d_head]
    b_V: torch.Tensor | None  # [n_kv, d_head]
    W_O: torch.Tensor  # [H, d_head, d]
    b_O: torch.Tensor | None  # [d]
    pattern: torch.Tensor  # [H, T, T], rows = destination positions
    parallel: bool
    coder: SparseCoder
    W_skip: torch.Tensor | None  # [d, d] in dtype
    mlp_out: torch.Tensor  # [T, d]: the real MLP's write into the residual
    mlp_in: torch.Tensor = None  # [T, d]: recomputed input of the transcoder
    features: ActiveFeatures = None
    error: torch.Tensor = None  # [T, d]
    attn_const: torch.Tensor = None  # [T, d]: what attention writes with a zero input
    mlp_const: torch.Tensor = None  # [T, d]: b_dec (+ ln bias @ W_skip; + features at constant positions)
    folded: ActiveFeatures = None  # the active features at constant positions (their writes are in mlp_const)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin) [T, rotary dims] the attention was called with

    @property
    def group(self) -> int:
        return self.W_O.shape[0] // self.W_V.shape[0]

    def attention(self, x_normed: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """Frozen attention ``[..., T, d] -> [..., T, d]`` on an already-normalised input."""
        v = torch.einsum("...td,gde->...gte", x_normed, self.W_V)
        if with_bias and self.b_V is not None:
            v = v + self.b_V[:, None, :]
        v = v.repeat_interleave(self.group, dim=-3)  # [..., H, T, d_head]
        z = torch.einsum("hts,...hse->...hte", self.pattern, v)
        out = torch.einsum("...hte,hed->...td", z, self.W_O)
        if with_bias and self.b_O is not None:
            out = out + self.b_O
        if self.attn_out_norm is not None:
            out = self.attn_out_norm(out) if with_bias else self.attn_out_norm.linear(out)
        return out

    def attention_transpose(self, g: torch.Tensor) -> torch.Tensor:
        """Adjoint of ``x -> attention(ln_attn.linear(x))`` for gradients ``g [B, P, d]`` on the
        first ``P <= T`` positions (attention is causal, so they need no later position).

        Written as three GEMMs (``W_O``, the frozen patterns, ``W_V``) on flattened heads,
        which is what makes attribution fast on CPU."""
        if self.attn_out_norm is not None:
            g = self.attn_out_norm.transpose(g)
        B, T, d = g.shape
        H, E, _ = self.W_O.shape
        n_kv = self.W_V.shape[0]
        gz = (g.reshape(B * T, d) @ self.W_O.reshape(H * E, d).T).view(B, T, H, E)
        # gv[b, h, s, e] = sum_t pattern[h, t, s] gz[b, t, h, e]
        gz = gz.permute(2, 1, 0, 3).reshape(H, T, B * E)
        gv = torch.bmm(self.pattern[:, :T, :T].transpose(1, 2), gz).view(n_kv, self.group, T, B, E).sum(1)  # [g, S, B, E]
        gv = gv.permute(2, 1, 0, 3).reshape(B * T, n_kv * E)
        W_V = self.W_V.permute(0, 2, 1).reshape(n_kv * E, d)
        return self.ln_attn.transpose((gv @ W_V).view(B, T, d))

    def skip(self, x_normed: torch.Tensor) -> torch.Tensor | None:
        return None if self.W_skip is None else x_normed @ self.W_skip


@contextmanager
def _eager_attention(model: torch.nn.Module):
    """Run attention eagerly so attention modules return their patterns."""
    previous = getattr(model.config, "_attn_implementation", None)
    if previous == "eager" or previous is None:
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _first_tensor(args, kwargs):
    if args:
        return args[0]
    return kwargs.get("hidden_states", next(iter(kwargs.values())))


@torch.no_grad()
def _capture(adapter: ModelAdapter, tokens: torch.Tensor, internals: list[BlockInternals]) -> dict:
    """One forward pass of the real model, recording what the replacement model freezes."""
    rec: dict = {"norm_in": {}, "pattern": {}, "mlp_out": {}, "rope": {}}
    handles = []

    def pre(key):
        def fn(_module, args, kwargs):
            rec["norm_in"][key] = _first_tensor(args, kwargs)[0]

        return fn

    def attn_hook(layer):
        def fn(_module, _args, output):
            if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
                raise ReplacementError("the attention module returned no pattern; eager attention is required")
            rec["pattern"][layer] = output[1][0]

        return fn

    def rope_hook(layer):
        def fn(_module, _args, kwargs):
            cos_sin = kwargs.get("position_embeddings")
            if cos_sin is not None:  # rotary families: (cos, sin) [batch, T, rotary dims]
                rec["rope"][layer] = (cos_sin[0][0], cos_sin[1][0])

        return fn

    def mlp_out(layer, _x, out):
        rec["mlp_out"][layer] = out[0]

    def resid0(_module, args, kwargs):
        rec["resid0"] = _first_tensor(args, kwargs)[0]

    try:
        handles.append(adapter.layers()[0].register_forward_pre_hook(resid0, with_kwargs=True))
        for layer, bi in enumerate(internals):
            handles.append(bi.ln_attn.module.register_forward_pre_hook(pre(("attn", layer)), with_kwargs=True))
            handles.append(bi.ln_mlp.module.register_forward_pre_hook(pre(("mlp", layer)), with_kwargs=True))
            if bi.attn_out_norm is not None:
                handles.append(
                    bi.attn_out_norm.module.register_forward_pre_hook(pre(("attn_out", layer)), with_kwargs=True)
                )
            handles.append(bi.attention.register_forward_hook(attn_hook(layer)))
            handles.append(bi.attention.register_forward_pre_hook(rope_hook(layer), with_kwargs=True))
        final = adapter.final_norm()
        handles.append(final.module.register_forward_pre_hook(pre(("final", 0)), with_kwargs=True))
        with _eager_attention(adapter.model), adapter.hook_mlps(range(len(internals)), on_output=mlp_out):
            out = adapter.model(input_ids=tokens[None].to(adapter.device), output_attentions=True)
        rec["logits"] = out.logits[0]
    finally:
        for h in handles:
            h.remove()
    return rec


def bos_constant_positions(adapter: ModelAdapter, tokens: torch.Tensor, tokenizer=None) -> tuple[int, ...]:
    """The positions whose features attribution folds into the bias nodes by default: ``(0,)``
    when the prompt starts with the BOS token, else ``()``.

    A BOS at position 0 sees only itself, so everything there is the same on every prompt (and
    it is the attention sink, whose features circuit-tracer leaves out of graphs too). The BOS
    id is the tokenizer's ``bos_token_id`` when ``tokenizer`` is given, else the model config's
    ``bos_token_id``; with none, nothing is folded. ``transcoders trace`` and
    :class:`LocalReplacement` (``constant_positions=None``) both use this.

    Args:
        adapter: the model's adapter.
        tokens: ``[T]`` prompt token ids.
        tokenizer: the model's tokenizer, or None.
    """
    tokens = torch.as_tensor(tokens).flatten()
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else getattr(adapter.config, "bos_token_id", None)
    if bos is None or tokens.numel() == 0:
        return ()
    ids = {int(b) for b in bos} if isinstance(bos, list | tuple) else {int(bos)}
    return (0,) if int(tokens[0]) in ids else ()


class LocalReplacement:
    """The local replacement model of ``model`` on one prompt (see the module docstring).

    Args:
        adapter: the model's adapter.
        coders: ``{layer: transcoder}`` for *every* layer (transcoders or skip transcoders,
            any activation), or one :class:`~transcoders.coders.clt.CrossLayerTranscoder`
            spanning every layer; the features of all layers become graph nodes.
        tokens: ``[T]`` prompt token ids (include BOS yourself if the model wants one, e.g. with
            :func:`~transcoders.circuits.session.tokenize_prompt`).
        dtype: compute dtype; float64 makes every identity exact to ~1e-12.
        tokenizer: the model's tokenizer (optional): names tokens in graphs, and gives the BOS id.
        constant_positions: positions whose features are folded into the bias nodes. None (the
            default, as ``transcoders trace``): :func:`bos_constant_positions`, i.e. ``(0,)`` when
            the prompt starts with BOS (that position never depends on the prompt), else ``()``.
            Pass ``()`` to keep every position's features as nodes.

    Attributes:
        tokens ``[T]``; ``constant_positions`` (``[n]`` long, the folded positions, sorted);
        ``resid0 [T, d]`` (embedding nodes' writes); ``layers`` (one
        :class:`FrozenLayer` each); ``final_norm``; ``W_U [d, vocab]``, ``b_U``;
        ``model_logits [T, vocab]`` (the real model's, float32) and ``logits`` (recomputed).

    Raises:
        ReplacementError: a layer has no coder, a coder is an SAE or does not match d_model,
            a CLT spans another number of layers or reads ``resid_mid`` of a parallel block,
            or the prompt is empty or longer than the model's context, or a constant position is
            outside the prompt.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        coders: dict[int, SparseCoder] | CrossLayerTranscoder,
        tokens: torch.Tensor,
        *,
        dtype: torch.dtype = torch.float32,
        tokenizer=None,
        constant_positions: tuple[int, ...] | None = None,
    ):
        self.clt = coders if isinstance(coders, CrossLayerTranscoder) else None
        if self.clt is not None:
            self.clt.check_fits(adapter.n_layers, adapter.d_model, ReplacementError)
            coders = self.clt.layer_coders()
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        if tokens.numel() == 0:
            raise ReplacementError("the prompt is empty; pass at least one token")
        if tokens.numel() > adapter.max_context:
            raise ReplacementError(
                f"the prompt has {tokens.numel()} tokens but the model's context is {adapter.max_context}; "
                "shorten the prompt"
            )
        n = adapter.n_layers
        missing = [layer for layer in range(n) if layer not in coders]
        if missing:
            raise ReplacementError(
                f"attribution needs a transcoder for every layer; missing layers {missing}. "
                "Train them with `transcoders train --layers all`."
            )
        for layer, coder in coders.items():
            if coder.cfg.kind == "sae":
                raise ReplacementError(f"layer {layer}'s coder is an SAE; attribution needs transcoders")
            if coder.cfg.d_in != adapter.d_model or coder.cfg.d_out != adapter.d_model:
                raise ReplacementError(
                    f"layer {layer}'s coder maps {coder.cfg.d_in} -> {coder.cfg.d_out} but the model's d_model is "
                    f"{adapter.d_model}; these coders belong to another model"
                )
        self.adapter, self.coders, self.dtype, self.tokens = adapter, coders, dtype, tokens
        self.tokenizer = tokenizer
        if constant_positions is None:
            constant_positions = bos_constant_positions(adapter, tokens, tokenizer)
        T = tokens.numel()
        constant_positions = sorted({int(p) + T if int(p) < 0 else int(p) for p in constant_positions})
        if any(not 0 <= p < T for p in constant_positions):
            raise ReplacementError(f"constant_positions {constant_positions} reach outside the {T}-token prompt")
        self.constant_positions = torch.tensor(sorted(constant_positions), dtype=torch.long, device=adapter.device)
        self.device = adapter.device
        internals = [adapter.block_internals(layer) for layer in range(n)]
        rec = _capture(adapter, tokens, internals)
        cast = lambda t: None if t is None else t.to(device=self.device, dtype=dtype)

        def frozen(spec: NormSpec, key) -> FrozenNorm:
            return FrozenNorm(spec.kind, cast(spec.weight), cast(spec.bias), spec.denom(cast(rec["norm_in"][key])))

        reads_stream = self.clt is not None and self.clt.reads == "resid_mid"
        if reads_stream and any(bi.parallel for bi in internals):
            raise ReplacementError("this CLT reads resid_mid, which a parallel block (GPT-NeoX) does not have; "
                                   "use a CLT that reads the MLP input")
        one = torch.ones(tokens.numel(), dtype=dtype, device=self.device)
        identity = FrozenNorm("rmsnorm", torch.ones(adapter.d_model, dtype=dtype, device=self.device), None, one)

        self.resid0 = cast(rec["resid0"])
        self.model_logits = rec["logits"].float()
        self.layers: list[FrozenLayer] = []
        for layer, bi in enumerate(internals):
            coder = coders[layer]
            self.layers.append(
                FrozenLayer(
                    ln_attn=frozen(bi.ln_attn, ("attn", layer)),
                    ln_mlp=identity if reads_stream else frozen(bi.ln_mlp, ("mlp", layer)),
                    attn_out_norm=None if bi.attn_out_norm is None else frozen(bi.attn_out_norm, ("attn_out", layer)),
                    W_V=cast(bi.ov.W_V), b_V=cast(bi.ov.b_V), W_O=cast(bi.ov.W_O), b_O=cast(bi.ov.b_O),
                    pattern=cast(rec["pattern"][layer]), parallel=bi.parallel, coder=coder,
                    W_skip=cast(coder.W_skip.detach()) if coder.W_skip is not None else None,
                    mlp_out=cast(rec["mlp_out"][layer]),
                    rope=tuple(cast(t) for t in rec["rope"][layer]) if layer in rec["rope"] else None,
                )
            )
        self.final_norm = frozen(adapter.final_norm(), ("final", 0))
        # Gemma 2 soft-caps the final logits; logit targets are the logits before the cap.
        self.softcap = getattr(adapter.config, "final_logit_softcapping", None)
        W_U, b_U = adapter.unembed()
        self.W_U, self.b_U = cast(W_U), cast(b_U)
        self.W_U_mean = self.W_U.mean(1)  # [d]: how the mean logit reads the final stream (centred targets)
        self._build()

    # ------------------------------------------------------------------ construction
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_pos(self) -> int:
        return int(self.tokens.numel())

    @property
    def d_model(self) -> int:
        return int(self.resid0.shape[-1])

    def coder_weight(self, layer: int, name: str) -> torch.Tensor:
        return getattr(self.coders[layer], name).detach().to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def _encode(self, layer: int, x: torch.Tensor) -> ActiveFeatures:
        coder = self.coders[layer]
        pre = x @ self.coder_weight(layer, "W_enc").T + self.coder_weight(layer, "b_enc")
        act = coder.encode(x.to(coder.W_enc.dtype)).to(self.dtype)
        # Activations of active features equal their pre-activations for every supported
        # activation (ReLU, TopK, JumpReLU); take them from ``pre`` so the identity
        # ``write = act * W_dec`` holds in ``dtype``.
        pos, feat = (act != 0).nonzero(as_tuple=True)
        return ActiveFeatures(pos, feat, pre[pos, feat], pre[pos, feat])

    @torch.no_grad()
    def _build(self) -> None:
        resid = self.resid0
        zeros = torch.zeros_like(resid)
        self.resid_pre = []
        for layer, fl in enumerate(self.layers):
            self.resid_pre.append(resid)
            attn_in = fl.ln_attn(resid)
            attn = fl.attention(attn_in)
            const_in = zeros if fl.ln_attn.bias is None else zeros + fl.ln_attn.bias
            fl.attn_const = fl.attention(const_in)  # biases only: rows of the pattern sum to 1
            mid = resid if fl.parallel else resid + attn
            fl.mlp_in = fl.ln_mlp(mid)
            fl.features = self._encode(layer, fl.mlp_in)
            if self.constant_positions.numel():
                # Everything at these positions is input-independent (e.g. BOS at position 0 sees
                # only itself): their features join the bias nodes instead of spending the
                # feature budget, as circuit-tracer leaves BOS features out.
                f = fl.features
                fixed = torch.isin(f.pos, self.constant_positions)
                fl.features = ActiveFeatures(f.pos[~fixed], f.feature[~fixed], f.activation[~fixed], f.pre_act[~fixed])
                fl.folded = ActiveFeatures(f.pos[fixed], f.feature[fixed], f.activation[fixed], f.pre_act[fixed])
            b_dec = self.coder_weight(layer, "b_dec")
            const_in = fl.ln_mlp.bias
            const = b_dec if (fl.W_skip is None or const_in is None) else b_dec + const_in @ fl.W_skip
            fl.mlp_const = const.expand(self.n_pos, -1).clone()
            recon = b_dec
            for src in self.write_sources(layer):
                folded = self.layers[src].folded
                if folded is not None:
                    folded_write = self.write(src, layer, folded)
                    fl.mlp_const += folded_write
                    recon = recon + folded_write
                recon = recon + self.write(src, layer, self.layers[src].features)
            if fl.W_skip is not None:
                recon = recon + fl.mlp_in @ fl.W_skip
            fl.error = fl.mlp_out - recon
            resid = mid + fl.mlp_out + (attn if fl.parallel else 0)
        self.resid_final = resid
        self.resid_pre.append(resid)
        self.logits = self.unembed(resid)

    def feature_write(self, layer: int, activation: torch.Tensor | None = None) -> torch.Tensor:
        """``[T, d]``: what layer ``layer``'s active features write into ``resid_post[layer]``
        (``sum_i a_i W_dec[i]`` per position), with ``activation [n]`` replacing the held
        activations if given. A CLT's features also write into later layers: :meth:`write`."""
        return self.write(layer, layer, self.layers[layer].features, activation)

    def write(self, source: int, target: int, feats: ActiveFeatures, activation: torch.Tensor | None = None) -> torch.Tensor:
        """``[T, d]``: what the features ``feats`` of layer ``source`` write into
        ``resid_post[target]``, with activations ``activation [n]`` (default: theirs)."""
        a = feats.activation if activation is None else activation
        out = torch.zeros(self.n_pos, self.d_model, dtype=self.dtype, device=self.device)
        return out.index_add_(0, feats.pos, a[:, None] * self.decoder(source, target)[feats.feature])

    def decoder(self, source: int, target: int) -> torch.Tensor:
        """``[d_sae, d]`` in ``dtype``: how layer ``source``'s features write into
        ``resid_post[target]`` (a per-layer transcoder writes only into its own layer).

        Raises:
            ValueError: ``target`` is not one of :meth:`write_targets` of ``source``.
        """
        if self.clt is not None:
            return self.clt.decoder(source, target).detach().to(device=self.device, dtype=self.dtype)
        if target != source:
            raise ValueError(f"a per-layer transcoder's features write only into their own layer ({source}), not {target}")
        return self.coder_weight(source, "W_dec")

    def write_targets(self, source: int) -> range:
        """The layers whose ``resid_post`` layer ``source``'s features write into."""
        return range(source, self.n_layers if self.clt is not None else source + 1)

    def write_sources(self, target: int) -> range:
        """The layers whose features write into ``resid_post[target]``."""
        return range(0 if self.clt is not None else target, target + 1)

    def feature_writes(self, layer: int, feature: int, amount: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{target: [T, d]}``: what feature ``feature`` of ``layer`` writes at activation
        ``amount [T]`` per position, for every layer it writes into."""
        return {t: amount[:, None] * self.decoder(layer, t)[feature] for t in self.write_targets(layer)}

    def require_per_layer(self, what: str) -> None:
        """Raise :class:`ReplacementError` if the features come from a cross-layer transcoder."""
        require_per_layer(self.clt, what, ReplacementError)

    def capped(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the model's final logit soft-cap (Gemma 2), if any, to ``logits``."""
        return logits if not self.softcap else self.softcap * torch.tanh(logits / self.softcap)

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, vocab]`` from a final residual stream ``[T, d]`` (frozen final norm)."""
        logits = self.final_norm(resid) @ self.W_U
        return logits if self.b_U is None else logits + self.b_U

    # ------------------------------------------------------------------ frozen forward
    @torch.no_grad()
    def forward(
        self,
        delta_post: dict[int, torch.Tensor] | None = None,
        delta_attn: dict[int, torch.Tensor] | None = None,
        *,
        features: str = "held",
        pinned: dict[int, torch.Tensor] | None = None,
    ) -> FrozenRun:
        """Run the frozen replacement model with extra writes into the residual stream.

        Args:
            delta_post: ``{layer: [T, d]}`` added to ``resid_post[layer]``; layer ``-1`` adds to
                the embedding output ``resid_pre[0]``.
            delta_attn: ``{layer: [T, d]}`` added to what attention of ``layer`` writes.
            features: ``"held"`` keeps every feature activation and error node fixed (the
                setting in which graph edges are exact direct effects); ``"linear"`` lets each
                active feature's activation move with its pre-activation (active set frozen),
                so effects also flow through other features (graph total effects).
            pinned: ``{layer: bool [n_active]}`` features that stay held in ``"linear"`` mode
                (e.g. the ones being intervened on).

        Returns:
            a :class:`FrozenRun` with every layer's transcoder input and the logits.
        """
        delta_post, delta_attn = delta_post or {}, delta_attn or {}
        resid = self.resid0 + delta_post.get(-1, 0)
        mlp_ins, acts, resid_pre = [], [], []
        pending: dict[int, torch.Tensor] = {}  # linear mode: feature changes written into later layers (CLT)
        for layer, fl in enumerate(self.layers):
            resid_pre.append(resid)
            attn = fl.attention(fl.ln_attn(resid)) + delta_attn.get(layer, 0)
            mid = resid if fl.parallel else resid + attn
            mlp_in = fl.ln_mlp(mid)
            mlp_ins.append(mlp_in)
            write = fl.mlp_out
            if fl.W_skip is not None:
                write = write + (mlp_in - fl.mlp_in) @ fl.W_skip
            a = fl.features.activation
            if features == "linear":
                f = fl.features
                W_enc = self.coder_weight(layer, "W_enc")
                d_pre = ((mlp_in - fl.mlp_in)[f.pos] * W_enc[f.feature]).sum(-1)
                if pinned and layer in pinned:
                    d_pre = d_pre.masked_fill(pinned[layer], 0.0)
                a = a + d_pre
                for t in self.write_targets(layer):
                    pending[t] = pending.get(t, 0) + self.write(layer, t, f, d_pre)
            elif features != "held":
                raise ValueError(f"features must be 'held' or 'linear', got {features!r}")
            write = write + pending.pop(layer, 0)
            acts.append(a)
            resid = mid + write + (attn if fl.parallel else 0) + delta_post.get(layer, 0)
        resid_pre.append(resid)
        return FrozenRun(mlp_ins, acts, resid, self.unembed(resid), resid_pre)


@dataclass
class FrozenRun:
    """The result of :meth:`LocalReplacement.forward`.

    ``mlp_in``: per layer ``[T, d]``; ``activations``: per layer ``[n_active]`` (held or
    linearly updated); ``resid_final [T, d]``; ``logits [T, vocab]`` (before any soft-cap);
    ``resid_pre``: per layer plus the final stream, ``[T, d]`` each.
    """

    mlp_in: list[torch.Tensor]
    activations: list[torch.Tensor]
    resid_final: torch.Tensor
    logits: torch.Tensor
    resid_pre: list[torch.Tensor] = field(default_factory=list)
