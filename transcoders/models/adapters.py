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
from dataclasses import dataclass

import torch
from torch import nn


class AdapterError(ValueError):
    """The model is not of a supported family, or a layer index is out of range."""


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
        return int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions"))

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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


class LlamaAdapter(ModelAdapter):
    def decoder(self) -> nn.Module:
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers


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


class NeoXAdapter(ModelAdapter):
    def decoder(self) -> nn.Module:
        return self.model.gpt_neox

    def layers(self) -> nn.ModuleList:
        return self.model.gpt_neox.layers


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
