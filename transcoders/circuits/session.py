"""Load what circuit analysis needs: a model, transcoders for every layer, a tokenised prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..coders.clt import CrossLayerTranscoder, is_clt_folder, read_clt
from ..coders.coder import SparseCoder
from ..coders.io import CoderFileError, check_compatible, coders_fingerprint, load_coder
from ..coders.run_folder import find_coders
from ..models.loading import LoadedModel


def load_layer_coders(run_dir: str | Path, loaded: LoadedModel) -> dict[int, SparseCoder] | CrossLayerTranscoder:
    """``{layer: coder}`` for every layer's (non-sweep) coder in a run folder, checked against
    the model; or, when ``run_dir`` holds a cross-layer transcoder in circuit-tracer's format
    (:func:`~transcoders.coders.clt.read_clt`), that CLT (it also reads as ``{layer: coder}``).

    Raises:
        CoderFileError: no coders, missing/corrupt files, or coders that do not fit the model.
    """
    ad = loaded.adapter
    if is_clt_folder(run_dir):
        clt = read_clt(run_dir, device=ad.device).requires_grad_(False)
        clt.check_fits(ad.n_layers, ad.d_model, CoderFileError)
        return clt
    found = find_coders(Path(run_dir))
    coders = {}
    for key, folder in found.items():
        if key.variant:
            continue  # sweep variants: pick them by pointing at their own folder
        coder = load_coder(folder, device=ad.device).requires_grad_(False)
        check_compatible(coder, ad.d_model, ad.n_layers)
        coders[key.layer] = coder
    missing = [layer for layer in range(ad.n_layers) if layer not in coders]
    if missing:
        raise CoderFileError(
            f"{run_dir} has no transcoder for layers {missing}; attribution needs one per layer "
            "(train them with `transcoders train --layers all`)."
        )
    return coders


def tokenize_prompt(loaded: LoadedModel, prompt: str, *, bos: bool | None = None) -> torch.Tensor:
    """``[T]`` token ids of ``prompt``, led by the tokenizer's BOS token when ``bos`` is set
    (default: the model's policy, :mod:`transcoders.models.bos`). The prompt is tokenized
    without special tokens, so the policy decides alone, whatever the tokenizer would add. With
    BOS, position 0 is the attention sink and the prompt's first word keeps its ordinary role.
    ``trace`` passes the run's policy (:func:`prompt_bos_policy`).

    Raises:
        ValueError: the prompt is empty or longer than the model's context.
    """
    from ..models.bos import resolve_prepend_bos

    tokenizer: Any = loaded.tokenizer
    bos = resolve_prepend_bos(bos, loaded.adapter, tokenizer)
    ids = torch.tensor(tokenizer(prompt, add_special_tokens=False).input_ids, dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("the prompt is empty; pass some text with --prompt")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos and bos_id is not None and int(ids[0]) != bos_id:
        ids = torch.cat([torch.tensor([bos_id]), ids])
    limit = loaded.adapter.max_context
    if ids.numel() > limit:
        raise ValueError(f"the prompt is {ids.numel()} tokens but the model's context is {limit}; shorten it")
    return ids


def prompt_bos_policy(loaded: LoadedModel, run_dir: str | Path, wanted: bool | None) -> bool:
    """Whether prompts for the transcoders in ``run_dir`` start with BOS: as the run was trained
    (its ``train_config.json``), else ``wanted``, else the model's policy.

    Raises:
        BosPolicyError: ``wanted`` contradicts the run's policy.
    """
    from ..evaluation.run import read_train_config
    from ..models.bos import check_run_policy, resolve_prepend_bos

    recorded = read_train_config(run_dir)
    policy = check_run_policy(None if recorded is None else bool(recorded.prepend_bos), wanted,
                              f"the transcoders in {run_dir}")
    return resolve_prepend_bos(policy, loaded.adapter, loaded.tokenizer)


def reference_tokens(loaded: LoadedModel, n_tokens: int = 4096, ctx_len: int = 128, *, bos: bool = False) -> torch.Tensor:
    """``[n_ctx, ctx_len]`` held-out tokens of the bundled State of the Union corpus (addresses
    training never sees), for mean activations; each context led by BOS with ``bos``."""
    from ..data.tokens import build_token_split
    from ..models.bos import bos_id_if

    split = build_token_split(None, loaded.tokenizer, ctx_len, max_train_tokens=ctx_len, max_eval_tokens=n_tokens,
                              bos_id=bos_id_if(bos, loaded.tokenizer))
    return split.eval


class GraphMismatchError(ValueError):
    """A saved graph was made with another model or other transcoders than those loaded."""


def graph_identity(loaded: LoadedModel, coders: dict[int, SparseCoder]) -> dict:
    """What a graph records of the model and transcoders it was made with (see
    :func:`check_graph_matches`): the model's name, layer count, width and vocabulary size, each
    layer's d_sae, and :func:`~transcoders.coders.io.coders_fingerprint` of all of them and of
    each one (``layer_fingerprints``, the form a feature store records, so labels can be checked)."""
    ad = loaded.adapter
    return {"model": loaded.name, "n_layers": ad.n_layers, "d_model": ad.d_model, "vocab_size": ad.vocab_size,
            "d_sae": {str(layer): c.cfg.d_sae for layer, c in sorted(coders.items())},
            "coders_fingerprint": coders_fingerprint(coders),
            "layer_fingerprints": {str(layer): coders_fingerprint({0: c}) for layer, c in sorted(coders.items())}}


def check_graph_matches(graph, loaded: LoadedModel, coders: dict[int, SparseCoder]) -> None:
    """Check that ``graph`` belongs to this model and these transcoders.

    Raises:
        GraphMismatchError: the layer count, width, vocabulary, d_sae or the coders'
            fingerprint differ from what the graph recorded; the message lists every
            difference. Graphs from before these records are checked on what they have.
    """
    have = graph_identity(loaded, coders)
    meta = graph.meta
    diffs = []
    if graph.n_layers != have["n_layers"]:
        diffs.append(f"layers: graph {graph.n_layers}, loaded {have['n_layers']}")
    for key in ("d_model", "vocab_size", "d_sae", "coders_fingerprint"):
        if key in meta and meta[key] != have[key]:
            diffs.append(f"{key}: graph {meta[key]}, loaded {have[key]}")
    if graph.tokens and max(graph.tokens) >= have["vocab_size"]:
        diffs.append(f"the graph's tokens reach id {max(graph.tokens)}, past the loaded vocabulary ({have['vocab_size']})")
    if diffs:
        raise GraphMismatchError(f"the graph was made with another model or other transcoders than those loaded "
                                 f"({meta.get('model')!r}, {meta.get('run_dir')!r}): {'; '.join(diffs)}. Pass the "
                                 "--model and --run-dir it was traced with.")
