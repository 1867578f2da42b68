"""Training checkpoints: one safetensors file holding every tensor of the run's state
(coder weights, Adam moments, dead-feature counters, data statistics, RNG state) with the
scalar state (step, tokens seen, optimizer hyper-parameters) as JSON in its metadata.

Nothing is pickled. The file is replaced atomically, so a crash mid-save leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..coders.io import atomic_save_tensors

CHECKPOINT = "checkpoint.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or belongs to a different run configuration."""


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``opt.state_dict()`` into named tensors and a JSON-able remainder."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{prefix}.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"], "state_keys": {str(i): list(s) for i, s in sd["state"].items()}}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state = {int(i): {key: tensors[f"{prefix}.{i}.{key}"] for key in keys} for i, keys in meta["state_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any], name: str = CHECKPOINT) -> Path:
    """Atomically write ``run_dir/<name>`` (``checkpoint.safetensors``; one per rank when sharding)."""
    path = Path(run_dir) / name
    atomic_save_tensors(tensors, path, metadata={"state": json.dumps(state)})
    return path


def load_checkpoint(run_dir: Path, name: str = CHECKPOINT) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``run_dir/<name>``: ``(tensors, state)``.

    Raises:
        CheckpointError: missing or unreadable file.
    """
    path = Path(run_dir) / name
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: nothing to resume. Start a new run without --resume.")
    try:
        with safe_open(path, framework="pt") as fh:
            state = json.loads((fh.metadata() or {})["state"])
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt ({exc}); it cannot be resumed. Start a new run.") from exc
    return tensors, state
