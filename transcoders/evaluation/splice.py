"""Replace MLP outputs inside a running model with a function of the MLP input."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..models.adapters import ModelAdapter

Replacement = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def splice_mlps(adapter: ModelAdapter, replacements: dict[int, Replacement]) -> Iterator[None]:
    """Within the ``with`` block, layer ``l``'s MLP output becomes ``replacements[l](mlp_in)``.

    Args:
        adapter: the model's adapter.
        replacements: ``{layer: fn}``, ``fn: [batch, pos, d_model] -> [batch, pos, d_model]``
            taking the MLP input (after the pre-MLP norm) and returning what replaces the MLP
            output (for Gemma 2/3, the output after ``post_feedforward_layernorm``; see
            :meth:`ModelAdapter.hook_mlps`). Use it to splice in a transcoder
            (``coder``), zero-ablate (``torch.zeros_like``) or mean-ablate the MLP. A
            replacement that calls the hooked MLP itself must call ``mlp.forward(x)`` (which
            skips hooks); calling ``mlp(x)`` would re-enter this splice.

    Raises:
        AdapterError: a layer is out of range.
        ValueError: a replacement returns the wrong shape.
    """
    with adapter.hook_mlps(replacements, on_output=lambda layer, x, _out: replacements[layer](x)):
        yield


def keep_first(replace: Replacement, adapter: ModelAdapter, layer: int, n: int) -> Replacement:
    """``replace``, except that the first ``n`` positions keep the real MLP output (``n = 0``:
    ``replace`` itself). Used to leave the attention-sink position out of splicing."""
    if n == 0:
        return replace

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = replace(x).clone()
        out[:, :n] = adapter.mlp_forward(layer, x[:, :n]).to(out.dtype)
        return out

    return fn


def zero_ablation(x: torch.Tensor) -> torch.Tensor:
    """Replacement that zero-ablates the MLP."""
    return torch.zeros_like(x)


def mean_ablation(mean: torch.Tensor) -> Replacement:
    """Replacement that writes the fixed vector ``mean [d_model]`` at every position."""
    return lambda x: mean.to(device=x.device, dtype=x.dtype).expand_as(x)


def coder_replacement(coder: torch.nn.Module, adapter: ModelAdapter | None = None) -> Replacement:
    """Replacement that runs a coder on the MLP input (in the coder's dtype).

    A transcoder's output replaces the MLP output. An SAE (``coder.cfg.kind == "sae"``)
    reconstructs the MLP *input*, so the MLP then runs on its reconstruction; that needs
    ``adapter`` to find the MLP.
    """
    dtype = next(coder.parameters()).dtype
    if getattr(coder.cfg, "kind", None) == "sae":
        if adapter is None or coder.cfg.layer is None:
            raise ValueError("splicing an SAE needs the adapter and the coder's layer, to run the MLP on its reconstruction")
        return lambda x: adapter.mlp_forward(coder.cfg.layer, coder(x.to(dtype)).to(x.dtype))
    return lambda x: coder(x.to(dtype))


ActsEdit = Callable[[int, torch.Tensor], torch.Tensor]


@contextmanager
def splice_clt(adapter: ModelAdapter, clt, layers=None, *, keep_first_n: int = 0, edit: ActsEdit | None = None,
               add: dict[int, torch.Tensor] | None = None, inputs: dict | None = None,
               outputs: dict | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Within the ``with`` block, the MLP output of each layer ``t`` in ``layers`` (default:
    all) becomes a cross-layer transcoder's reconstruction ``sum_{s <= t} f_s W_dec[s][:, t - s]
    + b_dec[t]`` (Ameisen et al. 2025), with every ``f_s`` encoded from what the running model
    feeds layer ``s`` (its MLP input, or the stream before the MLP's norm for a CLT reading
    ``resid_mid``). Layers outside ``layers`` keep their real output but still encode, since
    their features write into later layers.

    Args:
        clt: a :class:`~transcoders.coders.clt.CrossLayerTranscoder` spanning the model.
        keep_first_n: the first positions keep the real MLP output (the attention sink).
        edit: ``edit(layer, acts [batch, pos, d_sae]) -> acts``, applied after encoding
            (ablation, clamping).
        add: ``{layer: [pos, d] or [batch, pos, d]}`` added to that layer's reconstruction
            (error nodes held at their clean values, for the free replacement model).
        inputs: if a dict, filled with ``{layer: [batch, pos, d]}``, what the CLT read.
        outputs: if a dict, filled with ``{layer: [batch, pos, d]}``, the real MLP outputs.

    Yields:
        ``{layer: [batch, pos, d_sae]}``, filled with the activations as the pass runs.

    Raises:
        ValueError: the CLT does not span the model's layers or width.
    """
    L = adapter.n_layers
    clt.check_fits(L, adapter.d_model)
    spliced = set(range(L) if layers is None else layers)
    acts: dict[int, torch.Tensor] = {}
    stream: dict[int, torch.Tensor] = {}
    dtype = clt.W_enc.dtype

    def on_output(layer, x, out):
        x = stream.pop(layer) if clt.reads == "resid_mid" else x
        if inputs is not None:
            inputs[layer] = x
        if outputs is not None:
            outputs[layer] = out
        a = clt.encode(layer, x.to(dtype))
        acts[layer] = a if edit is None else edit(layer, a)
        if layer not in spliced:
            return None
        y = clt.reconstruct(layer, acts)
        if add is not None and layer in add:
            y = y + add[layer].to(y.dtype)
        y = y.to(out.dtype)
        if keep_first_n:
            y = y.clone()
            y[:, :keep_first_n] = out[:, :keep_first_n]
        return y

    handles = []
    if clt.reads == "resid_mid":
        for layer in range(L):
            module = adapter.block_internals(layer).ln_mlp.module
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs, layer=layer: stream.__setitem__(layer, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
    try:
        with torch.no_grad(), adapter.hook_mlps(range(L), on_output=on_output):
            yield acts
    finally:
        for h in handles:
            h.remove()
