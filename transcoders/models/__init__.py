"""Model loading and per-family adapters (hookpoints and internals)."""

from .adapters import AdapterError, ModelAdapter, adapter_for
from .loading import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model

__all__ = ["AdapterError", "DEFAULT_MODEL", "LoadedModel", "ModelAdapter", "ModelLoadError", "adapter_for", "load_model"]
