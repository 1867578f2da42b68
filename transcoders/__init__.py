"""Transcoders, skip transcoders and SAEs for transformer language models: training, splicing,
attribution graphs, paths and interventions, and feature dashboards, labels and scored explanations.

The names a user imports first are available here, imported lazily (``import transcoders`` does
not import torch or transformers)::

    from transcoders import load_model, load_coder, splice_mlps, coder_replacement
    from transcoders import LocalReplacement, attribute, top_logit_targets, prune, top_paths, format_path
    from transcoders import collect_features, FeaturesConfig, FeatureStore
"""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what static analysers and IDEs see; at run time __getattr__ imports on first use
    from .circuits.attribution import attribute
    from .circuits.export import load_graph, save_graph
    from .circuits.paths import format_path, top_paths
    from .circuits.prune import prune
    from .circuits.replacement import LocalReplacement
    from .circuits.targets import Target, parse_target, top_logit_targets
    from .coders.coder import SparseCoder
    from .coders.io import load_coder, save_coder
    from .evaluation.splice import coder_replacement, splice_mlps
    from .features.collect import collect_features
    from .features.config import FeaturesConfig
    from .features.store import FeatureStore
    from .models.loading import DEFAULT_MODEL, load_model

try:
    __version__: str = _metadata.version("transcoders")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

# public name -> submodule defining it (imported on first access)
_LAZY: dict[str, str] = {
    "DEFAULT_MODEL": ".models.loading",
    "load_model": ".models.loading",
    "SparseCoder": ".coders.coder",
    "load_coder": ".coders.io",
    "save_coder": ".coders.io",
    "splice_mlps": ".evaluation.splice",
    "coder_replacement": ".evaluation.splice",
    "LocalReplacement": ".circuits.replacement",
    "Target": ".circuits.targets",
    "parse_target": ".circuits.targets",
    "top_logit_targets": ".circuits.targets",
    "attribute": ".circuits.attribution",
    "prune": ".circuits.prune",
    "top_paths": ".circuits.paths",
    "format_path": ".circuits.paths",
    "load_graph": ".circuits.export",
    "save_graph": ".circuits.export",
    "collect_features": ".features.collect",
    "FeaturesConfig": ".features.config",
    "FeatureStore": ".features.store",
}

__all__ = [
    "DEFAULT_MODEL", "FeatureStore", "FeaturesConfig", "LocalReplacement", "SparseCoder", "Target", "__version__",
    "attribute", "coder_replacement", "collect_features",
    "format_path", "load_coder", "load_graph", "load_model", "parse_target", "prune", "save_coder", "save_graph",
    "splice_mlps", "top_logit_targets", "top_paths",
]


def __getattr__(name: str):
    """Import a public name from its submodule on first access (PEP 562).

    Raises:
        AttributeError: ``name`` is not a public name of the package.
    """
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'transcoders' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
