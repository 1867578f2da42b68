"""One adapter per model family: where the MLP hookpoints and the internals live.

Everything outside this module is family-agnostic: it asks the adapter for the module whose
*input* is the MLP input (the residual stream after the pre-MLP norm) and the module whose
*output* is what the MLP adds to the residual stream. Hookpoints are named
``layers.{i}.mlp`` for every family, so run folders and configs read the same.

Families:
- ``llama`` (Llama, SmolLM2, Mistral, Qwen2): ``model.layers[i].mlp`` (SwiGLU).
- ``gemma`` (Gemma 1/2/3): as Llama, but Gemma 2/3 normalise the MLP output with
  ``post_feedforward_layernorm`` before adding it; that norm counts as part of the MLP.
- ``gpt2``: ``transformer.h[i].mlp`` after ``ln_2``.
- ``gpt_neox`` (Pythia): ``gpt_neox.layers[i].mlp``; with parallel attention the MLP reads
  the layer input (through ``post_attention_layernorm``), not the attention output.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

InputHook = Callable[[int, torch.Tensor], None]
OutputHook = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def mlp_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The MLP input from the positional and keyword arguments of an :meth:`ModelAdapter.mlp_in_module`
    call: the first positional argument, else ``kwargs["hidden_states"]``, else the first keyword
    argument (every supported family calls ``mlp(hidden_states)`` positionally)."""
    if args:
        return args[0]
    return kwargs["hidden_states"] if "hidden_states" in kwargs else next(iter(kwargs.values()))


class AdapterError(ValueError):
    """The model is not of a supported family, or a layer index is out of range."""


@dataclass
class NormSpec:
    """A pre-norm as circuit analysis sees it: ``y = center?(x) / denom(x) * weight + bias``.

    ``kind`` is ``layernorm`` (centres, ``denom = sqrt(var(x) + eps)``) or ``rmsnorm``
    (``denom = sqrt(mean(x^2) + eps)``). ``weight`` is the effective gain ``[d_model]``
    (Gemma's ``1 + w`` already applied); ``bias`` is ``[d_model]`` or None. Freezing ``denom``
    at its value on a prompt makes the norm linear (Ameisen et al. 2025, "Circuit Tracing").
    """

    module: nn.Module
    kind: Literal["layernorm", "rmsnorm"]
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    def denom(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position denominator ``[...]`` of input ``x [..., d_model]``."""
        if self.kind == "layernorm":
            return (x.var(-1, unbiased=False) + self.eps).sqrt()
        return (x.pow(2).mean(-1) + self.eps).sqrt()


@dataclass
class AttentionOV:
    """One layer's attention value/output weights, split by head.

    ``W_V [n_kv_heads, d_model, d_head]``, ``b_V [n_kv_heads, d_head]`` or None,
    ``W_O [n_heads, d_head, d_model]``, ``b_O [d_model]`` or None. Query head ``h`` reads
    key/value head ``h // (n_heads // n_kv_heads)`` (grouped-query attention). Head ``h``'s
    OV circuit is ``W_V[kv(h)] @ W_O[h]`` ``[d_model, d_model]``.
    """

    W_V: torch.Tensor
    b_V: torch.Tensor | None
    W_O: torch.Tensor
    b_O: torch.Tensor | None

    @property
    def n_heads(self) -> int:
        return self.W_O.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.W_V.shape[0]

    @property
    def d_head(self) -> int:
        return self.W_O.shape[1]

    def kv_head(self, head: int) -> int:
        return head // (self.n_heads // self.n_kv_heads)


def norm_spec(module: nn.Module) -> NormSpec:
    """Describe a LayerNorm or RMSNorm module as a :class:`NormSpec`.

    Raises:
        AdapterError: the module is neither (add its rule here).
    """
    if isinstance(module, nn.LayerNorm):
        d = module.normalized_shape[-1]
        # No affine weight: ones on the CPU (callers move it to their device).
        w = module.weight.detach() if module.weight is not None else torch.ones(d)
        b = module.bias.detach() if module.bias is not None else None
        return NormSpec(module, "layernorm", w, b, float(module.eps))
    name = type(module).__name__
    if "RMSNorm" in name and hasattr(module, "weight"):
        eps = getattr(module, "variance_epsilon", None)
        eps = getattr(module, "eps", None) if eps is None else eps
        w = module.weight.detach()
        if name.startswith("Gemma"):  # Gemma scales by (1 + w)
            w = 1.0 + w
        return NormSpec(module, "rmsnorm", w, None, float(eps))
    raise AdapterError(f"norm module {name} is not a LayerNorm or RMSNorm; describe it in norm_spec()")


@dataclass
class AttentionQK:
    """One layer's attention query/key side, split by head, for QK attribution
    (:mod:`transcoders.circuits.qk`).

    For query head ``h`` at position ``p`` reading the normalised residual ``x``:
    ``Q = rope_p(q_norm(x @ W_Q[h] + b_Q[h]))`` and, for its key/value head ``g = h // (n_heads //
    n_kv_heads)`` at position ``s``, ``K = rope_s(k_norm(x @ W_K[g] + b_K[g]))``; the pre-softmax
    score is ``scale * Q . K``, then ``softcap * tanh(score / softcap)`` when ``softcap`` is set
    (Gemma 2). ``W_Q [n_heads, d_model, d_head]``, ``b_Q [n_heads, d_head]`` or None, ``W_K
    [n_kv_heads, d_model, d_head]``, ``b_K`` likewise; ``q_norm`` / ``k_norm``: per-head RMSNorms
    over ``d_head`` (Gemma 3) or None. Rotary embeddings are not weights: the replacement model
    records the ``(cos, sin)`` each attention module is called with.
    """

    W_Q: torch.Tensor
    b_Q: torch.Tensor | None
    W_K: torch.Tensor
    b_K: torch.Tensor | None
    q_norm: NormSpec | None
    k_norm: NormSpec | None
    scale: float
    softcap: float | None


def _qk_scale(attn: nn.Module, d_head: int) -> float:
    # Every supported family's attention module states its score scale (GPT-2's includes
    # scale_attn_by_inverse_layer_idx; Gemma's is query_pre_attn_scalar ** -0.5).
    scale = getattr(attn, "scaling", None)
    return float(d_head**-0.5 if scale is None else scale)


@dataclass
class BlockInternals:
    """What attribution needs of one transformer block.

    ``ln_attn`` feeds attention; ``ln_mlp`` feeds the MLP (its output is the hookpoint input);
    ``attn_out_norm`` (Gemma 2/3 ``post_attention_layernorm``) normalises the attention output
    before it joins the residual; ``parallel`` means attention and MLP both read the block input
    (GPT-NeoX ``use_parallel_residual``).
    """

    ln_attn: NormSpec
    ln_mlp: NormSpec
    attn_out_norm: NormSpec | None
    ov: AttentionOV
    attention: nn.Module
    parallel: bool


@dataclass
class AttentionIO:
    """Where one layer's attention reads its per-head query/key/value inputs and writes its
    per-head outputs, for component-level patching (:mod:`transcoders.circuits.eap`).

    ``qkv``: ``[(module, [(kind, head, out_slice), ...]), ...]``: each projection module (called
    once per forward pass on the output of the pre-attention norm, ``[batch, pos, d_model]``) with,
    for every slice of its output's last dimension, which input it computes: ``kind`` is ``q``,
    ``k`` or ``v`` and ``head`` a query head (``q``) or key/value head (``k``, ``v``; grouped-query
    attention shares them). ``out_proj``: the module whose first positional input is the heads'
    mixed values ``[batch, pos, n_heads * d_head]``, head-major, so head ``h`` writes
    ``z[..., h*d_head:(h+1)*d_head] @ W_O[h]`` (:class:`AttentionOV`) and the layer writes the sum
    over heads plus ``b_O``.
    """

    qkv: list[tuple[nn.Module, list[tuple[str, int, slice]]]]
    out_proj: nn.Module


def _head_slices(kind: str, n: int, d_head: int, start: int = 0, stride: int | None = None) -> list[tuple[str, int, slice]]:
    stride = d_head if stride is None else stride
    return [(kind, h, slice(start + h * stride, start + h * stride + d_head)) for h in range(n)]


@dataclass
class ModelAdapter:
    """Names the hookpoints and internals of one loaded causal LM.

    Attributes:
        model: the ``*ForCausalLM`` module.
        family: one of ``llama``, ``gemma``, ``gpt2``, ``gpt_neox``.
    """

    model: nn.Module
    family: str

    # --- family-specific paths (overridden per family) -----------------------------------
    def decoder(self) -> nn.Module:
        """The transformer stack without the LM head; called as ``decoder(input_ids)``."""
        raise NotImplementedError

    def layers(self) -> nn.ModuleList:
        """The list of transformer blocks."""
        raise NotImplementedError

    def mlp_in_module(self, layer: int) -> nn.Module:
        """Module whose first positional input is the MLP input ``[batch, pos, d_model]``."""
        return self.layers()[self.check_layer(layer)].mlp

    def mlp_out_module(self, layer: int) -> nn.Module:
        """Module whose output is what the MLP adds to the residual ``[batch, pos, d_model]``."""
        return self.layers()[self.check_layer(layer)].mlp

    def mlp_forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Run the MLP (through to :meth:`mlp_out_module`) on ``x [..., d_model]`` without
        triggering hooks."""
        return self.layers()[self.check_layer(layer)].mlp.forward(x)

    # --- generic ---------------------------------------------------------------------------
    @contextmanager
    def hook_mlps(
        self, layers: Iterable[int], *, on_input: InputHook | None = None, on_output: OutputHook | None = None
    ) -> Iterator[list]:
        """Within the ``with`` block, call back on every forward pass through the MLPs of ``layers``.

        The one place where forward hooks go on MLPs (splicing, harvesting, steering, the local
        replacement model's capture); the hooks are removed on leaving the block, also when it
        raises (including an exception raised by a callback, e.g. to stop the forward pass early).

        Args:
            layers: layer indices (each checked with :meth:`check_layer`).
            on_input: ``on_input(layer, mlp_in)``, called before the MLP runs. ``mlp_in
                [batch, pos, d_model]`` is the MLP input as the MLP sees it: the residual stream
                after the pre-MLP norm (Llama/Gemma ``post_attention_layernorm`` or
                ``pre_feedforward_layernorm``, GPT-2 ``ln_2``, GPT-NeoX ``post_attention_layernorm``),
                taken from the call of :meth:`mlp_in_module` by :func:`mlp_input`. Its return value
                is ignored.
            on_output: ``on_output(layer, mlp_in, mlp_out)``, called after the MLP runs. ``mlp_out
                [batch, pos, d_model]`` is what :meth:`mlp_out_module` returns (the first element if
                it returns a tuple): what the MLP adds to the residual stream (for Gemma 2/3 the
                output *after* ``post_feedforward_layernorm``). ``mlp_in`` is the same call's input
                (as ``on_input`` gets it). Returning a tensor replaces ``mlp_out`` (it must have the
                same shape and is cast to its dtype); returning None keeps it.

        Yields:
            the list of hook handles (removed on exit; callers need not touch them).

        Raises:
            AdapterError: a layer is out of range (no hook is left behind).
            ValueError: ``on_output`` returns a tensor of the wrong shape.

        A callback that runs the hooked MLP itself must call ``mlp.forward(x)`` (or
        :meth:`mlp_forward`), which skips hooks; calling ``mlp(x)`` would re-enter these hooks.
        """
        handles: list = []
        inputs: dict[int, torch.Tensor] = {}

        def pre_hook(layer: int):
            def fn(_module, args, kwargs):
                x = mlp_input(args, kwargs)
                if on_output is not None:
                    inputs[layer] = x
                if on_input is not None:
                    on_input(layer, x)

            return fn

        def out_hook(layer: int, callback: OutputHook):
            def fn(_module, _args, output):
                ref = output[0] if isinstance(output, tuple) else output
                new = callback(layer, inputs.pop(layer), ref)
                if new is None:
                    return None
                if new.shape != ref.shape:
                    raise ValueError(
                        f"the MLP output hook of layer {layer} returned shape {tuple(new.shape)}, expected {tuple(ref.shape)}"
                    )
                new = new.to(ref.dtype)
                return (new, *output[1:]) if isinstance(output, tuple) else new

            return fn

        try:
            for layer in layers:
                layer = self.check_layer(layer)
                if on_input is not None or on_output is not None:
                    handles.append(self.mlp_in_module(layer).register_forward_pre_hook(pre_hook(layer), with_kwargs=True))
                if on_output is not None:
                    handles.append(self.mlp_out_module(layer).register_forward_hook(out_hook(layer, on_output)))
            yield handles
        finally:
            for handle in handles:
                handle.remove()

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return len(self.layers())

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def d_mlp(self) -> int:
        c = self.config
        return int(getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def max_context(self) -> int:
        """Longest prompt in tokens the model accepts."""
        c = self.config
        return int(getattr(c, "max_position_embeddings", None) or c.n_positions)

    def hookpoint(self, layer: int) -> str:
        """The family-independent name of a layer's MLP hookpoint, e.g. ``layers.6.mlp``."""
        return f"layers.{self.check_layer(layer)}.mlp"

    def check_layer(self, layer: int) -> int:
        """Return ``layer`` if it indexes a block; raise :class:`AdapterError` otherwise."""
        n = len(self.layers())
        try:
            layer = operator.index(layer)
        except TypeError:
            raise AdapterError(f"layer must be an integer, got {layer!r}") from None
        if not 0 <= layer < n:
            raise AdapterError(
                f"layer {layer!r} is out of range: this model has {n} layers (0..{n - 1}). "
                f"Pass a layer between 0 and {n - 1}."
            )
        return layer

    # --- circuit-analysis internals (overridden per family) ----------------------------------
    def block_internals(self, layer: int) -> BlockInternals:
        """Norms, attention OV weights and residual layout of block ``layer``."""
        raise NotImplementedError

    def attention_qk(self, layer: int) -> AttentionQK:
        """Per-head query/key weights, norms and score scale of block ``layer``'s attention
        (:class:`AttentionQK`)."""
        raise NotImplementedError

    def attention_io(self, layer: int) -> AttentionIO:
        """Per-head query/key/value projections and the output projection of block ``layer``'s
        attention (:class:`AttentionIO`)."""
        raise NotImplementedError

    def mlp_hidden_module(self, layer: int) -> nn.Module:
        """Module whose first positional input is the MLP's hidden activations ``[batch, pos,
        d_mlp]`` (the neurons: after the nonlinearity, and the gate for gated MLPs, before the
        down projection)."""
        raise NotImplementedError

    def final_norm(self) -> NormSpec:
        """The norm before the unembedding."""
        raise NotImplementedError

    def embed_module(self) -> nn.Module:
        """Token embedding module; its output (times any family scale) enters layer 0."""
        raise NotImplementedError

    def embedding_matrix(self) -> torch.Tensor:
        """``W_E [vocab, d_model]``: each token's embedding as layer 0 sees it (Gemma's
        sqrt(d_model) scale included; GPT-2's position embeddings excluded)."""
        with torch.no_grad():
            ids = torch.arange(self.vocab_size, device=self.device)
            return self.embed_module()(ids).detach()

    def unembed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W_U [d_model, vocab], b_U [vocab] or None)``: logits are ``norm(x) @ W_U + b_U``
        (before any final logit soft-capping, which attribution leaves out)."""
        head = self.model.get_output_embeddings()
        return head.weight.detach().T, (head.bias.detach() if getattr(head, "bias", None) is not None else None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _heads(config) -> tuple[int, int, int]:
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    d_head = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    return n_heads, n_kv, d_head


def _bias(linear) -> torch.Tensor | None:
    return linear.bias.detach() if getattr(linear, "bias", None) is not None else None


class LlamaAdapter(ModelAdapter):
    def decoder(self) -> nn.Module:
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def embed_module(self) -> nn.Module:
        return self.model.model.embed_tokens

    def final_norm(self) -> NormSpec:
        return norm_spec(self.model.model.norm)

    def block_internals(self, layer: int) -> BlockInternals:
        block = self.layers()[self.check_layer(layer)]
        attn = block.self_attn
        n_heads, n_kv, d_head = _heads(self.config)
        d = self.d_model
        W_V = attn.v_proj.weight.detach().view(n_kv, d_head, d).transpose(1, 2)
        b_V = _bias(attn.v_proj)
        W_O = attn.o_proj.weight.detach().view(d, n_heads, d_head).permute(1, 2, 0)
        ov = AttentionOV(W_V, None if b_V is None else b_V.view(n_kv, d_head), W_O, _bias(attn.o_proj))
        if hasattr(block, "pre_feedforward_layernorm"):  # Gemma 2/3 sandwich norms
            ln_mlp, attn_out = block.pre_feedforward_layernorm, norm_spec(block.post_attention_layernorm)
        else:
            ln_mlp, attn_out = block.post_attention_layernorm, None
        return BlockInternals(norm_spec(block.input_layernorm), norm_spec(ln_mlp), attn_out, ov, attn, False)

    def attention_qk(self, layer: int) -> AttentionQK:
        attn = self.layers()[self.check_layer(layer)].self_attn
        n_heads, n_kv, d_head = _heads(self.config)
        d = self.d_model

        def split(linear, n):
            b = _bias(linear)
            return linear.weight.detach().view(n, d_head, d).transpose(1, 2), None if b is None else b.view(n, d_head)

        (W_Q, b_Q), (W_K, b_K) = split(attn.q_proj, n_heads), split(attn.k_proj, n_kv)
        norm = lambda name: norm_spec(getattr(attn, name)) if getattr(attn, name, None) is not None else None
        return AttentionQK(W_Q, b_Q, W_K, b_K, norm("q_norm"), norm("k_norm"), _qk_scale(attn, d_head),
                           getattr(attn, "attn_logit_softcapping", None))

    def attention_io(self, layer: int) -> AttentionIO:
        attn = self.layers()[self.check_layer(layer)].self_attn
        n_heads, n_kv, d_head = _heads(self.config)
        return AttentionIO([(attn.q_proj, _head_slices("q", n_heads, d_head)),
                            (attn.k_proj, _head_slices("k", n_kv, d_head)),
                            (attn.v_proj, _head_slices("v", n_kv, d_head))], attn.o_proj)

    def mlp_hidden_module(self, layer: int) -> nn.Module:
        return self.layers()[self.check_layer(layer)].mlp.down_proj


class GemmaAdapter(LlamaAdapter):
    def mlp_out_module(self, layer: int) -> nn.Module:
        block = self.layers()[self.check_layer(layer)]
        return getattr(block, "post_feedforward_layernorm", None) or block.mlp

    def mlp_forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.layers()[self.check_layer(layer)]
        out = block.mlp.forward(x)
        post = getattr(block, "post_feedforward_layernorm", None)
        return out if post is None else post.forward(out)


class GPT2Adapter(ModelAdapter):
    def decoder(self) -> nn.Module:
        return self.model.transformer

    def layers(self) -> nn.ModuleList:
        return self.model.transformer.h

    @property
    def d_mlp(self) -> int:
        return int(self.config.n_inner or 4 * self.config.n_embd)

    def embed_module(self) -> nn.Module:
        return self.model.transformer.wte

    def final_norm(self) -> NormSpec:
        return norm_spec(self.model.transformer.ln_f)

    def block_internals(self, layer: int) -> BlockInternals:
        block = self.layers()[self.check_layer(layer)]
        attn = block.attn
        d, n_heads = self.d_model, int(self.config.n_head)
        d_head = d // n_heads
        W = attn.c_attn.weight.detach()  # Conv1D: x @ W + b, W [d, 3d] = [q | k | v]
        W_V = W[:, 2 * d :].view(d, n_heads, d_head).permute(1, 0, 2)
        b_V = attn.c_attn.bias.detach()[2 * d :].view(n_heads, d_head)
        W_O = attn.c_proj.weight.detach().view(n_heads, d_head, d)
        ov = AttentionOV(W_V, b_V, W_O, attn.c_proj.bias.detach())
        return BlockInternals(norm_spec(block.ln_1), norm_spec(block.ln_2), None, ov, attn, False)

    def attention_qk(self, layer: int) -> AttentionQK:
        attn = self.layers()[self.check_layer(layer)].attn
        d, n_heads = self.d_model, int(self.config.n_head)
        d_head = d // n_heads
        W, b = attn.c_attn.weight.detach(), attn.c_attn.bias.detach()  # x @ W + b, [q | k | v]
        W_Q, W_K = (W[:, i * d : (i + 1) * d].view(d, n_heads, d_head).permute(1, 0, 2) for i in (0, 1))
        b_Q, b_K = (b[i * d : (i + 1) * d].view(n_heads, d_head) for i in (0, 1))
        return AttentionQK(W_Q, b_Q, W_K, b_K, None, None, _qk_scale(attn, d_head), None)

    def attention_io(self, layer: int) -> AttentionIO:
        attn = self.layers()[self.check_layer(layer)].attn
        d, n_heads = self.d_model, int(self.config.n_head)
        d_head = d // n_heads  # c_attn's output is [q | k | v], each head-major
        slices = [*_head_slices("q", n_heads, d_head), *_head_slices("k", n_heads, d_head, d),
                  *_head_slices("v", n_heads, d_head, 2 * d)]
        return AttentionIO([(attn.c_attn, slices)], attn.c_proj)

    def mlp_hidden_module(self, layer: int) -> nn.Module:
        return self.layers()[self.check_layer(layer)].mlp.c_proj


class NeoXAdapter(ModelAdapter):
    def decoder(self) -> nn.Module:
        return self.model.gpt_neox

    def layers(self) -> nn.ModuleList:
        return self.model.gpt_neox.layers

    def embed_module(self) -> nn.Module:
        return self.model.gpt_neox.embed_in

    def final_norm(self) -> NormSpec:
        return norm_spec(self.model.gpt_neox.final_layer_norm)

    def block_internals(self, layer: int) -> BlockInternals:
        block = self.layers()[self.check_layer(layer)]
        attn = block.attention
        d, n_heads = self.d_model, int(self.config.num_attention_heads)
        d_head = d // n_heads
        # query_key_value rows are laid out per head as [q | k | v] of d_head each.
        W = attn.query_key_value.weight.detach().view(n_heads, 3, d_head, d)
        W_V = W[:, 2].transpose(1, 2)
        b = _bias(attn.query_key_value)
        b_V = None if b is None else b.view(n_heads, 3, d_head)[:, 2]
        W_O = attn.dense.weight.detach().view(d, n_heads, d_head).permute(1, 2, 0)
        ov = AttentionOV(W_V, b_V, W_O, _bias(attn.dense))
        parallel = bool(getattr(self.config, "use_parallel_residual", False))
        return BlockInternals(
            norm_spec(block.input_layernorm), norm_spec(block.post_attention_layernorm), None, ov, attn, parallel
        )

    def attention_qk(self, layer: int) -> AttentionQK:
        attn = self.layers()[self.check_layer(layer)].attention
        d, n_heads = self.d_model, int(self.config.num_attention_heads)
        d_head = d // n_heads
        W = attn.query_key_value.weight.detach().view(n_heads, 3, d_head, d)  # per head [q | k | v]
        b = _bias(attn.query_key_value)
        b = None if b is None else b.view(n_heads, 3, d_head)
        return AttentionQK(W[:, 0].transpose(1, 2), None if b is None else b[:, 0], W[:, 1].transpose(1, 2),
                           None if b is None else b[:, 1], None, None, _qk_scale(attn, d_head), None)

    def attention_io(self, layer: int) -> AttentionIO:
        attn = self.layers()[self.check_layer(layer)].attention
        d, n_heads = self.d_model, int(self.config.num_attention_heads)
        d_head = d // n_heads  # query_key_value's output is per head [q | k | v]
        slices = [s for i, kind in enumerate("qkv") for s in _head_slices(kind, n_heads, d_head, i * d_head, 3 * d_head)]
        return AttentionIO([(attn.query_key_value, slices)], attn.dense)

    def mlp_hidden_module(self, layer: int) -> nn.Module:
        return self.layers()[self.check_layer(layer)].mlp.dense_4h_to_h


_FAMILIES: dict[str, tuple[str, type[ModelAdapter]]] = {
    "llama": ("llama", LlamaAdapter),
    "mistral": ("llama", LlamaAdapter),
    "qwen2": ("llama", LlamaAdapter),
    "gemma": ("gemma", GemmaAdapter),
    "gemma2": ("gemma", GemmaAdapter),
    "gemma3_text": ("gemma", GemmaAdapter),
    "gpt2": ("gpt2", GPT2Adapter),
    "gpt_neox": ("gpt_neox", NeoXAdapter),
}


def adapter_for(model: nn.Module) -> ModelAdapter:
    """Build the adapter for a loaded ``*ForCausalLM`` model.

    Raises:
        AdapterError: the config's ``model_type`` is not a supported family.
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _FAMILIES:
        raise AdapterError(
            f"model type {model_type!r} is not supported; supported: {sorted(_FAMILIES)}. "
            "Add an adapter in transcoders/models/adapters.py naming its MLP modules."
        )
    family, cls = _FAMILIES[model_type]
    return cls(model=model, family=family)
