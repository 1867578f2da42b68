"""Model loading and per-family adapters (hookpoints and internals)."""

from .adapters import AdapterError, ModelAdapter, adapter_for
from .loading import (
    DEFAULT_MODEL,
    KNOWN_LOCAL_MODELS,
    LoadedModel,
    ModelLoadError,
    canonical_model_name,
    is_known_local_model,
    load_model,
)

__all__ = ["DEFAULT_MODEL", "KNOWN_LOCAL_MODELS", "AdapterError", "LoadedModel", "ModelAdapter", "ModelLoadError",
           "adapter_for", "canonical_model_name", "is_known_local_model", "load_model"]
