"""Cross-layer transcoders (CLTs), in memory and in circuit-tracer's on-disk format.

A CLT (Ameisen et al. 2025, "Circuit Tracing", Sec. 2.1) has one encoder per layer and, for a
feature of layer ``s``, one decoder row per layer ``t >= s``. Layer ``t``'s MLP output is
reconstructed from the features of every layer up to it::

    f_s = act(W_enc[s] x_s + b_enc[s])                       [d_sae]
    mlp_out_hat[t] = sum_{s <= t} f_s @ W_dec[s][:, t - s] + b_dec[t]

``x_s`` is what the CLT reads at layer ``s``: the MLP's input after its norm (``reads =
"mlp_in"``, what our per-layer transcoders read) or the residual stream before that norm
(``reads = "resid_mid"``, circuit-tracer's default ``hook_resid_mid``).

On disk (``CrossLayerTranscoder.to_safetensors`` of github.com/decoderesearch/circuit-tracer,
0.5): a folder with, for each layer ``i``, ``W_enc_{i}.safetensors`` holding ``W_enc_{i}
[d_sae, d_model]``, ``b_enc_{i} [d_sae]``, ``b_dec_{i} [d_model]`` and, for JumpReLU,
``threshold_{i} [d_sae]``; and ``W_dec_{i}.safetensors`` holding ``W_dec_{i} [d_sae, n_layers
- i, d_model]``. An optional ``config.yaml`` (``model_kind: cross_layer_transcoder``) names the
hooks; without one the folder reads ``hook_resid_mid``, as circuit-tracer's ``load_clt``
assumes. Nothing is unpickled; the files decide no code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .coder import SparseCoder
from .config import CoderConfig
from .io import CoderFileError, atomic_save_tensors, atomic_write_bytes

__all__ = ["CLT_READS", "CLTLayer", "CrossLayerTranscoder", "is_clt_folder", "read_clt", "require_per_layer", "write_clt"]

CLT_READS = ("mlp_in", "resid_mid")
CLT_CONFIG = "config.yaml"
# circuit-tracer's hook names (TransformerLens) for what a CLT reads -> ours.
_INPUT_HOOKS = {"hook_resid_mid": "resid_mid", "mlp.hook_in": "mlp_in", "ln2.hook_normalized": "mlp_in"}
_ENC = re.compile(r"^W_enc_(\d+)\.safetensors$")


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder (module docstring) with ``n_layers`` encoders of ``d_sae``
    features each.

    Parameters: ``W_enc [L, d_sae, d_model]``, ``b_enc [L, d_sae]``, ``b_dec [L, d_model]``,
    ``threshold [L, d_sae]`` (JumpReLU only), and ``W_dec[s] [d_sae, L - s, d_model]`` for each
    source layer ``s`` (``W_dec[s][:, t - s]`` writes to layer ``t``'s MLP output).

    Args:
        activation: ``"relu"`` or ``"jumprelu"`` (``p * (p > threshold)``), circuit-tracer's two.
        reads: ``"mlp_in"`` or ``"resid_mid"`` (module docstring).

    Raises:
        ValueError: an unknown activation or read site, or a size that is not positive.
    """

    def __init__(self, n_layers: int, d_model: int, d_sae: int, *, activation: str = "relu", reads: str = "mlp_in",
                 model_name: str = "", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        if activation not in ("relu", "jumprelu"):
            raise ValueError(f"a cross-layer transcoder's activation is 'relu' or 'jumprelu', got {activation!r}")
        if reads not in CLT_READS:
            raise ValueError(f"reads must be one of {CLT_READS}, got {reads!r}")
        if min(n_layers, d_model, d_sae) <= 0:
            raise ValueError(f"sizes must be positive, got n_layers={n_layers}, d_model={d_model}, d_sae={d_sae}")
        self.n_layers, self.d_model, self.d_sae = n_layers, d_model, d_sae
        self.activation, self.reads, self.model_name = activation, reads, model_name
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.zeros(n_layers, d_sae, d_model, **kw))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_model, **kw))
        self.threshold = nn.Parameter(torch.zeros(n_layers, d_sae, **kw)) if activation == "jumprelu" else None
        self.W_dec = nn.ParameterList([nn.Parameter(torch.zeros(d_sae, n_layers - s, d_model, **kw))
                                       for s in range(n_layers)])

    def pre_acts(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_enc[layer].T + b_enc[layer]``: ``[..., d_model] -> [..., d_sae]``."""
        return torch.nn.functional.linear(x, self.W_enc[layer], self.b_enc[layer])

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Feature activations of ``layer``: ``[..., d_model] -> [..., d_sae]``."""
        pre = self.pre_acts(layer, x)
        if self.threshold is None:
            return torch.relu(pre)
        return pre * (pre > self.threshold[layer])

    def check_fits(self, n_layers: int, d_model: int, error: type[Exception] = ValueError) -> None:
        """Raise ``error`` unless this CLT spans ``n_layers`` layers of width ``d_model``."""
        if (self.n_layers, self.d_model) != (n_layers, d_model):
            raise error(f"the cross-layer transcoder spans {self.n_layers} layers of width {self.d_model}, but the model "
                        f"has {n_layers} of width {d_model}: it belongs to another model (pass --model)")

    def decoder(self, source: int, target: int) -> torch.Tensor:
        """``[d_sae, d_model]``: how source-layer features write into ``target``'s MLP output.

        Raises:
            ValueError: ``target < source`` (a CLT feature writes only forwards).
        """
        if not 0 <= source <= target < self.n_layers:
            raise ValueError(f"a layer-{source} feature writes to layers {source}..{self.n_layers - 1}, not {target}")
        return self.W_dec[source][:, target - source]

    def reconstruct(self, target: int, acts: dict[int, torch.Tensor]) -> torch.Tensor:
        """Layer ``target``'s MLP output from ``acts`` (``{source: [..., d_sae]}`` for every
        source ``<= target``): ``[..., d_model]``.

        Raises:
            KeyError: a source layer's activations are missing.
        """
        out = self.b_dec[target]
        for s in range(target + 1):
            out = out + acts[s] @ self.decoder(s, target)
        return out

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        """Every layer's reconstruction: ``xs [L, ..., d_model]`` (each layer's input) ->
        ``[L, ..., d_model]``."""
        acts = {s: self.encode(s, xs[s]) for s in range(self.n_layers)}
        return torch.stack([self.reconstruct(t, acts) for t in range(self.n_layers)])

    def layer_coders(self) -> dict[int, CLTLayer]:
        """``{layer: CLTLayer}``: per-layer coders sharing this CLT's tensors (no copy), built once."""
        views = self.__dict__.get("_views")
        if views is None:
            views = {layer: CLTLayer(self, layer) for layer in range(self.n_layers)}
            self.__dict__["_views"] = views
        return views

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_views", None)  # the views would keep the old tensors (device or dtype moves)
        return super()._apply(fn, *args, **kwargs)

    # Read-only mapping of layer -> CLTLayer, so code that takes ``{layer: coder}`` (d_sae
    # checks, fingerprints, feature targets) also takes a CLT.
    def __getitem__(self, layer: int) -> CLTLayer:
        return self.layer_coders()[layer]

    def __iter__(self):
        return iter(range(self.n_layers))

    def __len__(self) -> int:
        return self.n_layers

    def __contains__(self, layer) -> bool:
        return layer in self.layer_coders()

    def keys(self):
        return self.layer_coders().keys()

    def values(self):
        return self.layer_coders().values()

    def items(self):
        return self.layer_coders().items()


class CLTLayer(SparseCoder):
    """Layer ``layer`` of a CLT seen as one transcoder: its encoder, its own-layer decoder
    (``W_dec = clt.decoder(layer, layer)``) and ``b_dec[layer]``. The tensors are views of the
    CLT's. Encoding is the CLT's; decoding alone is *not* the CLT's reconstruction of the
    layer (that also needs the earlier layers' features): code that splices or attributes must
    go through :attr:`clt`.
    """

    def __init__(self, clt: CrossLayerTranscoder, layer: int):
        cfg = CoderConfig(kind="transcoder", activation=clt.activation, d_in=clt.d_model, d_out=clt.d_model,
                          d_sae=clt.d_sae, k=None, model_name=clt.model_name, layer=layer,
                          hookpoint_in=f"layers.{layer}.mlp.input" if clt.reads == "mlp_in" else f"layers.{layer}.resid_mid",
                          hookpoint_out=f"layers.{layer}.mlp.output", training={"cross_layer_transcoder": True})
        super().__init__(cfg, device="meta")
        object.__setattr__(self, "clt", clt)  # not a submodule: the CLT owns the tensors
        self.layer = layer
        self.W_enc = nn.Parameter(clt.W_enc.detach()[layer], requires_grad=False)
        self.b_enc = nn.Parameter(clt.b_enc.detach()[layer], requires_grad=False)
        self.W_dec = nn.Parameter(clt.decoder(layer, layer).detach(), requires_grad=False)
        self.b_dec = nn.Parameter(clt.b_dec.detach()[layer], requires_grad=False)
        if clt.threshold is not None:
            self.threshold = nn.Parameter(clt.threshold.detach()[layer], requires_grad=False)


def require_per_layer(coders, what: str, error: type[ValueError] = ValueError) -> None:
    """Raise ``error`` if ``coders`` is a cross-layer transcoder: ``what`` is defined here for
    per-layer transcoders only (a CLT feature writes into several layers)."""
    if isinstance(coders, CrossLayerTranscoder):
        raise error(f"{what} needs per-layer transcoders: a cross-layer transcoder's features write into several "
                         "layers. Graphs, paths, verify and the free replacement model (intervene --mode free) take CLTs")


# ---------------------------------------------------------------------------- files
def is_clt_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a CLT in circuit-tracer's format."""
    path = Path(path)
    return path.is_dir() and (path / "W_enc_0.safetensors").is_file() and (path / "W_dec_0.safetensors").is_file()


def _tensors(file: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise CoderFileError(f"{file} is missing: a cross-layer transcoder needs W_enc_{{i}} and W_dec_{{i}} for every layer")
    try:
        t = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise CoderFileError(f"{file} is not a readable safetensors file ({exc}); download it again") from exc
    missing = [n for n in names if n not in t]
    if missing:
        raise CoderFileError(f"{file} lacks {', '.join(missing)}: not a circuit-tracer cross-layer transcoder file")
    return t


def _shape(file: Path, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise CoderFileError(f"{file}: {name} has shape {tuple(t.shape)}, expected {shape}")
    return t.float()


def _read_config(folder: Path) -> dict[str, Any]:
    from .formats import read_yaml_mapping

    cfg_path = folder / CLT_CONFIG
    if not cfg_path.is_file():
        return {}
    raw = read_yaml_mapping(cfg_path)
    if raw.get("model_kind", "cross_layer_transcoder") != "cross_layer_transcoder":
        raise ValueError(f"{cfg_path}: model_kind {raw.get('model_kind')!r} is not a cross-layer transcoder "
                         "(a per-layer set loads with read_circuit_tracer)")
    return raw


def read_clt(path: str | os.PathLike, *, reads: str | None = None, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """Read a CLT folder in circuit-tracer's format (module docstring) into float32.

    Args:
        reads: ``"mlp_in"`` or ``"resid_mid"``; None takes it from ``config.yaml``'s
            ``feature_input_hook`` (``hook_resid_mid`` or ``mlp.hook_in``), else
            ``"resid_mid"`` (circuit-tracer's default).

    Raises:
        CoderFileError: a file is missing, unreadable, lacks a tensor or has a wrong shape, or
            the layer files are not numbered 0..n-1.
        ValueError: the config names another model kind or an input hook we cannot read.
    """
    folder = Path(path)
    if not is_clt_folder(folder):
        raise CoderFileError(f"{folder} is not a cross-layer transcoder folder: expected W_enc_0.safetensors and "
                             "W_dec_0.safetensors (circuit-tracer's CrossLayerTranscoder.to_safetensors)")
    raw = _read_config(folder)
    if reads is None:
        hook = str(raw.get("feature_input_hook", "hook_resid_mid"))
        if hook not in _INPUT_HOOKS:
            raise ValueError(f"{folder}: feature_input_hook {hook!r} is not one we can read "
                             f"(known: {', '.join(_INPUT_HOOKS)}); pass reads='mlp_in' or 'resid_mid'")
        reads = _INPUT_HOOKS[hook]
    layers = sorted(int(m.group(1)) for f in folder.iterdir() if (m := _ENC.match(f.name)))
    if layers != list(range(len(layers))):
        raise CoderFileError(f"{folder}: encoder files for layers {layers}, expected 0..{len(layers) - 1} without gaps")
    L = len(layers)
    first = _tensors(folder / "W_enc_0.safetensors", ("W_enc_0", "b_enc_0", "b_dec_0"))
    d_sae, d_model = first["W_enc_0"].shape
    jump = "threshold_0" in first
    clt = CrossLayerTranscoder(L, d_model, d_sae, activation="jumprelu" if jump else "relu", reads=reads,
                               model_name=str(raw.get("model_name") or ""), device=device)
    with torch.no_grad():
        for i in range(L):
            f = folder / f"W_enc_{i}.safetensors"
            t = _tensors(f, (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}") + ((f"threshold_{i}",) if jump else ()))
            clt.W_enc[i] = _shape(f, f"W_enc_{i}", t[f"W_enc_{i}"], (d_sae, d_model))
            clt.b_enc[i] = _shape(f, f"b_enc_{i}", t[f"b_enc_{i}"], (d_sae,))
            clt.b_dec[i] = _shape(f, f"b_dec_{i}", t[f"b_dec_{i}"], (d_model,))
            if clt.threshold is not None:
                clt.threshold[i] = _shape(f, f"threshold_{i}", t[f"threshold_{i}"].flatten(), (d_sae,))
            f = folder / f"W_dec_{i}.safetensors"
            clt.W_dec[i].copy_(_shape(f, f"W_dec_{i}", _tensors(f, (f"W_dec_{i}",))[f"W_dec_{i}"], (d_sae, L - i, d_model)))
    return clt


def write_clt(clt: CrossLayerTranscoder, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``clt`` as a circuit-tracer CLT folder (module docstring) plus ``config.yaml``;
    each file atomically. Returns the folder.

    Raises:
        FileExistsError: the folder already holds a CLT and ``force`` is not set.
    """
    from .formats import _yaml

    folder = Path(path)
    if is_clt_folder(folder) and not force:
        raise FileExistsError(f"{folder} already holds a cross-layer transcoder; pass force=True (--force) to replace it")
    for i in range(clt.n_layers):
        enc = {f"W_enc_{i}": clt.W_enc[i], f"b_enc_{i}": clt.b_enc[i], f"b_dec_{i}": clt.b_dec[i]}
        if clt.threshold is not None:
            enc[f"threshold_{i}"] = clt.threshold[i]
        atomic_save_tensors({k: v.detach().float().contiguous().cpu() for k, v in enc.items()}, folder / f"W_enc_{i}.safetensors")
        atomic_save_tensors({f"W_dec_{i}": clt.W_dec[i].detach().float().contiguous().cpu()}, folder / f"W_dec_{i}.safetensors")
    raw = {"model_kind": "cross_layer_transcoder", "model_name": clt.model_name,
           "feature_input_hook": "hook_resid_mid" if clt.reads == "resid_mid" else "mlp.hook_in",
           "feature_output_hook": "hook_mlp_out"}
    atomic_write_bytes(folder / CLT_CONFIG, _yaml().safe_dump(raw, sort_keys=False).encode())
    return folder
