"""Evaluate the coders of a run folder on held-out (or the user's own) text."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..coders.io import CoderFileError, check_compatible, load_coder
from ..data.sources import describe_source, load_documents
from ..data.tokens import build_token_split, tokenize_documents
from ..models.loading import LoadedModel, load_model
from .metrics import evaluate_coders
from .report import write_report


def find_coders(run_dir: Path) -> dict[str, Path]:
    """``{key: folder}`` for every coder folder under ``run_dir``: key ``"6"`` for
    ``layers.6.mlp/``, ``"6/k64"`` for a sweep variant ``layers.6.mlp/k64/``.

    Raises:
        CoderFileError: the folder does not exist, holds no coder, or a coder names no layer.
    """
    if not run_dir.is_dir():
        raise CoderFileError(f"run folder {run_dir} does not exist: pass the folder `transcoders train` wrote.")
    found = {}
    for cfg_path in sorted(run_dir.rglob("cfg.json")):
        try:
            layer = json.loads(cfg_path.read_text()).get("layer")
        except (OSError, ValueError) as exc:
            raise CoderFileError(f"{cfg_path} is unreadable: {exc}") from exc
        if not isinstance(layer, int):
            raise CoderFileError(f"{cfg_path} names no layer; cannot tell where to splice this coder.")
        variant = cfg_path.parent.relative_to(run_dir).parts[1:]
        found["/".join([str(layer), *variant])] = cfg_path.parent
    if not found:
        raise CoderFileError(f"no coders in {run_dir} (expected <hookpoint>/cfg.json + coder.safetensors); did training finish?")
    return found


def evaluate_run(run_dir: str | Path, *, data: str | None = None, eval_tokens: int = 8192, batch_size: int = 8,
                 loaded: LoadedModel | None = None, eval_split: torch.Tensor | None = None, progress: bool = True,
                 extra: dict | None = None) -> dict:
    """Evaluate every coder in ``run_dir`` and write ``metrics.json``, ``summary.md`` and
    ``feature_density.png`` there.

    Args:
        data: a text source to measure on (all of it, up to ``eval_tokens``); default: the
            held-out split of the run's training text.
        eval_tokens: cap on evaluation tokens.

    Raises:
        CoderFileError: missing/corrupt coders, or coders that do not fit the model.
        DataSourceError: an empty or unreadable text source.
    """
    run_dir = Path(run_dir)
    coder_dirs = find_coders(run_dir)
    coders = {key: load_coder(folder) for key, folder in coder_dirs.items()}
    cfg_path = run_dir / "train_config.json"
    train_cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    model_name = next(iter(coders.values())).cfg.model_name
    ctx_len = train_cfg.get("ctx_len", 256)
    loaded = loaded or load_model(model_name)
    for coder in coders.values():
        check_compatible(coder, loaded.adapter.d_model, loaded.adapter.n_layers)
        coder.to(loaded.adapter.device)
    if eval_split is not None:
        tokens, source = eval_split, f"held-out split of {describe_source(train_cfg.get('data'))}"
    elif data is not None:
        tokens = tokenize_documents(load_documents(data), loaded.tokenizer, ctx_len, max_tokens=eval_tokens)
        source = describe_source(data)
    else:
        tokens = build_token_split(train_cfg.get("data"), loaded.tokenizer, ctx_len,
                                   eval_fraction=train_cfg.get("eval_fraction", 0.05), max_train_tokens=ctx_len,
                                   max_eval_tokens=eval_tokens).eval
        source = f"held-out split of {describe_source(train_cfg.get('data'))}"
    tokens = tokens[: max(1, eval_tokens // tokens.shape[1])]
    means = {}
    for key, folder in coder_dirs.items():
        if (folder / "stats.safetensors").exists():
            means[coders[key].cfg.layer] = load_file(folder / "stats.safetensors")["mlp_out_mean"]
    t0 = time.perf_counter()
    skip = train_cfg.get("skip_first_tokens", 0)  # runs from before the option trained on every position
    metrics = evaluate_coders(loaded.adapter, coders, tokens, mlp_out_means=means, batch_size=batch_size, progress=progress,
                              skip_first=skip)
    info = {"model": model_name, "eval_data": source, "eval_seconds": time.perf_counter() - t0, **(extra or {})}
    summary = write_report(run_dir, metrics, extra=info, header=f"{model_name} on {source}")
    metrics = {k: v for k, v in metrics.items() if k != "feature_frequency"} | info
    metrics["summary_path"] = str(summary)
    return metrics
