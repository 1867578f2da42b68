"""Sparse coders (transcoders, skip transcoders, SAEs) and their on-disk format."""

from .coder import SparseCoder
from .config import CoderConfig
from .io import CoderFileError, check_compatible, load_coder, save_coder

__all__ = ["CoderConfig", "CoderFileError", "SparseCoder", "check_compatible", "load_coder", "save_coder"]
