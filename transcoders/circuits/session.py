"""Load what circuit analysis needs: a model, transcoders for every layer, a tokenised prompt."""

from __future__ import annotations

from pathlib import Path

import torch

from ..coders.coder import SparseCoder
from ..coders.io import CoderFileError, check_compatible, load_coder
from ..evaluation.run import find_coders
from ..models.loading import LoadedModel


def load_layer_coders(run_dir: str | Path, loaded: LoadedModel) -> dict[int, SparseCoder]:
    """``{layer: coder}`` for every layer's (non-sweep) coder in a run folder, checked against
    the model.

    Raises:
        CoderFileError: no coders, missing/corrupt files, or coders that do not fit the model.
    """
    found = find_coders(Path(run_dir))
    ad = loaded.adapter
    coders = {}
    for key, folder in found.items():
        if "/" in key:
            continue  # sweep variants: pick them by pointing at their own folder
        coder = load_coder(folder, device=ad.device).requires_grad_(False)
        check_compatible(coder, ad.d_model, ad.n_layers)
        coders[int(key)] = coder
    missing = [layer for layer in range(ad.n_layers) if layer not in coders]
    if missing:
        raise CoderFileError(
            f"{run_dir} has no transcoder for layers {missing}; attribution needs one per layer "
            "(train them with `transcoders train --layers all`)."
        )
    return coders


def tokenize_prompt(loaded: LoadedModel, prompt: str) -> torch.Tensor:
    """``[T]`` token ids of ``prompt`` with the tokenizer's usual special tokens (e.g. BOS).

    Raises:
        ValueError: the prompt is empty or longer than the model's context.
    """
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise ValueError("the prompt is empty; pass some text with --prompt")
    limit = loaded.adapter.max_context
    if ids.numel() > limit:
        raise ValueError(f"the prompt is {ids.numel()} tokens but the model's context is {limit}; shorten it")
    return ids
