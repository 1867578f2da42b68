"""Save and load coders as ``<folder>/coder.safetensors`` + ``<folder>/cfg.json``.

Writes are atomic (temporary file, fsync, rename), and loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .coder import SparseCoder
from .config import CoderConfig

WEIGHTS = "coder.safetensors"
CONFIG = "cfg.json"


class CoderFileError(ValueError):
    """A coder folder is missing, truncated, corrupt, or does not match its config."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors`` save through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_coder(coder: SparseCoder, folder: str | os.PathLike) -> Path:
    """Save ``coder`` into ``folder`` (created if needed); return the folder."""
    folder = Path(folder)
    tensors = {name: p for name, p in coder.named_parameters()}
    atomic_save_tensors(tensors, folder / WEIGHTS)
    atomic_write_bytes(folder / CONFIG, coder.cfg.model_dump_json(indent=2).encode())
    return folder


def load_coder(folder: str | os.PathLike, *, device: str | torch.device = "cpu") -> SparseCoder:
    """Load a coder saved by :func:`save_coder`.

    Raises:
        CoderFileError: the folder or a file is missing, the weights are truncated or corrupt,
            the config is invalid, or a tensor's shape disagrees with the config.
    """
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG, folder / WEIGHTS
    for path in (cfg_path, w_path):
        if not path.is_file():
            raise CoderFileError(f"{path} is missing: expected a coder folder with {CONFIG} and {WEIGHTS} (written by `transcoders train`).")
    try:
        cfg = CoderConfig.model_validate(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as exc:
        raise CoderFileError(f"{cfg_path} is not a valid coder config: {exc}") from exc
    try:
        tensors = load_file(w_path, device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CoderFileError(f"{w_path} is truncated or corrupt ({exc}); re-save it or retrain (a checkpoint may remain in the run folder).") from exc
    coder = SparseCoder(cfg, device=device)
    expected = {name: tuple(p.shape) for name, p in coder.named_parameters()}
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != got:
        raise CoderFileError(f"{w_path} does not match {cfg_path}: expected tensors {expected}, found {got}.")
    with torch.no_grad():
        for name, p in coder.named_parameters():
            p.copy_(tensors[name])
    return coder


def check_compatible(coder: SparseCoder, d_model: int, n_layers: int) -> None:
    """Raise :class:`CoderFileError` if ``coder`` cannot be spliced into a model of this shape."""
    cfg = coder.cfg
    if cfg.d_in != d_model or cfg.d_out != d_model:
        raise CoderFileError(
            f"coder for layer {cfg.layer} of {cfg.model_name!r} has d_in={cfg.d_in}, d_out={cfg.d_out}, "
            f"but this model has d_model={d_model}: load the model it was trained on."
        )
    if cfg.layer is not None and not 0 <= cfg.layer < n_layers:
        raise CoderFileError(f"coder is for layer {cfg.layer}, but this model has {n_layers} layers: load the model it was trained on.")
