"""An on-disk activation cache: harvest once, train many coders (a sweep) from memory-mapped files.

Layout of a cache folder::

    meta.json                 model, layers, token count, dtype, d_model, the stream's settings
    layer_{L}.in.bin          [n_tokens, d_model] MLP inputs, raw bfloat16 (or float32), row-major
    layer_{L}.out.bin         [n_tokens, d_model] MLP outputs

Rows are stored in the shuffled order of the :class:`ActivationStream` that filled the cache,
so batch ``s`` of a :class:`CachedStream` is the same as batch ``s`` of that stream (for the
first ``n_tokens`` tokens; later steps wrap around). bfloat16 halves the disk and memory
traffic and is the dtype the CPU matmuls run in anyway; float16 is never used (it is ~100x
slower on CPU).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..files import atomic_write_json, current_umask, fsync_dir, temp_dir_beside
from .activations import ActivationStream

META = "meta.json"
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class ActivationCacheError(ValueError):
    """A cache folder is missing, incomplete, or was built for other settings."""


def _file(folder: Path, layer: int, which: str) -> Path:
    return folder / f"layer_{layer}.{which}.bin"


def build_cache(stream: ActivationStream, folder: str | os.PathLike, n_tokens: int, *, dtype: str = "bfloat16",
                meta: dict | None = None, progress: bool = True) -> Path:
    """Write the first ``n_tokens`` tokens of ``stream`` (every layer, input and output) into ``folder``.

    ``n_tokens`` is rounded down to whole batches of ``stream.batch_size``. The folder appears
    only when complete: written under a temporary name, every file flushed to disk, then
    renamed. An existing folder is never replaced or deleted: only a missing or empty one is
    filled.

    Raises:
        ActivationCacheError: ``folder`` exists and is not empty (a cache of ours is opened
            with :class:`CachedStream`, anything else is the user's and is left alone).
        ValueError: ``n_tokens`` smaller than one batch, or an unknown dtype.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r} (float16 is too slow on CPU)")
    steps = n_tokens // stream.batch_size
    if steps < 1:
        raise ValueError(f"n_tokens={n_tokens} is less than one batch ({stream.batch_size} tokens)")
    n_tokens = steps * stream.batch_size
    folder = Path(folder)
    _refuse_non_empty(folder)
    tmp = temp_dir_beside(folder)
    try:
        d_model = stream.adapter.d_model
        maps = {}
        for layer in stream.layers:
            for which in ("in", "out"):
                maps[layer, which] = _map(_file(tmp, layer, which), n_tokens, d_model, _DTYPES[dtype], create=True)
        batches = stream.batches(0)
        for step in tqdm(range(steps), desc="cache", disable=not progress):
            batch = next(batches)
            rows = slice(step * stream.batch_size, (step + 1) * stream.batch_size)
            for layer, (x, y) in batch.items():
                maps[layer, "in"][rows] = x.to(_DTYPES[dtype])
                maps[layer, "out"][rows] = y.to(_DTYPES[dtype])
        del maps, batch
        for layer in stream.layers:  # the maps are gone; flush what they wrote before the rename
            for which in ("in", "out"):
                with open(_file(tmp, layer, which), "rb+") as fh:
                    os.fsync(fh.fileno())
                os.chmod(_file(tmp, layer, which), 0o666 & ~current_umask())
        info = {"n_tokens": n_tokens, "d_model": d_model, "layers": stream.layers, "dtype": dtype,
                "batch_size": stream.batch_size, "seed": stream.seed, "block_contexts": stream.block_contexts,
                **(meta or {})}
        atomic_write_json(tmp / META, info)
        fsync_dir(tmp)
        _refuse_non_empty(folder)  # filled by someone else meanwhile?
        if folder.exists():
            folder.rmdir()  # empty, checked just above; rmdir refuses anything else
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _refuse_non_empty(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        what = "a cache of other settings" if (folder / META).exists() else "not an activation cache of ours (no meta.json)"
        raise ActivationCacheError(f"{folder} already exists and is {what}; nothing was changed. Pass an empty or "
                                   "new --activation-cache folder.")


def _map(path: Path, n: int, d: int, dtype: torch.dtype, create: bool = False) -> torch.Tensor:
    nbytes = n * d * torch.empty((), dtype=dtype).element_size()
    if create:
        with open(path, "wb") as fh:
            fh.truncate(nbytes)
    elif not path.is_file() or path.stat().st_size != nbytes:
        raise ActivationCacheError(f"{path} is missing or has the wrong size (expected {nbytes} bytes); rebuild the cache.")
    return torch.from_file(str(path), shared=True, size=n * d, dtype=dtype).view(n, d)


class CachedStream:
    """Batches from a cache folder, with the interface of :class:`ActivationStream`.

    Args:
        folder: a folder written by :func:`build_cache`.
        batch_size: tokens per batch (need not equal the one the cache was built with, but then
            batches no longer coincide with the live stream's).
        layers: layers to read (default: all in the cache).

    Raises:
        ActivationCacheError: missing/incomplete cache, or a layer it does not hold.
    """

    def __init__(self, folder: str | os.PathLike, batch_size: int, layers: list[int] | None = None):
        self.folder = Path(folder)
        meta_path = self.folder / META
        if not meta_path.is_file():
            raise ActivationCacheError(
                f"{self.folder} is not a complete activation cache (no {META}); build it with `transcoders cache`."
            )
        self.meta = json.loads(meta_path.read_text())
        self.layers = sorted(layers if layers is not None else self.meta["layers"])
        missing = set(self.layers) - set(self.meta["layers"])
        if missing:
            raise ActivationCacheError(
                f"cache {self.folder} holds layers {self.meta['layers']}, not {sorted(missing)}: rebuild it with those layers."
            )
        self.batch_size = batch_size
        self.n_tokens = self.meta["n_tokens"]
        dtype = _DTYPES[self.meta["dtype"]]
        self.maps = {(layer, which): _map(_file(self.folder, layer, which), self.n_tokens, self.meta["d_model"], dtype)
                     for layer in self.layers for which in ("in", "out")}

    def batches(self, start_step: int = 0) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """Yield ``{layer: (x [batch_size, d_model], y [batch_size, d_model])}`` forever from step
        ``start_step``, wrapping around the cache."""
        step = start_step
        while True:
            idx = (torch.arange(self.batch_size) + step * self.batch_size) % self.n_tokens
            start = int(idx[0])
            if start + self.batch_size <= self.n_tokens:  # contiguous: a cheap slice of the map
                rows = slice(start, start + self.batch_size)
                yield {
                    layer: (self.maps[layer, "in"][rows].clone(), self.maps[layer, "out"][rows].clone()) for layer in self.layers
                }
            else:
                yield {layer: (self.maps[layer, "in"][idx], self.maps[layer, "out"][idx]) for layer in self.layers}
            step += 1
