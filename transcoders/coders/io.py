"""Save and load coders as ``<folder>/coder.safetensors`` + ``<folder>/cfg.json``.

Writes are atomic (temporary file, fsync, rename), and loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..files import atomic_save_tensors, atomic_write_bytes, signals_deferred
from .coder import SparseCoder
from .config import CoderConfig

__all__ = ["CONFIG", "WEIGHTS", "CoderFileError", "atomic_save_tensors", "atomic_write_bytes", "check_compatible",
           "load_coder", "save_coder"]

WEIGHTS = "coder.safetensors"
CONFIG = "cfg.json"


class CoderFileError(ValueError):
    """A coder folder is missing, truncated, corrupt, or does not match its config."""


def save_coder(coder: SparseCoder, folder: str | os.PathLike) -> Path:
    """Save ``coder`` into ``folder`` (created if needed); return the folder.

    The weights file carries a copy of the config in its metadata, and SIGINT/SIGTERM are held
    back until both files are in place: a signal cannot leave new weights beside an old
    ``cfg.json``, and :func:`load_coder` refuses a pair that does not belong together.
    """
    folder = Path(folder)
    tensors = {name: p for name, p in coder.named_parameters()}
    cfg_json = coder.cfg.model_dump_json(indent=2)
    with signals_deferred():
        atomic_save_tensors(tensors, folder / WEIGHTS, metadata={"cfg": cfg_json})
        atomic_write_bytes(folder / CONFIG, cfg_json.encode())
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
            raise CoderFileError(
                f"{path} is missing: expected a coder folder with {CONFIG} and {WEIGHTS} (written by `transcoders train`)."
            )
    try:
        cfg = CoderConfig.model_validate(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as exc:
        raise CoderFileError(f"{cfg_path} is not a valid coder config: {exc}") from exc
    try:
        with safe_open(w_path, framework="pt") as fh:
            saved_cfg = (fh.metadata() or {}).get("cfg")
        tensors = load_file(w_path, device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CoderFileError(
            f"{w_path} is truncated or corrupt ({exc}); re-save it or retrain (a checkpoint may remain in the run folder)."
        ) from exc
    if saved_cfg is not None:
        try:
            # model_name may be corrected by hand (or by an alias); everything else pairs with the weights
            saved = CoderConfig.model_validate(json.loads(saved_cfg)).model_dump(exclude={"model_name"})
            paired = saved == cfg.model_dump(exclude={"model_name"})
        except (json.JSONDecodeError, ValidationError):
            paired = False
        if not paired:
            raise CoderFileError(f"{w_path} was saved with another config than {cfg_path} (an interrupted save?); "
                                 "save the coder again or retrain it.")
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
        raise CoderFileError(
            f"coder is for layer {cfg.layer}, but this model has {n_layers} layers: load the model it was trained on."
        )


def coders_fingerprint(coders: dict[int, SparseCoder]) -> str:
    """A short hash of a set of coders (``{layer: coder}``): their layers, shapes and every
    weight's bytes. Two sets share a fingerprint only if they compute the same thing; a graph
    records it so that tools reading the graph can tell it belongs to the coders they load."""
    import hashlib

    h = hashlib.blake2b(digest_size=12)
    for layer in sorted(coders):
        coder = coders[layer]
        h.update(f"{layer}:{coder.cfg.kind}:{coder.cfg.activation}:{coder.cfg.k}".encode())
        for name, p in sorted(coder.named_parameters()):
            t = p.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()
