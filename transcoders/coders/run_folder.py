"""Where the coders of a run folder live, and how they are named.

A run folder holds one coder per hookpoint (``layers.6.mlp/``), and in a sweep one per
variant below it (``layers.6.mlp/k64/``). Coders are keyed by :class:`CoderKey`
``(layer, variant)``; its string form (``"6"``, ``"6/k64"``) is only for display, logs and
JSON keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from .io import CONFIG, WEIGHTS, CoderFileError


class CoderKey(NamedTuple):
    """One coder of a run: its layer and its sweep variant (``""`` outside a sweep)."""

    layer: int
    variant: str = ""

    def __str__(self) -> str:
        return f"{self.layer}/{self.variant}" if self.variant else str(self.layer)

    def folder(self, run_dir: str | Path, hookpoint: str) -> Path:
        """``run_dir/<hookpoint>[/<variant>]``."""
        base = Path(run_dir) / hookpoint
        return base / self.variant if self.variant else base


def find_coders(run_dir: str | Path) -> dict[CoderKey, Path]:
    """``{CoderKey: folder}`` for every coder folder under ``run_dir`` (a folder holding
    ``cfg.json`` and ``coder.safetensors``), sorted by layer, then variant.

    Raises:
        CoderFileError: the folder does not exist, holds no coder, or a coder names no layer.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CoderFileError(f"run folder {run_dir} does not exist: pass the folder `transcoders train` wrote.")
    found = {}
    for cfg_path in sorted(run_dir.rglob(CONFIG)):
        if not (cfg_path.parent / WEIGHTS).exists():
            continue  # another tool's cfg.json (a sparsify or SAELens export), not a coder of ours
        try:
            layer = json.loads(cfg_path.read_text()).get("layer")
        except (OSError, ValueError, AttributeError) as exc:
            raise CoderFileError(f"{cfg_path} is unreadable: {exc}") from exc
        if not isinstance(layer, int):
            raise CoderFileError(f"{cfg_path} names no layer; cannot tell where to splice this coder.")
        variant = "/".join(cfg_path.parent.relative_to(run_dir).parts[1:])
        found[CoderKey(layer, variant)] = cfg_path.parent
    if not found:
        raise CoderFileError(f"no coders in {run_dir} (expected <hookpoint>/{CONFIG} + {WEIGHTS}); did training finish?")
    return dict(sorted(found.items()))
