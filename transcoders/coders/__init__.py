"""Sparse coders (transcoders, skip transcoders, SAEs) and their on-disk format."""

from .coder import SparseCoder
from .config import CoderConfig
from .formats import FORMATS, read_coder, write_coder
from .io import CoderFileError, check_compatible, load_coder, save_coder

__all__ = ["CoderConfig", "CoderFileError", "FORMATS", "SparseCoder", "check_compatible", "load_coder", "read_coder",
           "save_coder", "write_coder"]
