"""Evaluate the coders of a run folder on held-out (or the user's own) text."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from ..coders.clt import is_clt_folder, read_clt
from ..coders.io import CoderFileError, check_compatible, load_coder
from ..coders.run_folder import find_coders
from ..data.sources import describe_source
from ..data.tokens import build_token_split, tokenize_source
from ..files import check_writable, slugify
from ..models.bos import bos_id_if, check_run_policy, resolve_prepend_bos
from ..models.loading import LoadedModel, load_model
from ..models.trust import model_from_file
from ..training.config import TrainConfig
from .metrics import evaluate_coders
from .report import write_report


def eval_folder(run_dir: str | Path, data: str | None) -> Path:
    """Where an evaluation is written: the run folder for its own held-out split, else
    ``run_dir/eval/<source-name>/`` (the run's own results are never replaced by results on
    other text)."""
    run_dir = Path(run_dir)
    if data is None:
        return run_dir
    from ..data.mixture import is_mixture

    if is_mixture(data):
        return run_dir / "eval" / slugify("mixture " + data)
    name = Path(data).expanduser().name if Path(data).expanduser().exists() else data
    return run_dir / "eval" / slugify(Path(name).stem if "." in name else name)


def training_dead(stats: dict[str, torch.Tensor]) -> dict:
    """Dead features as training saw them, from a coder's ``stats.safetensors``:
    ``dead_in_training`` (share of features silent for the last ``dead_window`` training tokens,
    the AuxK criterion), ``never_fired_in_training`` (share with no activation in the whole run),
    ``dead_window`` and ``trained_tokens``. Far more tokens than an evaluation sees, so a rare
    live feature is not called dead. Coders saved before these counters give ``dead_in_training: None``.
    """
    if "tokens_since_fired" not in stats:
        return {"dead_in_training": None}
    silent = stats["tokens_since_fired"]
    return {"dead_in_training": (silent >= stats["dead_window"]).double().mean().item(),
            "never_fired_in_training": (stats["fire_count"] == 0).double().mean().item(),
            "dead_window": int(stats["dead_window"]), "trained_tokens": int(stats["tokens"])}


def read_train_config(run_dir: str | Path) -> TrainConfig | None:
    """The run's ``train_config.json`` read through :class:`TrainConfig` (None if absent).

    Raises:
        CoderFileError: the file exists but is not a valid training config.
    """
    path = Path(run_dir) / "train_config.json"
    if not path.exists():
        return None
    try:
        return TrainConfig.model_validate_json(path.read_text())
    except (ValidationError, OSError, UnicodeDecodeError) as exc:
        raise CoderFileError(f"{path} is not a valid training config ({exc}); was it edited by hand?") from exc


def evaluate_run(run_dir: str | Path, *, data: str | None = None, out: str | Path | None = None, model: str | None = None,
                 prepend_bos: bool | None = None, eval_tokens: int = 8192, batch_size: int = 8,
                 loaded: LoadedModel | None = None, eval_split: torch.Tensor | None = None,
                 eval_sources: list[tuple[str, slice]] | None = None, progress: bool = True,
                 extra: dict | None = None, all_at_once: bool = False, layers: list[int] | None = None) -> dict:
    """Evaluate every coder in ``run_dir`` and write ``metrics.json``, ``summary.md`` and
    ``feature_density.png``.

    On the run's own held-out split they go into ``run_dir`` (keeping the training timings);
    on other text (``data``) into ``out``, by default ``run_dir/eval/<source-name>/``. The
    output folder is checked for writing before any time is spent.

    Args:
        data: a text source to measure on (all of it, up to ``eval_tokens``); default: the
            held-out split of the run's training text (for a run that streamed its text, read
            as it was then: :func:`~transcoders.data.stream.collect_eval`, only as far as needed).
        out: output folder (default: see above).
        eval_sources: with ``eval_split``, ``(label, rows)`` of each source of a mixture (a
            :class:`~transcoders.data.tokens.TokenSplit`'s ``eval_sources``), for ``by_source``.
        model: the model to load. Default: the coders' model, but only when it is the default
            model or another known local model; a name taken from a file never makes us
            download or import anything.
        prepend_bos: start every context with BOS; default: as the run was trained (runs from
            before the setting: no BOS; coders without a run: the model's policy).
        eval_tokens: cap on evaluation tokens.
        all_at_once: also splice every coder at once (``metrics["spliced_together"]``, see
            :func:`~transcoders.evaluation.metrics.evaluate_coders`).
        layers: evaluate (and splice together) only the coders of these layers.

    When the text is a mixture, ``metrics["by_source"]`` holds the same evaluation on each
    source's contexts alone (``{label: {"layers", "eval_tokens"[, "spliced_together"]}}``).

    Raises:
        CoderFileError: missing/corrupt coders, or coders that do not fit the model.
        DataSourceError: an empty or unreadable text source.
        ModelLoadError: the coders name a model that is not known locally and ``model`` is not given.
        BosPolicyError: ``prepend_bos`` contradicts the policy the run was trained with.
        OSError: the output folder cannot be written.
    """
    run_dir = Path(run_dir)
    if is_clt_folder(run_dir):
        return evaluate_clt_folder(run_dir, data=data, out=out, model=model, prepend_bos=prepend_bos,
                                   eval_tokens=eval_tokens, batch_size=batch_size, loaded=loaded, progress=progress)
    coder_dirs = find_coders(run_dir)
    if layers is not None:
        missing = sorted(set(layers) - {key.layer for key in coder_dirs})
        if missing:
            raise CoderFileError(f"{run_dir} has no coder for layer(s) {missing}; it has layers "
                                 f"{sorted({key.layer for key in coder_dirs})}")
        coder_dirs = {key: folder for key, folder in coder_dirs.items() if key.layer in set(layers)}
    out_dir = check_writable(Path(out) if out is not None else eval_folder(run_dir, data))
    coders = {key: load_coder(folder) for key, folder in coder_dirs.items()}
    recorded = read_train_config(run_dir)
    train_cfg = recorded or TrainConfig(skip_first_tokens=0)  # coders without a run: every position
    # a run from before the setting trained without BOS
    use_bos = check_run_policy(None if recorded is None else bool(recorded.prepend_bos), prepend_bos, f"the run {run_dir}")
    model_name = next(iter(coders.values())).cfg.model_name
    if loaded is None:
        loaded = load_model(model or model_from_file(model_name, f"the coders in {run_dir}"))
    for coder in coders.values():
        check_compatible(coder, loaded.adapter.d_model, loaded.adapter.n_layers)
        coder.to(loaded.adapter.device)
    ctx_len = train_cfg.ctx_len
    use_bos = resolve_prepend_bos(use_bos, loaded.adapter, loaded.tokenizer)
    bos_id = bos_id_if(use_bos, loaded.tokenizer)
    sources: list[tuple[str, slice]] = []  # (label, rows) of each source of a mixture
    if eval_split is not None:
        tokens, source = eval_split, f"held-out split of {describe_source(train_cfg.data)}"
        sources = list(eval_sources or [])
    elif data is not None:
        tokens, sources = tokenize_source(data, loaded.tokenizer, ctx_len, max_tokens=eval_tokens, bos_id=bos_id)
        source = describe_source(data)
    elif train_cfg.streaming:  # the run streamed its text: the held-out rows it evaluated on, read the same way
        from ..data.stream import collect_eval

        tokens, sources = collect_eval(train_cfg.data, loaded.tokenizer, ctx_len, eval_fraction=train_cfg.eval_fraction,
                                       max_eval_tokens=eval_tokens, bos_id=bos_id)
        source = f"held-out split of {describe_source(train_cfg.data)}"
    else:
        split = build_token_split(train_cfg.data, loaded.tokenizer, ctx_len, eval_fraction=train_cfg.eval_fraction,
                                  max_train_tokens=ctx_len, max_eval_tokens=eval_tokens, bos_id=bos_id)
        tokens, sources = split.eval, split.eval_sources
        source = f"held-out split of {describe_source(train_cfg.data)}"
    tokens = tokens[: max(1, eval_tokens // tokens.shape[1])]
    means, trained = {}, {}
    for key, folder in coder_dirs.items():
        if (folder / "stats.safetensors").exists():
            stats = load_file(folder / "stats.safetensors")
            means[key.layer] = stats["mlp_out_mean"]
            trained[str(key)] = training_dead(stats)
    t0 = time.perf_counter()
    metrics = evaluate_coders(loaded.adapter, {str(k): c for k, c in coders.items()}, tokens, mlp_out_means=means,
                              batch_size=batch_size, progress=progress, skip_first=train_cfg.skip_first_tokens,
                              together=all_at_once)
    for key, m in metrics["layers"].items():
        m.update(trained.get(key) or {"dead_in_training": None})
    if len(sources) > 1:  # a mixture: each source's rows on their own as well
        metrics["by_source"] = {}
        for label, rows in sources:
            part = tokens[rows.start: min(rows.stop, tokens.shape[0])]
            if len(part):
                m = evaluate_coders(loaded.adapter, {str(k): c for k, c in coders.items()}, part, mlp_out_means=means,
                                    batch_size=batch_size, progress=progress, skip_first=train_cfg.skip_first_tokens,
                                    together=all_at_once)
                metrics["by_source"][label] = {k: v for k, v in m.items() if k != "feature_frequency"}
    info = {"model": loaded.name, "eval_data": source, "prepend_bos": use_bos, "eval_seconds": time.perf_counter() - t0,
            **(extra or {})}
    if out_dir == run_dir and "training" not in info and (run_dir / "timing.json").exists():
        info["training"] = json.loads((run_dir / "timing.json").read_text())  # keep the training timings
    summary = write_report(out_dir, metrics, extra=info, header=f"{loaded.name} on {source}")
    metrics = {k: v for k, v in metrics.items() if k != "feature_frequency"} | info
    metrics["summary_path"] = str(summary)
    return metrics


def evaluate_clt_folder(run_dir: str | Path, *, data: str | None = None, out: str | Path | None = None,
                        model: str | None = None, prepend_bos: bool | None = None, eval_tokens: int = 8192,
                        batch_size: int = 8, loaded: LoadedModel | None = None, progress: bool = True) -> dict:
    """:func:`evaluate_run` for a cross-layer transcoder folder in circuit-tracer's format
    (:func:`~transcoders.evaluation.clt.evaluate_clt`: each layer spliced alone and all at
    once). The text is ``data``, or the held-out split of the default corpus; the model is
    ``model``, or the one the folder's ``config.yaml`` names when it is known locally. With BOS,
    the first position keeps the real MLP output (the attention sink), as our runs train.
    Results go to ``out`` (default as :func:`eval_folder`).

    Raises:
        CoderFileError: the folder is incomplete or does not fit the model.
        ModelLoadError: no ``model`` and the folder names none known locally.
    """
    from .clt import evaluate_clt

    run_dir = Path(run_dir)
    out_dir = check_writable(Path(out) if out is not None else eval_folder(run_dir, data))
    clt = read_clt(run_dir)
    if loaded is None:
        loaded = load_model(model or model_from_file(clt.model_name or None, f"the cross-layer transcoder in {run_dir}"))
    ad = loaded.adapter
    clt.check_fits(ad.n_layers, ad.d_model, CoderFileError)
    cfg = TrainConfig()
    use_bos = resolve_prepend_bos(prepend_bos, ad, loaded.tokenizer)
    bos_id = bos_id_if(use_bos, loaded.tokenizer)
    if data is not None:
        tokens, _ = tokenize_source(data, loaded.tokenizer, cfg.ctx_len, max_tokens=eval_tokens, bos_id=bos_id)
        source = describe_source(data)
    else:
        split = build_token_split(cfg.data, loaded.tokenizer, cfg.ctx_len, eval_fraction=cfg.eval_fraction,
                                  max_train_tokens=cfg.ctx_len, max_eval_tokens=eval_tokens, bos_id=bos_id)
        tokens, source = split.eval, f"held-out split of {describe_source(cfg.data)}"
    tokens = tokens[: max(1, eval_tokens // tokens.shape[1])]
    t0 = time.perf_counter()
    metrics = evaluate_clt(ad, clt, tokens, batch_size=batch_size, progress=progress, skip_first=int(bos_id is not None))
    info = {"model": loaded.name, "eval_data": source, "prepend_bos": use_bos, "eval_seconds": time.perf_counter() - t0,
            "coders": "cross-layer transcoder"}
    summary = write_report(out_dir, metrics, extra=info, header=f"{loaded.name} (cross-layer transcoder) on {source}")
    metrics = {k: v for k, v in metrics.items() if k != "feature_frequency"} | info
    metrics["summary_path"] = str(summary)
    return metrics
