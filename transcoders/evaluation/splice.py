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
