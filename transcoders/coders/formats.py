"""Read and write coders in the on-disk formats of other tools.

Every reader returns a :class:`SparseCoder` whose ``forward`` computes what the other tool
computes on the same input (up to float rounding, since some biases are folded); every writer
produces files that tool loads into the same function. Our layout, for reference::

    W_enc [d_sae, d_in]  b_enc [d_sae]  W_dec [d_sae, d_out]  b_dec [d_out]
    W_skip [d_in, d_out] (skip transcoders)   threshold [d_sae] (JumpReLU)
    y = act(x @ W_enc.T + b_enc) @ W_dec + b_dec (+ x @ W_skip)

Formats (``FORMATS``):

- ``transcoders``: ours, ``cfg.json`` + ``coder.safetensors`` (see :mod:`.io`).
- ``sparsify``: EleutherAI sparsify, one ``<hookpoint>/`` folder with ``cfg.json`` +
  ``sae.safetensors``. TopK only.
- ``saelens``: SAELens (version 6 config layout; older configs are read too), ``cfg.json`` +
  ``sae_weights.safetensors``. SAEs (standard/ReLU, JumpReLU, TopK) and transcoders
  (``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``).
- ``circuit-tracer``: a transcoder set, ``config.yaml`` + one ``layer_{i}.safetensors`` per
  layer. ReLU or JumpReLU per-layer transcoders, with or without skip.
- ``dunefsky``: the ``.pt`` files of Dunefsky, Chlenski & Nanda 2024 (arXiv 2406.11944,
  github.com/jacobdunefsky/transcoder_circuits), ReLU transcoders and SAEs. Read with
  ``torch.load(weights_only=True)`` only.

Nothing here ever unpickles arbitrary objects or runs code from a file. Weights are read into
float32 (bfloat16 files convert exactly); folded biases are computed in float64.

Errors: a missing or corrupt file, a missing tensor or a shape that disagrees with the config
raises :class:`CoderFileError`; a format we do not know, a file we cannot tell the format of, or
a coder the target format cannot express raises ``ValueError``; passing one coder where a set
is needed (or the reverse) raises ``TypeError``.
"""

from __future__ import annotations

import io as _io
import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..models.loading import canonical_model_name
from .coder import SparseCoder
from .config import CoderConfig
from .io import CONFIG, WEIGHTS, CoderFileError, atomic_save_tensors, atomic_write_bytes, load_coder, save_coder

FORMATS = ("transcoders", "sparsify", "saelens", "circuit-tracer", "dunefsky")

SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
CIRCUIT_TRACER_CONFIG = "config.yaml"
SAELENS_VERSION_WRITTEN = "6.0.0"  # we write the SAELens >= 6 config layout

__all__ = [
    "FORMATS",
    "detect_format",
    "read_circuit_tracer",
    "read_coder",
    "read_dunefsky",
    "read_saelens",
    "read_sparsify",
    "write_circuit_tracer",
    "write_coder",
    "write_dunefsky",
    "write_saelens",
    "write_sparsify",
]

PathLike = str | os.PathLike


# ====================================================================== dispatch
def _normalise_format(fmt: str) -> str:
    name = str(fmt).strip().lower().replace("_", "-")
    name = {"sae-lens": "saelens", "circuittracer": "circuit-tracer", "ours": "transcoders"}.get(name, name)
    if name not in FORMATS:
        raise ValueError(f"unknown coder format {fmt!r}: expected one of {', '.join(FORMATS)}.")
    return name


def detect_format(path: PathLike) -> str:
    """Name the format of ``path`` (a folder, or a file in one) from the files it holds.

    Raises:
        CoderFileError: ``path`` does not exist.
        ValueError: nothing there looks like any of ``FORMATS``.
    """
    path = Path(path)
    if not path.exists():
        raise CoderFileError(
            f"{path} does not exist: expected a coder folder or file in one of the formats {', '.join(FORMATS)}."
        )
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return "dunefsky"
        if path.suffix in (".yaml", ".yml"):
            return "circuit-tracer"
        by_name = {WEIGHTS: "transcoders", SPARSIFY_WEIGHTS: "sparsify", SAELENS_WEIGHTS: "saelens"}
        if path.name in by_name:
            return by_name[path.name]
        if path.name == CONFIG:
            return detect_format(path.parent)
        raise ValueError(
            f"cannot tell the coder format of file {path}: expected a folder, a .pt file (dunefsky) "
            f"or a config.yaml (circuit-tracer); formats are {', '.join(FORMATS)}."
        )
    if (path / WEIGHTS).is_file():
        return "transcoders"
    if (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    if (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (path / CIRCUIT_TRACER_CONFIG).is_file():
        return "circuit-tracer"
    nested = sorted(p.parent.name for name in (WEIGHTS, SPARSIFY_WEIGHTS, SAELENS_WEIGHTS) for p in path.glob(f"*/{name}"))
    hint = f" It has coder subfolders ({', '.join(nested[:8])}): pass one of them." if nested else ""
    raise ValueError(
        f"cannot tell the coder format of folder {path}: it holds none of {WEIGHTS}, {SPARSIFY_WEIGHTS}, "
        f"{SAELENS_WEIGHTS}, {CIRCUIT_TRACER_CONFIG}; formats are {', '.join(FORMATS)}.{hint}"
    )


def read_coder(
    path: PathLike, format: str | None = None, *, device: str | torch.device = "cpu", **kwargs: Any
) -> SparseCoder | dict[int, SparseCoder]:
    """Read a coder (or, for ``circuit-tracer``, a ``{layer: coder}`` set) in any of ``FORMATS``.

    ``format=None`` detects it from the files (:func:`detect_format`). Extra keyword arguments
    go to the format's reader (e.g. ``kind=`` for sparsify, ``allow_topk=`` for circuit-tracer).
    """
    fmt = detect_format(path) if format is None else _normalise_format(format)
    if fmt == "transcoders":
        p = Path(path)
        return load_coder(p.parent if p.is_file() else p, device=device, **kwargs)
    return _READERS[fmt](path, device=device, **kwargs)


def write_coder(coder_or_coders: SparseCoder | Mapping[int, SparseCoder], path: PathLike, format: str, **kwargs: Any) -> Path:
    """Write a coder (or, for ``circuit-tracer``, a ``{layer: coder}`` set) in ``format``.

    ``path`` is the folder to write (the ``.pt`` file for ``dunefsky``); the written path is
    returned. Extra keyword arguments go to the format's writer.

    Raises:
        ValueError: unknown format, or a coder the format cannot express exactly.
        TypeError: a single coder given for circuit-tracer, or a set for any other format.
    """
    fmt = _normalise_format(format)
    if fmt == "circuit-tracer":
        return write_circuit_tracer(coder_or_coders, path, **kwargs)  # type: ignore[arg-type]
    if not isinstance(coder_or_coders, SparseCoder):
        raise TypeError(
            f"format {fmt!r} holds one coder, got {type(coder_or_coders).__name__}; "
            "write each coder of a set to its own path (only circuit-tracer holds a set)."
        )
    if fmt == "transcoders":
        return save_coder(coder_or_coders, path, **kwargs)
    return _WRITERS[fmt](coder_or_coders, path, **kwargs)


# ====================================================================== shared helpers
def _folder(path: PathLike, *names: str) -> Path:
    """``path`` itself, or its folder when it names one of the format's files."""
    path = Path(path)
    return path.parent if path.is_file() and path.name in names else path


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CoderFileError(f"{path} is missing.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CoderFileError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CoderFileError(f"{path} should hold a JSON object, found {type(data).__name__}.")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CoderFileError(f"{path} is missing.")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CoderFileError(f"{path} is truncated or corrupt: {exc}") from exc


def _require(tensors: Mapping[str, Any], names: tuple[str, ...], path: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CoderFileError(f"{path} lacks tensor(s) {missing}; found {sorted(tensors)}.")


def _check_shape(path: Path, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise CoderFileError(
            f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape} from the other tensors and the config."
        )


def _f64(t: torch.Tensor) -> torch.Tensor:
    """A vector (bias, threshold) in float64 for exact-as-possible folding."""
    return t.detach().to("cpu", torch.float64)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """A matrix in float32, our parameters' dtype (no copy when it already is)."""
    return t.detach().to("cpu", torch.float32)


def _matvec(W: torch.Tensor, v: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """``W [m, n] @ v [n]`` accumulated in float64, a block of rows at a time (no float64 copy
    of a large ``W``)."""
    v = v.to(torch.float64)
    return torch.cat([W[i : i + rows].to(torch.float64) @ v for i in range(0, W.shape[0], rows)])


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy of a config value (dtypes, devices and other objects become strings)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _build(
    path: Path,
    *,
    kind: str,
    activation: str,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    W_skip: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    k: int | None = None,
    device: str | torch.device = "cpu",
    **meta: Any,
) -> SparseCoder:
    """A coder from tensors already in our layout (shapes checked here)."""
    d_sae, d_in = W_enc.shape
    d_out = W_dec.shape[1]
    _check_shape(path, "b_enc", b_enc, (d_sae,))
    _check_shape(path, "W_dec", W_dec, (d_sae, d_out))
    _check_shape(path, "b_dec", b_dec, (d_out,))
    if W_skip is not None:
        _check_shape(path, "W_skip", W_skip, (d_in, d_out))
    if threshold is not None:
        _check_shape(path, "threshold", threshold, (d_sae,))
    try:
        cfg = CoderConfig(
            kind=kind, activation=activation, d_in=d_in, d_out=d_out, d_sae=d_sae, k=k if activation == "topk" else None, **meta
        )
    except ValidationError as exc:
        raise CoderFileError(f"{path} does not describe a valid coder: {exc}") from exc
    coder = SparseCoder(cfg, device=device)
    values = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "W_skip": W_skip, "threshold": threshold}
    with torch.no_grad():
        for name, p in coder.named_parameters():
            src = values[name]
            if src is None:
                raise CoderFileError(f"{path}: a {kind} with {activation} activation needs {name!r}, which the file lacks.")
            p.copy_(src)
    return coder


def _check_writable(coder: SparseCoder, fmt: str, kinds: dict[str, tuple[str, ...]]) -> None:
    """Raise ValueError unless ``(kind, activation)`` is in ``kinds`` (kind -> activations)."""
    kind, act = coder.cfg.kind, coder.cfg.activation
    if act == "batchtopk":
        raise ValueError(
            f"{fmt} cannot hold a BatchTopK coder mid-training: "
            "finish training (saved BatchTopK coders are JumpReLU) and write that."
        )
    if act not in kinds.get(kind, ()):
        ok = "; ".join(f"{k}: {', '.join(a)}" for k, a in kinds.items())
        raise ValueError(f"{fmt} cannot express a {kind} with {act} activation exactly; it supports {ok}.")


_TL_IN = re.compile(r"^blocks\.(\d+)\.(?:ln2\.hook_normalized|mlp\.hook_in)$")
_TL_OUT = re.compile(r"^blocks\.(\d+)\.(?:hook_mlp_out|mlp\.hook_out)$")
_OURS_HOOK = re.compile(r"^layers\.(\d+)\.mlp\.(input|output)$")
_LAYER = re.compile(r"(?:^|[._/])(?:layers|blocks|layer|h)[._](\d+)(?=$|[._/])")


def _hook_from_tl(name: str | None) -> str:
    """TransformerLens / circuit-tracer MLP hook names -> ours (``layers.{i}.mlp.input|output``);
    anything else is kept as it is."""
    if not name:
        return ""
    if m := _TL_IN.match(name):
        return f"layers.{m.group(1)}.mlp.input"
    if m := _TL_OUT.match(name):
        return f"layers.{m.group(1)}.mlp.output"
    return name


def _hook_to_tl(name: str) -> str:
    """Ours -> TransformerLens: the MLP input is ``blocks.{i}.ln2.hook_normalized`` (after the
    pre-MLP norm), its output ``blocks.{i}.hook_mlp_out``; anything else is kept."""
    if m := _OURS_HOOK.match(name):
        return f"blocks.{m.group(1)}.ln2.hook_normalized" if m.group(2) == "input" else f"blocks.{m.group(1)}.hook_mlp_out"
    return name


def _layer_of(*names: Any) -> int | None:
    for name in names:
        if isinstance(name, str) and (m := _LAYER.search(name)):
            return int(m.group(1))
    return None


# ====================================================================== EleutherAI sparsify
def read_sparsify(path: PathLike, *, kind: str | None = None, device: str | torch.device = "cpu") -> SparseCoder:
    """Read an EleutherAI sparsify coder folder ``<hookpoint>/{cfg.json, sae.safetensors}``.

    Sparsify (github.com/EleutherAI/sparsify, and its predecessor ``sae``) stores
    ``encoder.weight [d_sae, d_in]``, ``encoder.bias [d_sae]``, ``W_dec [d_sae, d_in]``,
    ``b_dec [d_in]`` and, with ``skip_connection``, ``W_skip [d_in, d_in]`` (applied as
    ``x @ W_skip.mT``, i.e. stored ``[d_out, d_in]``). Input and output widths are equal.
    Its forward (``SparseCoder.encode/decode/forward``)::

        x_enc = x - b_dec   if not cfg["transcode"]   else x
        top_acts, top_idx = relu(x_enc @ encoder.weight.T + encoder.bias).topk(k)
        y = sum_j top_acts_j * W_dec[top_idx_j] + b_dec (+ x @ W_skip.mT)

    The top k of the ReLU'd pre-activations equal the ReLU of the top k, so this is our TopK
    with ``b_enc = encoder.bias - encoder.weight @ b_dec`` when the input is centred.

    Assumptions, from the sparsify history: every version subtracts ``b_dec`` from the input
    unless the stored config says ``transcode: true``. Configs written before February 2025
    have no ``transcode`` key (transcoding was a training option then, and those versions
    subtracted ``b_dec`` even when transcoding), so a missing key means "subtract". The kind
    is ``skip_transcoder`` with a skip connection, else ``transcoder`` if ``transcode`` is
    true, else ``sae``; pass ``kind=`` to override the label (the maths is the same).
    ``multi_topk`` is a training loss only. ``activation: groupmax`` and the old ``signed``
    option are refused (ValueError).

    Hookpoints: the folder name is the module sparsify hooked; a transcoder reads its input and
    writes its output (``<name>.input``/``<name>.output``), an SAE reads its output.
    """
    folder = _folder(path, CONFIG, SPARSIFY_WEIGHTS)
    cfg_path, w_path = folder / CONFIG, folder / SPARSIFY_WEIGHTS
    raw = _read_json(cfg_path)
    tensors = _read_safetensors(w_path)
    if raw.get("activation", "topk") != "topk":
        raise ValueError(f"{cfg_path}: sparsify activation {raw['activation']!r} is not supported (only topk).")
    if raw.get("signed", False):
        raise ValueError(f"{cfg_path}: sparsify 'signed' TopK (top k by absolute value) is not supported.")
    for key in ("d_in", "k"):
        if key not in raw:
            raise CoderFileError(f"{cfg_path} lacks {key!r}: not a sparsify config.")
    _require(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), w_path)
    d_in = int(raw["d_in"])
    d_sae = int(raw.get("num_latents") or 0) or d_in * int(raw.get("expansion_factor", 32))
    transcode = bool(raw.get("transcode", False))
    skip = bool(raw.get("skip_connection", False))
    if skip:
        _require(tensors, ("W_skip",), w_path)
    W_enc, b_enc = _f32(tensors["encoder.weight"]), _f64(tensors["encoder.bias"])
    W_dec, b_dec = _f32(tensors["W_dec"]), _f64(tensors["b_dec"])
    _check_shape(w_path, "encoder.weight", W_enc, (d_sae, d_in))
    _check_shape(w_path, "W_dec", W_dec, (d_sae, d_in))
    _check_shape(w_path, "b_dec", b_dec, (d_in,))
    _check_shape(w_path, "encoder.bias", b_enc, (d_sae,))
    if not transcode:
        b_enc = b_enc - _matvec(W_enc, b_dec)
    W_skip = None
    if skip:
        W_skip = _f32(tensors["W_skip"])
        _check_shape(w_path, "W_skip", W_skip, (d_in, d_in))
        W_skip = W_skip.T
    if kind is None:
        kind = "skip_transcoder" if skip else ("transcoder" if transcode else "sae")
    elif kind not in ("transcoder", "skip_transcoder", "sae"):
        raise ValueError(f"kind must be transcoder, skip_transcoder or sae, got {kind!r}.")
    elif (kind == "skip_transcoder") != skip:
        raise ValueError(f"kind={kind!r} does not match {cfg_path} (skip_connection={skip}).")
    hook = folder.resolve().name
    hook_in = f"{hook}.input" if transcode else f"{hook}.output"
    return _build(
        folder, kind=kind, activation="topk", k=int(raw["k"]), W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
        W_skip=W_skip, device=device, layer=_layer_of(hook), hookpoint_in=hook_in,
        hookpoint_out=f"{hook}.output", training={"source_format": "sparsify", "source_config": _jsonable(raw)},
    )


def write_sparsify(coder: SparseCoder, path: PathLike) -> Path:
    """Write ``coder`` as a sparsify ``<hookpoint>/`` folder at ``path`` (created if needed).

    Name the folder after the hookpoint (e.g. ``run/layers.6.mlp``): sparsify's
    ``SparseCoder.load_many`` keys coders by folder name and hooks that module, and for an SAE
    it reads the module's *output*. Sparsify only has TopK coders with ``d_in == d_out``; an
    SAE is written with ``transcode: false`` and ``encoder.bias = b_enc + W_enc @ b_dec``
    (sparsify subtracts ``b_dec`` from its input), a (skip) transcoder with ``transcode: true``.
    """
    _check_writable(coder, "sparsify", {"transcoder": ("topk",), "skip_transcoder": ("topk",), "sae": ("topk",)})
    cfg = coder.cfg
    if cfg.d_in != cfg.d_out:
        raise ValueError(f"sparsify coders map d_in to d_in, but this one maps {cfg.d_in} to {cfg.d_out}.")
    folder = Path(path)
    W_enc, b_enc, b_dec = _f32(coder.W_enc), _f64(coder.b_enc), _f64(coder.b_dec)
    transcode = cfg.kind != "sae"
    if not transcode:
        b_enc = b_enc + _matvec(W_enc, b_dec)
    tensors = {"encoder.weight": W_enc, "encoder.bias": b_enc, "W_dec": _f32(coder.W_dec), "b_dec": b_dec}
    if coder.W_skip is not None:
        tensors["W_skip"] = _f32(coder.W_skip).T
    raw = {
        "activation": "topk",
        "expansion_factor": max(1, cfg.d_sae // cfg.d_in),
        "normalize_decoder": False,
        "num_latents": cfg.d_sae,
        "k": cfg.k,
        "multi_topk": False,
        "skip_connection": coder.W_skip is not None,
        "transcode": transcode,
        "d_in": cfg.d_in,
    }
    atomic_save_tensors({n: t.float().contiguous() for n, t in tensors.items()}, folder / SPARSIFY_WEIGHTS)
    atomic_write_bytes(folder / CONFIG, json.dumps(raw, indent=2).encode())
    return folder


# ====================================================================== SAELens
_SAELENS_SAE = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
_SAELENS_TRANSCODER = {
    "transcoder": ("transcoder", "relu"),
    "skip_transcoder": ("skip_transcoder", "relu"),
    "jumprelu_transcoder": ("transcoder", "jumprelu"),
}


def read_saelens(path: PathLike, *, device: str | torch.device = "cpu") -> SparseCoder:
    """Read a SAELens folder ``{cfg.json, sae_weights.safetensors}`` (``SAE.save_model``).

    Tensors: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec
    [d_out]``; JumpReLU adds ``threshold [d_sae]`` (or ``log_threshold``, read as its exp);
    the skip transcoder adds ``W_skip [d_out, d_in]`` applied as ``x @ W_skip.T``.
    Architectures and their forward in SAELens 6 (``sae_lens/saes/*.py``)::

        standard             f = relu(pre)
        jumprelu             f = relu(pre) * (pre > threshold)
        topk                 f = relu(topk(pre, k))        (k: cfg "k", or the pre-6
                                                           activation_fn_kwargs["k"])
        transcoder           f = relu(pre)
        skip_transcoder      f = relu(pre), y += x @ W_skip.T
        jumprelu_transcoder  f = relu(pre) * (pre > threshold)
        pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc   (SAEs)
        pre = x @ W_enc + b_enc                                  (transcoders ignore the flag)
        y = f @ W_dec + b_dec

    Conversions: the ``b_dec`` centring is folded into ``b_enc``; a JumpReLU threshold below 0
    becomes 0 (``relu(p) * (p > t) == p * (p > max(t, 0))``); ``rescale_acts_by_decoder_norm``
    (TopK ranks ``pre * |W_dec_i|`` and decodes with unit-norm rows) is folded as SAELens's own
    ``fold_W_dec_norm`` does (``W_enc``, ``b_enc`` times the row norms, ``W_dec`` divided); a
    pre-6 ``scaling_factor`` (finetuning scaling, multiplies ``f``) is folded into ``W_dec``.
    SAEs are kind ``sae``; a config with ``d_out`` is a transcoder.

    Assumptions: ``normalize_activations`` must be ``none`` or ``expected_average_only_in``
    (SAELens's ``load_from_disk`` applies no runtime transform for the latter; its scaling
    factor, if any, lives outside the folder). ``constant_norm_rescale`` and ``layer_norm``
    normalise each token and cannot be expressed by a linear coder (ValueError), nor can the
    ``gated`` architecture. ``hook_z`` SAEs read heads flattened to ``n_heads * d_head``.
    """
    folder = _folder(path, CONFIG, SAELENS_WEIGHTS)
    cfg_path, w_path = folder / CONFIG, folder / SAELENS_WEIGHTS
    raw = _read_json(cfg_path)
    tensors = _read_safetensors(w_path)
    meta = {**raw, **(raw.get("metadata") or {})}
    arch = raw.get("architecture", "standard")
    act_fn = raw.get("activation_fn", raw.get("activation_fn_str"))
    act_kwargs = raw.get("activation_fn_kwargs") or {}
    if arch == "standard" and act_fn == "topk":  # pre-6 TopK: architecture "standard" + activation_fn "topk"
        arch = "topk"
    if arch == "standard" and act_fn not in (None, "relu"):
        raise ValueError(f"{cfg_path}: SAELens activation_fn {act_fn!r} is not supported (relu, topk, jumprelu are).")
    if arch in _SAELENS_SAE:
        kind, activation = "sae", _SAELENS_SAE[arch]
    elif arch in _SAELENS_TRANSCODER:
        kind, activation = _SAELENS_TRANSCODER[arch]
    else:
        raise ValueError(
            f"{cfg_path}: SAELens architecture {arch!r} is not supported; "
            f"supported: {', '.join([*_SAELENS_SAE, *_SAELENS_TRANSCODER])}."
        )
    norm = raw.get("normalize_activations", "none")
    if norm is True:
        norm = "expected_average_only_in"
    if norm not in (None, False, "none", "expected_average_only_in"):
        raise ValueError(
            f"{cfg_path}: normalize_activations={norm!r} rescales every token at run time, which a linear coder cannot express."
        )

    _require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), w_path)
    W_enc_t, W_dec = _f32(tensors["W_enc"]), _f32(tensors["W_dec"])
    b_enc, b_dec = _f64(tensors["b_enc"]), _f64(tensors["b_dec"])
    if W_enc_t.ndim != 2 or W_dec.ndim != 2:
        raise CoderFileError(
            f"{w_path}: W_enc and W_dec should be matrices, found shapes {tuple(W_enc_t.shape)} and {tuple(W_dec.shape)}."
        )
    d_in, d_sae = int(raw.get("d_in", W_enc_t.shape[0])), int(raw.get("d_sae", W_enc_t.shape[1]))
    d_out = int(raw.get("d_out", d_in))
    _check_shape(w_path, "W_enc", W_enc_t, (d_in, d_sae))
    _check_shape(w_path, "W_dec", W_dec, (d_sae, d_out))
    _check_shape(w_path, "b_dec", b_dec, (d_out,))
    _check_shape(w_path, "b_enc", b_enc, (d_sae,))
    W_enc = W_enc_t.T

    scale = tensors.get("scaling_factor", tensors.get("finetuning_scaling_factor"))
    if scale is not None and not torch.all(scale == 1):
        if not raw.get("finetuning_scaling_factor", "finetuning_scaling_factor" in tensors):
            raise CoderFileError(
                f"{w_path} has a scaling_factor but {cfg_path} says finetuning_scaling_factor is false "
                "(SAELens refuses this too)."
            )
        _check_shape(w_path, "scaling_factor", scale, (d_sae,))
        W_dec = W_dec * _f32(scale)[:, None]

    threshold = None
    if activation == "jumprelu":
        if "threshold" in tensors:
            threshold = _f64(tensors["threshold"])
        elif "log_threshold" in tensors:
            threshold = _f64(tensors["log_threshold"]).exp()
        else:
            raise CoderFileError(f"{w_path}: a {arch} SAE needs 'threshold' (or 'log_threshold'); found {sorted(tensors)}.")
        _check_shape(w_path, "threshold", threshold, (d_sae,))
        threshold = threshold.clamp_min(0.0)

    k = None
    if activation == "topk":
        k = raw.get("k", act_kwargs.get("k"))
        if k is None:
            raise CoderFileError(f"{cfg_path}: a topk SAE needs 'k' (or activation_fn_kwargs.k).")
        if raw.get("rescale_acts_by_decoder_norm", False):
            norms = W_dec.norm(dim=1)
            W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms.double(), W_dec / norms[:, None]

    if kind == "sae" and raw.get("apply_b_dec_to_input", True):
        b_enc = b_enc - _matvec(W_enc, b_dec)

    W_skip = None
    if kind == "skip_transcoder":
        _require(tensors, ("W_skip",), w_path)
        W_skip = _f32(tensors["W_skip"])
        _check_shape(w_path, "W_skip", W_skip, (d_out, d_in))
        W_skip = W_skip.T

    hook_in = meta.get("hook_name") or meta.get("hook_point") or ""
    hook_out = meta.get("hook_name_out") or (hook_in if kind == "sae" else "")
    layer = meta.get("hook_layer", meta.get("hook_point_layer"))
    return _build(
        folder, kind=kind, activation=activation, k=k, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
        W_skip=W_skip, threshold=threshold, device=device, model_name=str(meta.get("model_name") or ""),
        layer=int(layer) if layer is not None else _layer_of(hook_in), hookpoint_in=_hook_from_tl(hook_in),
        hookpoint_out=_hook_from_tl(hook_out), training={"source_format": "saelens", "source_config": _jsonable(raw)},
    )


def write_saelens(coder: SparseCoder, path: PathLike, *, hook_name: str | None = None, hook_name_out: str | None = None) -> Path:
    """Write ``coder`` as a SAELens (>= 6) folder loadable with ``SAE.load_from_disk(path)``.

    SAEs become ``standard`` / ``jumprelu`` / ``topk`` with ``apply_b_dec_to_input: false`` (so
    no bias is folded), transcoders ``transcoder`` / ``jumprelu_transcoder``, ReLU skip
    transcoders ``skip_transcoder``. Hook names default to our hookpoints translated to
    TransformerLens (``layers.6.mlp.input`` -> ``blocks.6.ln2.hook_normalized``,
    ``layers.6.mlp.output`` -> ``blocks.6.hook_mlp_out``); override with ``hook_name`` and
    ``hook_name_out``. SAELens has no TopK transcoder and no JumpReLU skip transcoder, and its
    JumpReLU applies a ReLU first, so a negative threshold cannot be written (ValueError).
    """
    _check_writable(
        coder, "SAELens", {"sae": ("relu", "jumprelu", "topk"), "transcoder": ("relu", "jumprelu"), "skip_transcoder": ("relu",)}
    )
    cfg = coder.cfg
    if coder.threshold is not None and bool((coder.threshold < 0).any()):
        n = int((coder.threshold < 0).sum())
        raise ValueError(
            f"SAELens JumpReLU computes relu(pre) * (pre > threshold), so it cannot express our {n} negative threshold(s), "
            "which let negative activations through."
        )
    if cfg.kind == "sae":
        arch = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[cfg.activation]
    else:
        arch = {
            "skip_transcoder": "skip_transcoder",
            "transcoder": "transcoder" if cfg.activation == "relu" else "jumprelu_transcoder",
        }[cfg.kind]
    tensors = {"W_enc": _f32(coder.W_enc).T, "b_enc": _f32(coder.b_enc), "W_dec": _f32(coder.W_dec), "b_dec": _f32(coder.b_dec)}
    if coder.threshold is not None:
        tensors["threshold"] = _f32(coder.threshold)
    if coder.W_skip is not None:
        tensors["W_skip"] = _f32(coder.W_skip).T
    hook_in = hook_name if hook_name is not None else _hook_to_tl(cfg.hookpoint_in)
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_VERSION_WRITTEN,
        "sae_lens_training_version": SAELENS_VERSION_WRITTEN,
        "model_name": canonical_model_name(cfg.model_name),
        "hook_name": hook_in,
        "hook_layer": cfg.layer,
        "hook_head_index": None,
        "converted_from": "transcoders",
    }
    raw: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if cfg.kind != "sae":
        raw["d_out"] = cfg.d_out
        metadata["hook_name_out"] = hook_name_out if hook_name_out is not None else _hook_to_tl(cfg.hookpoint_out)
    if cfg.activation == "topk":
        raw["k"] = cfg.k
        raw["rescale_acts_by_decoder_norm"] = False
    raw["metadata"] = metadata
    folder = Path(path)
    atomic_save_tensors({n: t.float().contiguous() for n, t in tensors.items()}, folder / SAELENS_WEIGHTS)
    atomic_write_bytes(folder / CONFIG, json.dumps(raw, indent=2).encode())
    return folder


# ====================================================================== circuit-tracer
def _yaml():
    try:
        import yaml  # PyYAML: installed with transformers, accelerate and datasets
    except ImportError as exc:  # pragma: no cover - PyYAML comes with our dependencies
        raise ImportError("reading or writing circuit-tracer config.yaml needs PyYAML (`pip install pyyaml`).") from exc
    return yaml


def read_yaml_mapping(cfg_path: Path) -> dict[str, Any]:
    """The mapping a circuit-tracer ``config.yaml`` holds (``safe_load``: plain values only).

    Raises:
        CoderFileError: the file is not valid YAML or not a mapping.
    """
    try:
        raw = _yaml().safe_load(cfg_path.read_text())
    except (_yaml().YAMLError, UnicodeDecodeError) as exc:
        raise CoderFileError(f"{cfg_path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise CoderFileError(f"{cfg_path} should hold a YAML mapping, found {type(raw).__name__}.")
    return raw


def read_circuit_tracer(
    path: PathLike, *, allow_topk: bool = False, device: str | torch.device = "cpu"
) -> dict[int, SparseCoder]:
    """Read a circuit-tracer transcoder set: ``config.yaml`` + per-layer ``.safetensors``.

    ``config.yaml`` (github.com/decoderesearch/circuit-tracer, ``utils/hf_utils.py``) holds
    ``model_kind: transcoder_set``, ``model_name``, ``feature_input_hook`` (e.g.
    ``mlp.hook_in``), ``feature_output_hook`` (``mlp.hook_out``) and ``transcoders``: the path
    of layer i's file at position i. Without ``transcoders``, ``layer_{i}.safetensors`` next to
    the config are used. Each file (``SingleLayerTranscoder.to_safetensors``) holds ``W_enc
    [d_sae, d_model]`` (applied as ``F.linear(x, W_enc, b_enc)``, our layout), ``W_dec [d_sae,
    d_model]``, ``b_enc [d_sae]``, ``b_dec [d_model]``, optionally ``W_skip [d_model,
    d_model]`` (applied as ``x @ W_skip.T``) and ``activation_function.threshold [d_sae]``.
    The activation is JumpReLU ``p * (p > threshold)`` when the threshold is present, else
    ReLU; ``activation: relu`` in the config forces ReLU.

    Relative paths in ``transcoders`` are resolved against the config's folder (circuit-tracer
    itself resolves them against its working directory); ``hf://`` paths must be downloaded
    first. circuit-tracer >= 0.5 also reads ``activation: topk`` with ``k``; its TopK keeps the
    k largest pre-activations *without* a ReLU, while ours zeroes negative ones, so the two
    differ on tokens with fewer than k positive pre-activations: such a set is refused unless
    ``allow_topk=True``. Cross-layer transcoders and Gemma Scope ``.npz`` files are refused.

    Returns:
        ``{layer: coder}`` for layers ``0..n-1``, each a ``transcoder`` (or
        ``skip_transcoder``) with hookpoints ``layers.{i}.mlp.input/output`` when the hooks are
        circuit-tracer's MLP hooks.
    """
    path = Path(path)
    cfg_path = path if path.is_file() else path / CIRCUIT_TRACER_CONFIG
    if not cfg_path.is_file():
        raise CoderFileError(
            f"{cfg_path} is missing: expected a circuit-tracer transcoder set (config.yaml + layer_{{i}}.safetensors)."
        )
    folder = cfg_path.parent
    raw = read_yaml_mapping(cfg_path)
    model_kind = raw.get("model_kind")
    if model_kind != "transcoder_set":
        raise ValueError(
            f"{cfg_path}: model_kind {model_kind!r} is not supported; "
            "only per-layer transcoder sets (model_kind: transcoder_set) are."
        )
    activation = raw.get("activation")
    if activation == "topk":
        if not allow_topk:
            raise ValueError(
                f"{cfg_path} holds TopK transcoders: circuit-tracer's TopK keeps negative values among the top k, "
                "ours zeroes them, so they agree only on tokens with at least k positive pre-activations; "
                "pass allow_topk=True to read them as our TopK anyway."
            )
        if raw.get("k") is None:
            raise CoderFileError(f"{cfg_path}: activation topk needs 'k'.")
    hook_in, hook_out = str(raw.get("feature_input_hook", "")), str(raw.get("feature_output_hook", ""))

    if "transcoders" in raw:
        entries = raw["transcoders"]
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise CoderFileError(f"{cfg_path}: 'transcoders' should be a list of file paths.")
        files = []
        for entry in entries:
            if entry.startswith("hf://"):
                raise ValueError(
                    f"{cfg_path} names a Hugging Face file ({entry}): download the set "
                    "(e.g. with huggingface_hub.snapshot_download) and point its config at the local files."
                )
            p = Path(entry)
            files.append(p if p.is_absolute() else folder / p)
    else:
        n = len(list(folder.glob("layer_*.safetensors")))
        files = [folder / f"layer_{i}.safetensors" for i in range(n)]
    if not files:
        raise CoderFileError(f"{cfg_path} names no transcoder files and {folder} has no layer_*.safetensors.")

    coders: dict[int, SparseCoder] = {}
    for layer, file in enumerate(files):
        if file.suffix == ".npz":
            raise ValueError(f"{file}: Gemma Scope .npz transcoders are not supported; convert them to safetensors first.")
        t = _read_safetensors(file)
        _require(t, ("W_enc", "W_dec", "b_enc", "b_dec"), file)
        W_enc, W_dec, b_enc, b_dec = _f32(t["W_enc"]), _f32(t["W_dec"]), _f32(t["b_enc"]), _f32(t["b_dec"])
        d_sae, d_model = b_enc.shape[0], b_dec.shape[0]
        _check_shape(file, "W_enc", W_enc, (d_sae, d_model))
        _check_shape(file, "W_dec", W_dec, (d_sae, d_model))
        W_skip = None
        if "W_skip" in t:
            W_skip = _f32(t["W_skip"])
            _check_shape(file, "W_skip", W_skip, (d_model, d_model))
            W_skip = W_skip.T
        threshold = None
        if activation == "topk":
            act = "topk"
        elif activation != "relu" and "activation_function.threshold" in t:
            act, threshold = "jumprelu", _f32(t["activation_function.threshold"])
        else:
            act = "relu"
        coders[layer] = _build(
            file, kind="skip_transcoder" if W_skip is not None else "transcoder", activation=act,
            k=int(raw["k"]) if act == "topk" else None, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
            W_skip=W_skip, threshold=threshold, device=device, model_name=str(raw.get("model_name") or ""), layer=layer,
            hookpoint_in=_hook_from_tl(f"blocks.{layer}.{hook_in}"), hookpoint_out=_hook_from_tl(f"blocks.{layer}.{hook_out}"),
            training={"source_format": "circuit-tracer", "source_config": _jsonable(raw), "source_file": file.name},
        )
    return coders


def write_circuit_tracer(
    coders: Mapping[int, SparseCoder],
    path: PathLike,
    *,
    model_name: str | None = None,
    feature_input_hook: str = "mlp.hook_in",
    feature_output_hook: str = "mlp.hook_out",
    absolute_paths: bool = False,
    allow_topk: bool = False,
) -> Path:
    """Write ``{layer: coder}`` as a circuit-tracer transcoder set in folder ``path``.

    Writes ``layer_{i}.safetensors`` (circuit-tracer's layout, see :func:`read_circuit_tracer`)
    and ``config.yaml`` listing them. circuit-tracer needs one transcoder for every layer
    ``0..n-1``, all with the same ``d_sae`` and width and all with or all without a skip
    connection. It builds ReLU or JumpReLU from the files; circuit-tracer 0.4.x and earlier
    cannot load TopK transcoders from disk at all, so TopK is refused unless
    ``allow_topk=True``, which writes ``activation: topk`` and ``k`` for circuit-tracer >= 0.5
    (whose TopK keeps negative values among the top k; see :func:`read_circuit_tracer`).

    circuit-tracer resolves the listed paths against its working directory: either run it from
    ``path``, or pass ``absolute_paths=True`` to list absolute paths.
    """
    if isinstance(coders, SparseCoder) or not isinstance(coders, Mapping):
        raise TypeError(f"circuit-tracer holds a set of transcoders: pass {{layer: coder}}, got {type(coders).__name__}.")
    if not coders:
        raise ValueError("circuit-tracer needs at least one transcoder.")
    layers = sorted(coders)
    if layers != list(range(len(layers))):
        raise ValueError(f"circuit-tracer needs a transcoder for every layer 0..n-1, got layers {layers}.")
    acts = ("relu", "jumprelu", "topk") if allow_topk else ("relu", "jumprelu")
    first = coders[0].cfg
    for layer in layers:
        coder = coders[layer]
        if coder.cfg.activation == "topk" and not allow_topk:
            raise ValueError(
                f"circuit-tracer cannot load TopK transcoders from disk (layer {layer}): version 0.4.x builds ReLU or JumpReLU "
                "from the files, and 0.5+ applies TopK without a ReLU, which differs from ours when a token has fewer than k "
                "positive pre-activations. Pass allow_topk=True to write `activation: topk` for circuit-tracer >= 0.5 anyway."
            )
        _check_writable(coder, "circuit-tracer", {"transcoder": acts, "skip_transcoder": acts})
        c = coder.cfg
        if c.d_in != c.d_out:
            raise ValueError(f"circuit-tracer transcoders map d_model to d_model, but layer {layer} maps {c.d_in} to {c.d_out}.")
        if (c.d_in, c.d_sae, c.kind, c.activation == "topk", c.k if c.activation == "topk" else None) != (
            first.d_in, first.d_sae, first.kind, first.activation == "topk", first.k if first.activation == "topk" else None
        ):
            raise ValueError(
                f"circuit-tracer needs every layer alike: layer {layer} has d_model={c.d_in}, d_sae={c.d_sae}, "
                f"kind={c.kind}, activation={c.activation} but layer 0 has "
                f"{first.d_in}, {first.d_sae}, {first.kind}, {first.activation}."
            )
    folder = Path(path)
    names = []
    for layer in layers:
        coder = coders[layer]
        tensors = {"W_enc": _f32(coder.W_enc), "W_dec": _f32(coder.W_dec), "b_enc": _f32(coder.b_enc), "b_dec": _f32(coder.b_dec)}
        if coder.threshold is not None:
            tensors["activation_function.threshold"] = _f32(coder.threshold)
        if coder.W_skip is not None:
            tensors["W_skip"] = _f32(coder.W_skip).T
        file = folder / f"layer_{layer}.safetensors"
        atomic_save_tensors({n: t.float().contiguous() for n, t in tensors.items()}, file)
        names.append(str(file.resolve()) if absolute_paths else file.name)
    raw: dict[str, Any] = {
        "model_kind": "transcoder_set",
        "model_name": model_name if model_name is not None else canonical_model_name(first.model_name),
        "feature_input_hook": feature_input_hook,
        "feature_output_hook": feature_output_hook,
    }
    if first.activation == "topk":
        raw["activation"], raw["k"] = "topk", first.k
    raw["transcoders"] = names
    atomic_write_bytes(folder / CIRCUIT_TRACER_CONFIG, _yaml().safe_dump(raw, sort_keys=False).encode())
    return folder


# ====================================================================== Dunefsky et al. 2024
class _InertConfig:
    """Stand-in for ``sae_training.config.LanguageModelSAERunnerConfig``, the dataclass that
    the Dunefsky et al. training code pickles next to the weights. The weights-only unpickler
    builds this class instead (setting attributes from plain values only), so none of that
    project's code is imported or run."""


# Fully qualified names the weights-only unpickler may map to _InertConfig; nothing else.
_DUNEFSKY_CONFIG_CLASSES = ("sae_training.config.LanguageModelSAERunnerConfig",)


def _torch_load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)``, with the Dunefsky config class read as an inert
    attribute bag. Any other non-tensor object makes it fail."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is not None:
        try:
            with safe_globals([(_InertConfig, name) for name in _DUNEFSKY_CONFIG_CLASSES]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except (TypeError, AttributeError):
            pass  # a torch without (class, name) allowlists: the config is refused like any other object
    return torch.load(path, map_location="cpu", weights_only=True)


def _unsafe_globals(path: Path) -> list[str] | None:
    """The classes and functions a checkpoint would need beyond weights-only ones, read from its
    pickle opcodes without running them; None when the file cannot be scanned."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return None
    return list(found)


def read_dunefsky(path: PathLike, *, device: str | torch.device = "cpu") -> SparseCoder:
    """Read a ``.pt`` transcoder or SAE of Dunefsky, Chlenski & Nanda 2024 (arXiv 2406.11944).

    Their ``SparseAutoencoder`` (github.com/jacobdunefsky/transcoder_circuits,
    ``sae_training/sparse_autoencoder.py``) holds ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
    ``W_dec [d_sae, d_out]``, ``b_dec [d_in]`` and, for transcoders, ``b_dec_out [d_out]``::

        f = relu((x - b_dec) @ W_enc + b_enc)
        y = f @ W_dec + b_dec_out        (transcoder; b_dec only centres the input)
        y = f @ W_dec + b_dec            (SAE: no b_dec_out)

    read as our ReLU coder with ``b_enc - b_dec @ W_enc`` folded. The file may be the plain
    state dict, or ``{"cfg": ..., "state_dict": {...}}`` as their ``save_model`` writes (the
    released GPT-2 transcoders). The ``cfg`` (its ``model_name``, ``hook_point``,
    ``hook_point_layer``, ``out_hook_point``) is kept as metadata; when absent, the layer is
    parsed from the file name (``...blocks.8.ln2.hook_normalized...``).

    The file is read with ``torch.load(map_location="cpu", weights_only=True)`` only. The one
    non-tensor class allowed is their config dataclass
    ``sae_training.config.LanguageModelSAERunnerConfig``, rebuilt as an inert attribute holder
    from plain values (its code is never imported); any other object is refused.

    Raises:
        CoderFileError: missing, corrupt, or holding pickled objects we refuse to unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise CoderFileError(f"{path} is missing.")
    try:
        obj = _torch_load_weights_only(path)
    except pickle.UnpicklingError as exc:
        found = _unsafe_globals(path)
        if found == []:
            raise CoderFileError(f"{path} is truncated or corrupt: {str(exc).splitlines()[0]}") from None
        what = f" ({', '.join(found)})" if found else " (or it is corrupt)"
        raise CoderFileError(
            f"{path} contains pickled Python code or objects{what} that we refuse to unpickle: loading them could run "
            "arbitrary code, so .pt files are only read with torch.load(weights_only=True). If you trust the file, convert "
            "it once where its code is installed: `sd = torch.load(path, weights_only=False); "
            "sd = sd.get('state_dict', sd); torch.save({k: v.cpu() for k, v in sd.items()}, 'plain.pt')`, then read plain.pt."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CoderFileError(f"{path} is truncated or corrupt: {exc}") from exc

    cfg: dict[str, Any] = {}
    state = obj
    if isinstance(obj, Mapping) and "state_dict" in obj:
        state = obj["state_dict"]
        raw_cfg = obj.get("cfg")
        if isinstance(raw_cfg, Mapping):
            cfg = dict(raw_cfg)
        elif isinstance(raw_cfg, _InertConfig):
            cfg = dict(vars(raw_cfg))
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CoderFileError(f"{path} should hold a dict of tensors (or {{'cfg', 'state_dict'}}), found {type(state).__name__}.")
    _require(state, ("W_enc", "b_enc", "W_dec", "b_dec"), path)
    W_enc_t, W_dec = _f32(state["W_enc"]), _f32(state["W_dec"])
    b_enc, b_dec_in = _f64(state["b_enc"]), _f64(state["b_dec"])
    if W_enc_t.ndim != 2 or W_dec.ndim != 2:
        raise CoderFileError(
            f"{path}: W_enc and W_dec should be matrices, found shapes {tuple(W_enc_t.shape)} and {tuple(W_dec.shape)}."
        )
    d_in, d_sae = W_enc_t.shape
    d_out = W_dec.shape[1]
    _check_shape(path, "W_dec", W_dec, (d_sae, d_out))
    _check_shape(path, "b_dec", b_dec_in, (d_in,))
    _check_shape(path, "b_enc", b_enc, (d_sae,))
    transcoder = "b_dec_out" in state
    if cfg.get("is_transcoder") and not transcoder:
        raise CoderFileError(f"{path}: its config says is_transcoder but it has no 'b_dec_out'.")
    b_out = _f64(state["b_dec_out"]) if transcoder else b_dec_in
    b_enc = b_enc - _matvec(W_enc_t.T, b_dec_in)
    hook_in = cfg.get("hook_point") or ""
    hook_out = cfg.get("out_hook_point") or (hook_in if not transcoder else "")
    layer = cfg.get("hook_point_layer")
    return _build(
        path, kind="transcoder" if transcoder else "sae", activation="relu", W_enc=W_enc_t.T, b_enc=b_enc,
        W_dec=W_dec, b_dec=b_out, device=device, model_name=str(cfg.get("model_name") or ""),
        layer=int(layer) if layer is not None else _layer_of(path.stem, hook_in),
        hookpoint_in=_hook_from_tl(hook_in), hookpoint_out=_hook_from_tl(hook_out),
        training={"source_format": "dunefsky", "source_config": _jsonable(cfg)},
    )


def write_dunefsky(coder: SparseCoder, path: PathLike) -> Path:
    """Write a ReLU transcoder or SAE as a Dunefsky et al. ``.pt`` state dict at ``path``.

    The file is ``torch.save`` of a plain dict of tensors with their names and layout (see
    :func:`read_dunefsky`): ``W_enc`` transposed to ``[d_in, d_sae]``; a transcoder gets
    ``b_dec = 0`` (no input centring) and ``b_dec_out`` = our ``b_dec``; an SAE gets our
    ``b_dec`` as ``b_dec`` and ``b_enc + W_enc @ b_dec`` as ``b_enc``. Load it into their
    ``SparseAutoencoder`` (``is_transcoder`` set for transcoders) with ``load_state_dict``.
    """
    _check_writable(coder, "Dunefsky et al.", {"transcoder": ("relu",), "sae": ("relu",)})
    W_enc, b_enc, b_dec = _f32(coder.W_enc), _f64(coder.b_enc), _f64(coder.b_dec)
    if coder.cfg.kind == "sae":
        state = {"W_enc": W_enc.T, "b_enc": b_enc + _matvec(W_enc, b_dec), "W_dec": _f32(coder.W_dec), "b_dec": b_dec}
    else:
        state = {
            "W_enc": W_enc.T, "b_enc": b_enc, "W_dec": _f32(coder.W_dec), "b_dec": torch.zeros(coder.cfg.d_in), "b_dec_out": b_dec
        }
    buf = _io.BytesIO()
    torch.save({n: t.float().contiguous() for n, t in state.items()}, buf)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


_READERS = {"sparsify": read_sparsify, "saelens": read_saelens, "circuit-tracer": read_circuit_tracer, "dunefsky": read_dunefsky}
_WRITERS = {"sparsify": write_sparsify, "saelens": write_saelens, "dunefsky": write_dunefsky}
