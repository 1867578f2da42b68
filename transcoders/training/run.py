"""A whole training run: load the model and text, train, save, and evaluate."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from ..coders.io import CONFIG, WEIGHTS
from ..data.stream import TokenStream, collect_eval, should_stream
from ..data.tokens import build_token_split
from ..files import OutputExistsError, atomic_write_json, atomic_write_text, folder_lock
from ..models.bos import bos_id_if, check_model, resolve_prepend_bos
from ..models.loading import LoadedModel, canonical_model_name, load_model
from .config import TrainConfig
from .distributed import is_main
from .trainer import STATS, Trainer


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch build sees no CUDA GPU: use --device cpu")
    return device


def harvest_copy(loaded: LoadedModel, dtype_name: str):
    """The adapter to harvest with: the model itself, or a bfloat16 copy (2-4x faster on CPUs with native bf16)."""
    from ..models.adapters import adapter_for

    if dtype_name == "float32":
        return loaded.adapter
    return adapter_for(copy.deepcopy(loaded.model).to(getattr(torch, dtype_name)))


def open_cache(cfg: TrainConfig, adapter, train_tokens: torch.Tensor | TokenStream, progress: bool = True):
    """Open ``cfg.activation_cache``, building it from the live model first if it does not exist.

    ``train_tokens`` is the training text: a token tensor, or (``cfg.streaming``) a
    :class:`~transcoders.data.stream.TokenStream`, whose first ``cfg.total_tokens`` tokens of
    activations (in training order) then fill the cache. A streamed cache records
    ``streaming`` and ``shuffle_contexts``, so it is never mistaken for one built from the
    in-memory order, or the other way round.

    Raises:
        ActivationCacheError: the cache was built for another model, text, context length, layers
            or context order (streamed or not).
    """
    from ..data.activations import ActivationStream
    from ..data.cache import ActivationCacheError, CachedStream, build_cache

    folder = Path(cfg.activation_cache)
    layers = list(range(adapter.n_layers)) if cfg.layers == "all" else sorted(set(cfg.layers))
    identity = {"model": cfg.model, "data": cfg.data, "ctx_len": cfg.ctx_len, "eval_fraction": cfg.eval_fraction,
                "harvest_dtype": cfg.harvest_dtype, "dtype": cfg.cache_dtype, "skip_first_tokens": cfg.skip_first_tokens,
                "prepend_bos": bool(cfg.prepend_bos)}
    identity["streaming"] = bool(cfg.streaming)  # another order of contexts
    if cfg.streaming:
        identity["shuffle_contexts"] = cfg.shuffle_contexts
    if not (folder / "meta.json").exists():
        stream = ActivationStream(adapter, train_tokens, layers, cfg.batch_size, seed=cfg.seed,
                                  block_contexts=cfg.block_contexts, model_batch=cfg.model_batch,
                                  skip_first=cfg.skip_first_tokens)
        build_cache(stream, folder, cfg.total_tokens, dtype=cfg.cache_dtype, meta=identity, progress=progress)
    cached = CachedStream(folder, cfg.batch_size, layers)
    # caches from before: the model's old alias, no BOS, not streamed
    built = {"prepend_bos": False, "streaming": False, **cached.meta,
             "model": canonical_model_name(str(cached.meta.get("model")))}
    differs = {k: (built.get(k), v) for k, v in identity.items() if built.get(k) != v}
    if differs:
        raise ActivationCacheError(f"activation cache {folder} was built with other settings (cache, run): {differs}; "
                                   "use another --activation-cache folder or delete this one.")
    return cached


RUN_FILES = ("train_config.json", "train_log.jsonl", "timing.json", "metrics.json", "summary.md", "feature_density.png",
             "overrides.json")


def coder_folders(run_dir: Path) -> list[Path]:
    """The coder folders of a run (``layers.N.mlp`` and its sweep variants), deepest first."""
    hooks = [p for p in Path(run_dir).glob("layers.*.mlp") if p.is_dir() and re.fullmatch(r"layers\.\d+\.mlp", p.name)]
    return [v for h in sorted(hooks) for v in sorted(h.iterdir()) if v.is_dir()] + sorted(hooks)


def run_files(run_dir: Path) -> list[Path]:
    """The files a training run writes into ``run_dir`` that exist now: only those names, and
    inside coder folders only a coder's own files (never a folder, never anything else)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    found += sorted(run_dir.glob("checkpoint*.safetensors")) + sorted(run_dir.glob("train_log.rank*.jsonl"))
    for folder in coder_folders(run_dir):
        if (folder / WEIGHTS).is_file() and (folder / CONFIG).is_file():
            found += [folder / name for name in (WEIGHTS, CONFIG, STATS) if (folder / name).is_file()]
    return found


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # before the process group exists


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a folder holding another run unless asked to resume or overwrite;
    with ``overwrite``, remove that run's files (only those: see :func:`run_files`) and the coder
    folders they leave empty.

    Raises:
        OutputExistsError: the folder holds a run and neither flag is given.
    """
    existing = run_files(run_dir)
    if resume or not existing or not _rank0():
        return
    if not overwrite:
        names = ", ".join(p.name for p in existing[:5]) + (", ..." if len(existing) > 5 else "")
        raise OutputExistsError(f"{run_dir} already holds a training run ({names}); continue it with --resume {run_dir}, "
                                "replace it with --overwrite, or choose another --run-dir.")
    for path in existing:
        path.unlink()
    for folder in coder_folders(run_dir):  # folders left empty by that; anything else of the user's stays
        if not any(folder.iterdir()):
            folder.rmdir()


def record_overrides(run_dir: Path, cfg: TrainConfig, changes: dict) -> None:
    """Append ``changes`` (``{field: [saved, new]}``) to ``overrides.json`` with the time, and
    save the changed settings as the run's ``train_config.json``."""
    path = run_dir / "overrides.json"
    history = json.loads(path.read_text()) if path.exists() else []
    history.append({"time": datetime.now(UTC).isoformat(timespec="seconds"), "changes": changes})
    atomic_write_json(path, history)
    atomic_write_text(run_dir / "train_config.json", cfg.model_dump_json(indent=2))


def train_run(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
              overrides: dict | None = None, progress: bool = True, loaded: LoadedModel | None = None,
              evaluate: bool = True, eval_tokens: int = 8192, log: Callable[[str], None] | None = None) -> dict:
    """Train coders for ``cfg.layers`` and (optionally) evaluate them on held-out text.

    The run folder is locked for the whole run (a second run into it refuses), and a folder
    that already holds a run is refused unless ``resume`` or ``overwrite`` is set. A resumed
    run may change the settings in ``RESUME_OVERRIDABLE``: ``overrides`` (``{field: [saved,
    new]}``, see ``transcoders train --override``) are recorded in ``overrides.json``.

    Before training, the model's clean loss on a little bundled text is measured with and
    without BOS (:func:`~transcoders.models.bos.check_model`); ``log`` gets that line, and a
    warning when the BOS policy looks wrong, as soon as they are known; with a data mixture it
    also gets a line per split saying how many contexts each source gave.

    With ``cfg.streaming`` (by default: when the text is a Hugging Face dataset or more than
    256 MB of local files, see :func:`~transcoders.data.stream.should_stream`; the choice is
    saved in ``train_config.json``), the text is never held whole: the held-out contexts are
    read first (:func:`~transcoders.data.stream.collect_eval`), and training reads a
    :class:`~transcoders.data.stream.TokenStream` (a resumed run replays its tokenization up to
    the checkpoint's step, and gets the same batches as an uninterrupted run). ``log`` then
    gets a line saying so.

    Returns:
        ``{"run_dir", "timing": {harvest_s, train_s, tokens_per_s, ...}, "metrics"}``; the
        coders are saved under ``run_dir/<hookpoint>/``.

    Raises:
        OutputExistsError: ``run_dir`` holds another run (see :func:`prepare_run_dir`).
        FolderLockedError: another process is training into ``run_dir``.
        ModelLoadError, DataSourceError, AdapterError: bad model, text or layer.
        TrainingInterrupted, TrainingDiverged: see :class:`Trainer`.
    """
    run_dir = Path(run_dir)
    lock = folder_lock(run_dir, "training run") if _rank0() else contextlib.nullcontext()
    with lock:
        prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
        if resume and overrides and _rank0():
            record_overrides(run_dir, cfg, overrides)
        return _train_run(cfg, run_dir, resume=resume, progress=progress, loaded=loaded, evaluate=evaluate,
                          eval_tokens=eval_tokens, log=log)


def _training_text(cfg: TrainConfig, tokenizer, max_eval_tokens: int, log: Callable[[str], None] | None,
                   ) -> tuple[torch.Tensor | TokenStream, tuple[torch.Tensor, list[tuple[str, slice]]]]:
    """(training contexts, (held-out contexts [n, ctx_len], ``(label, rows)`` per source)) of ``cfg.data``: with
    ``cfg.streaming``, a :class:`~transcoders.data.stream.TokenStream` and the eval rows of
    :func:`~transcoders.data.stream.collect_eval` (read only as far as needed, so a source that
    cannot be read fails here, before any training); else the tensors of
    :func:`~transcoders.data.tokens.build_token_split`. A mixture logs what each source gave.

    Raises:
        DataSourceError: a bad source, or too little text on either side.
    """
    bos_id = bos_id_if(bool(cfg.prepend_bos), tokenizer)
    if not cfg.streaming:  # None: a resumed run from before the setting, which did not stream
        split = build_token_split(cfg.data, tokenizer, cfg.ctx_len, eval_fraction=cfg.eval_fraction,
                                  max_eval_tokens=max_eval_tokens, bos_id=bos_id, log=log)
        return split.train, (split.eval, split.eval_sources)
    evals, sources = collect_eval(cfg.data, tokenizer, cfg.ctx_len, eval_fraction=cfg.eval_fraction,
                            max_eval_tokens=max_eval_tokens, bos_id=bos_id, log=log)
    train = TokenStream(cfg.data, tokenizer, cfg.ctx_len, eval_fraction=cfg.eval_fraction, seed=cfg.seed,
                        shuffle_contexts=cfg.shuffle_contexts, bos_id=bos_id)
    if log is not None:
        log(f"streaming the training text: tokenized while training reads it, shuffled {cfg.shuffle_contexts} "
            f"contexts at a time; {evals.shape[0]} held-out contexts read for evaluation")
    return train, (evals, sources)


def _train_run(cfg: TrainConfig, run_dir: Path, *, resume: bool, progress: bool, loaded: LoadedModel | None,
               evaluate: bool, eval_tokens: int, log: Callable[[str], None] | None) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    loaded = loaded or load_model(cfg.model, device=device)
    for layer in [] if cfg.layers == "all" else cfg.layers:
        loaded.adapter.check_layer(layer)
    if cfg.ctx_len > loaded.adapter.max_context:
        raise ValueError(f"--ctx-len {cfg.ctx_len} is longer than the model's context ({loaded.adapter.max_context} tokens): "
                         f"use --ctx-len {loaded.adapter.max_context} or less")
    if resume and cfg.prepend_bos is None:
        cfg = cfg.model_copy(update={"prepend_bos": False})  # a run from before the setting: no BOS
    cfg = cfg.model_copy(update={"prepend_bos": resolve_prepend_bos(cfg.prepend_bos, loaded.adapter, loaded.tokenizer)})
    cfg = cfg.resolved(device.type)
    if cfg.streaming is None and not resume:  # auto, decided once and recorded in train_config.json
        cfg = cfg.model_copy(update={"streaming": should_stream(cfg.data)})
    check = check_model(loaded.model, loaded.tokenizer, bool(cfg.prepend_bos)) if is_main() else None
    if check is not None and log is not None:
        log(check.line())
        if check.warning:
            log(f"warning: {check.warning}")
    train, (evals, eval_sources) = _training_text(cfg, loaded.tokenizer, max(eval_tokens, cfg.ctx_len),
                                                  log if is_main() else None)
    adapter = harvest_copy(loaded, cfg.harvest_dtype)
    t_setup = time.perf_counter() - t0
    stream, t_cache = None, 0.0
    if cfg.activation_cache:
        t1 = time.perf_counter()
        stream = open_cache(cfg, adapter, train, progress)
        t_cache = time.perf_counter() - t1
    trainer = Trainer(cfg, adapter, train, run_dir, stream=stream)  # type: ignore[arg-type]  # a TokenStream too
    trainer.fit(resume=resume, progress=progress)
    tokens = trainer.step * cfg.batch_size
    if not is_main():  # other torchrun ranks are done once the coders are saved
        return {"run_dir": str(run_dir), "timing": {}, "metrics": None}
    timing = {
        "setup_s": t_setup, "cache_build_s": t_cache, **trainer.timing, "train_tokens": tokens,
        "tokens_per_s": tokens / max(1e-9, trainer.timing["harvest_s"] + trainer.timing["train_s"]),
        "harvest_tokens_per_s": tokens / max(1e-9, trainer.timing["harvest_s"]),
        "coder_tokens_per_s": tokens / max(1e-9, trainer.timing["train_s"]),
    }
    atomic_write_json(run_dir / "timing.json", timing)
    result = {"run_dir": str(run_dir), "timing": timing, "metrics": None, "model_check": check}
    if evaluate and eval_tokens > 0:
        from ..evaluation.run import evaluate_run

        result["metrics"] = evaluate_run(
            run_dir, loaded=loaded, eval_split=evals, eval_sources=eval_sources, progress=progress,
            extra={"training": timing, "model_check": dataclasses.asdict(check) if check else None},
        )
    return result
