"""What an attribution graph explains: logits, logit differences, feature pre-activations, or
residual-stream directions, each at one prompt position.

Spec strings (CLI ``--target``, Python :func:`parse_target`), each optionally ending in
``@POS`` (a prompt position, negative counts from the end; default: the last position):

- ``logit:TOKEN``          the *centred* logit of TOKEN, ``logit[TOKEN] - mean(logits)`` (text,
  encoded without special tokens, must be one token; or ``#ID``). Softmax ignores what raises
  every logit alike, so the centred logit is what the prediction depends on; circuit-tracer
  also explains centred logits (its "demeaned" unembedding columns);
- ``rawlogit:TOKEN``       the logit itself (then constant terms such as the transcoders'
  ``b_dec`` carried to the unembedding usually make up most of the value);
- ``diff:TOKEN_A,TOKEN_B``  logit(A) - logit(B);
- ``feature:LAYER.FEATURE`` the pre-activation of a transcoder feature;
- ``direction:LAYER:FILE``  the projection of ``resid_pre[LAYER]`` (LAYER = n_layers for the
  final residual stream) on a ``[d_model]`` vector saved in FILE (``.safetensors`` key
  ``direction``, or ``.npy``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# Per-layer ``[T, d_model]`` tensors: a list indexed by layer or a ``{layer: tensor}`` dict.
PerLayer = Sequence[torch.Tensor] | Mapping[int, torch.Tensor]


class TargetError(ValueError):
    """A target spec is malformed or names a token, layer, feature or position that does not exist."""


@dataclass
class Target:
    """One quantity to explain.

    Attributes:
        kind: ``logit``, ``logit_diff``, ``feature`` or ``direction``.
        pos: prompt position (non-negative once resolved).
        token, token_b: vocabulary ids (``logit``: token; ``logit_diff``: token - token_b).
        layer, feature: for ``feature`` (transcoder layer and index) and ``direction``
            (``resid_pre[layer]``).
        direction: ``[d_model]`` for ``direction``.
        label: a readable name, e.g. ``logit(' Paris')@7``.
        weight: the target's weight when influence is summed over targets (default targets:
            their probability).
        centered: ``logit`` only: subtract the mean logit over the vocabulary at ``pos``.
    """

    kind: str
    pos: int = -1
    token: int | None = None
    token_b: int | None = None
    layer: int | None = None
    feature: int | None = None
    direction: torch.Tensor | None = None
    label: str = ""
    weight: float = 1.0
    centered: bool = False

    def resolved(self, n_pos: int) -> Target:
        """A copy with ``pos`` made non-negative; raises :class:`TargetError` if out of range."""
        pos = self.pos + n_pos if self.pos < 0 else self.pos
        if not 0 <= pos < n_pos:
            raise TargetError(f"target position {self.pos} is outside the {n_pos}-token prompt")
        return Target(**{**self.__dict__, "pos": pos})

    def value(self, logits: torch.Tensor, *, mlp_in: PerLayer | None = None, resid_pre: PerLayer | None = None,
              coders: Mapping | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The target's value in one run of a model: the one definition every caller uses
        (attribution rows, frozen and free interventions, verification).

        - ``logit``: ``logits[pos, token]`` (minus ``logits[pos].mean()`` if ``centered``);
          ``logit_diff``: ``logits[pos, token] - logits[pos, token_b]``
          (pass logits *before* any final soft-cap: that is what graphs explain);
        - ``feature``: the pre-activation ``mlp_in[layer][pos] @ W_enc[feature] + b_enc[feature]``
          of ``coders[layer]``;
        - ``direction``: ``resid_pre[layer][pos] @ direction`` (``resid_pre[n_layers]`` is the final
          residual stream).

        Args:
            logits: ``[T, vocab]``; ``T`` also resolves a negative ``pos``.
            mlp_in: per layer ``[T, d_model]``, the transcoder inputs (``feature`` targets).
            resid_pre: per layer (plus the final stream) ``[T, d_model]`` (``direction`` targets).
            coders: ``{layer: coder}`` with ``W_enc [d_sae, d_model]`` and ``b_enc [d_sae]`` (``feature``).
            dtype: compute dtype (default: that of the tensor read, ``logits`` or ``mlp_in``/``resid_pre``).

        Returns:
            a 0-dim tensor in ``dtype`` on the device of the tensor read.

        Raises:
            TargetError: the position is outside the prompt, a quantity the kind needs was not
                given, or the kind is unknown.
        """
        if self.kind not in ("logit", "logit_diff", "feature", "direction"):
            raise TargetError(f"unknown target kind {self.kind!r}; use logit, logit_diff, feature or direction")
        t = self.resolved(int(logits.shape[0]))
        if t.kind in ("logit", "logit_diff"):
            lg = logits[t.pos] if dtype is None else logits[t.pos].to(dtype)
            if t.token is None:
                raise TargetError(f"{t.kind} target {t.label!r} names no token")
            if t.kind == "logit":
                return lg[t.token] - lg.mean() if t.centered else lg[t.token]
            if t.token_b is None:
                raise TargetError(f"logit_diff target {t.label!r} names no second token")
            return lg[t.token] - lg[t.token_b]
        if t.layer is None:
            raise TargetError(f"{t.kind} target {t.label!r} names no layer")
        if t.kind == "feature":
            if mlp_in is None or coders is None:
                raise TargetError(f"the value of feature target {t.label or t.kind} needs the MLP inputs and the coders")
            if t.feature is None:
                raise TargetError(f"feature target {t.label!r} names no feature")
            x = mlp_in[t.layer][t.pos]
            x = x if dtype is None else x.to(dtype)
            c = coders[t.layer]
            w = c.W_enc.detach()[t.feature].to(device=x.device, dtype=x.dtype)
            b = c.b_enc.detach()[t.feature].to(device=x.device, dtype=x.dtype)
            return x @ w + b
        # direction
        if resid_pre is None:
            raise TargetError(f"the value of direction target {t.label or t.kind} needs the residual streams")
        if t.direction is None:
            raise TargetError(f"direction target {t.label!r} has no direction vector")
        x = resid_pre[t.layer][t.pos]
        x = x if dtype is None else x.to(dtype)
        return x @ t.direction.to(device=x.device, dtype=x.dtype)


def target_values(targets: Sequence[Target], logits: torch.Tensor, *, mlp_in: PerLayer | None = None,
                  resid_pre: PerLayer | None = None, coders: Mapping | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[n_targets]``: :meth:`Target.value` of each target (same arguments).

    Raises:
        TargetError: as :meth:`Target.value`; also when ``targets`` is empty.
    """
    if not targets:
        raise TargetError("no targets: give at least one")
    return torch.stack([t.value(logits, mlp_in=mlp_in, resid_pre=resid_pre, coders=coders, dtype=dtype) for t in targets])


def _token_id(text: str, tokenizer, vocab_size: int) -> int:
    if text.startswith("#") and text[1:].isdigit():
        tid = int(text[1:])
    else:
        if tokenizer is None:
            raise TargetError(f"no tokenizer to encode {text!r}; give the token id as #ID")
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise TargetError(
                f"{text!r} encodes to {len(ids)} tokens {ids}; a logit target needs exactly one "
                "(mind the leading space, e.g. ' Paris', or give #ID)"
            )
        tid = ids[0]
    if not 0 <= tid < vocab_size:
        raise TargetError(f"token id {tid} is outside the vocabulary (0..{vocab_size - 1})")
    return tid


def _show(tokenizer, tid: int) -> str:
    return repr(tokenizer.decode([tid])) if tokenizer is not None else f"#{tid}"


def parse_target(spec: str, *, tokenizer=None, vocab_size: int, n_layers: int, d_sae: dict[int, int] | None = None,
                 d_model: int | None = None) -> Target:
    """Parse one target spec (see the module docstring).

    Raises:
        TargetError: the spec is malformed, or names something that does not exist.
    """
    body, _, at = spec.rpartition("@") if "@" in spec else (spec, "", "")
    try:
        pos = int(at) if at else -1
    except ValueError:
        raise TargetError(f"bad position {at!r} in target {spec!r}; write e.g. logit:' Paris'@-1") from None
    kind, _, arg = body.partition(":")
    if kind in ("logit", "rawlogit"):
        tid = _token_id(arg, tokenizer, vocab_size)
        return logit_target(tid, pos, tokenizer=tokenizer, centered=kind == "logit")
    if kind == "diff":
        a, sep, b = arg.partition(",")
        if not sep:
            raise TargetError(f"diff target {spec!r} needs two tokens: diff:A,B")
        ta, tb = _token_id(a, tokenizer, vocab_size), _token_id(b, tokenizer, vocab_size)
        return Target("logit_diff", pos, token=ta, token_b=tb,
                      label=f"logit({_show(tokenizer, ta)})-logit({_show(tokenizer, tb)})")
    if kind == "feature":
        try:
            layer, feature = (int(x) for x in arg.split("."))
        except ValueError:
            raise TargetError(f"feature target {spec!r} must read feature:LAYER.FEATURE") from None
        if not 0 <= layer < n_layers:
            raise TargetError(f"layer {layer} is out of range (0..{n_layers - 1})")
        if d_sae is not None and not 0 <= feature < d_sae[layer]:
            raise TargetError(f"feature {feature} is out of range for layer {layer} (d_sae {d_sae[layer]})")
        return Target("feature", pos, layer=layer, feature=feature, label=f"L{layer} f{feature}")
    if kind == "direction":
        layer_s, _, path = arg.partition(":")
        try:
            layer = int(layer_s)
        except ValueError:
            raise TargetError(f"direction target {spec!r} must read direction:LAYER:FILE") from None
        if not 0 <= layer <= n_layers:
            raise TargetError(f"layer {layer} is out of range (0..{n_layers}; {n_layers} = final residual)")
        vec = _load_direction(path)
        if d_model is not None and vec.shape != (d_model,):
            raise TargetError(f"direction in {path} has shape {tuple(vec.shape)}, expected ({d_model},)")
        return Target("direction", pos, layer=layer, direction=vec, label=f"resid{layer}·{path}")
    raise TargetError(f"unknown target kind {kind!r} in {spec!r}; use logit:, rawlogit:, diff:, feature: or direction:")


def _load_direction(path: str) -> torch.Tensor:
    try:
        if path.endswith(".npy"):
            import numpy as np

            return torch.from_numpy(np.load(path, allow_pickle=False)).flatten().double()
        from safetensors.torch import load_file

        return load_file(path)["direction"].flatten().double()
    except (OSError, KeyError, ValueError) as exc:
        raise TargetError(f"cannot read a direction from {path}: {exc}") from None


def logit_target(token: int, pos: int = -1, *, tokenizer=None, centered: bool = True, weight: float = 1.0) -> Target:
    """A ``logit`` target for vocabulary id ``token``, labelled ``logit(' Paris')`` when centred
    (the default) and ``rawlogit(' Paris')`` otherwise."""
    name = "logit" if centered else "rawlogit"
    return Target("logit", pos, token=token, label=f"{name}({_show(tokenizer, token)})", weight=weight, centered=centered)


def top_logit_targets(logits: torch.Tensor, *, pos: int = -1, max_n: int = 10, mass: float = 0.95,
                      tokenizer=None, centered: bool = True) -> list[Target]:
    """The most likely next tokens at ``pos`` until their probability reaches ``mass`` (at most
    ``max_n``), each weighted by its probability (circuit-tracer's default), as centred logits
    unless ``centered=False``.

    Args:
        logits: ``[T, vocab]``.
    """
    probs = logits[pos].double().softmax(-1)
    p, ids = probs.sort(descending=True)
    n = int(min(max_n, int((p.cumsum(0) < mass).sum()) + 1))
    return [logit_target(int(i), pos, tokenizer=tokenizer, centered=centered, weight=float(w))
            for w, i in zip(p[:n], ids[:n])]
