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
- ``group:+A,B,C;-D,E``     a set comparison, for tasks whose answer is one of several tokens:
  the mean logit of the ``+`` set minus the mean logit of the ``-`` set. Linear in the logits,
  so its graphs are exact like those of ``logit:``; stored as a token-weight combination
  (``tokens``, ``coefs`` = ``+1/|plus|`` and ``-1/|minus|``). Either set may be left out
  (``group:+A,B`` or ``group:-D,E``); then the value is *centred* like ``logit:`` (the mean
  logit over the vocabulary subtracted once per unit of net weight) -- with both sets the
  weights sum to zero and the vocabulary mean cancels by itself. Items are token texts taken
  verbatim (a leading space is part of the token: ``group:+ Paris, Rome;- London``) or ``#ID``;
  each must be one token, and no token may appear twice. :func:`prob_diff` is the matching
  probability metric (Hanna et al. 2023's PD for greater-than);
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
        kind: ``logit``, ``logit_diff``, ``logit_group``, ``feature`` or ``direction``.
        pos: prompt position (non-negative once resolved).
        token, token_b: vocabulary ids (``logit``: token; ``logit_diff``: token - token_b).
        layer, feature: for ``feature`` (transcoder layer and index) and ``direction``
            (``resid_pre[layer]``).
        direction: ``[d_model]`` for ``direction``.
        label: a readable name, e.g. ``logit(' Paris')@7``.
        weight: the target's weight when influence is summed over targets (default targets:
            their probability).
        centered: ``logit`` and ``logit_group``: subtract the mean logit over the vocabulary
            at ``pos`` (for ``logit_group`` times ``sum(coefs)``, which is 0 when both sets are given).
        tokens, coefs: ``logit_group``: vocabulary ids and their weights; the value is
            ``sum_i coefs[i] * logits[pos, tokens[i]]`` (``+1/|plus|`` for the ``+`` set,
            ``-1/|minus|`` for the ``-`` set).
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
    tokens: list[int] | None = None
    coefs: list[float] | None = None

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
          ``logit_diff``: ``logits[pos, token] - logits[pos, token_b]``;
          ``logit_group``: ``sum_i coefs[i] * logits[pos, tokens[i]]`` (minus
          ``sum(coefs) * logits[pos].mean()`` if ``centered``)
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
        if self.kind not in TARGET_KINDS:
            raise TargetError(f"unknown target kind {self.kind!r}; use {', '.join(TARGET_KINDS)}")
        t = self.resolved(int(logits.shape[0]))
        if t.kind == "logit_group":
            lg = logits[t.pos] if dtype is None else logits[t.pos].to(dtype)
            ids, w = t.group_weights(device=lg.device, dtype=lg.dtype)
            value = lg[ids] @ w
            return value - w.sum() * lg.mean() if t.centered else value
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

    def group_weights(self, *, device=None, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [k] long, coefs [k])`` of a ``logit_group`` target, checked.

        Raises:
            TargetError: the target names no tokens, or ``tokens`` and ``coefs`` differ in length.
        """
        if not self.tokens or self.coefs is None or len(self.tokens) != len(self.coefs):
            raise TargetError(f"logit_group target {self.label!r} needs as many coefs as tokens (and at least one token)")
        return (torch.tensor(self.tokens, dtype=torch.long, device=device),
                torch.tensor(self.coefs, dtype=dtype or torch.float64, device=device))

    def token_sets(self) -> tuple[list[int], list[int]]:
        """``(plus, minus)`` vocabulary ids of a ``logit_diff`` or ``logit_group`` target (the
        tokens with positive and negative weight), for :func:`prob_diff`.

        Raises:
            TargetError: the target is of another kind.
        """
        if self.kind == "logit_diff":
            if self.token is None or self.token_b is None:
                raise TargetError(f"logit_diff target {self.label!r} needs two tokens")
            return [int(self.token)], [int(self.token_b)]
        if self.kind == "logit_group":
            return ([int(t) for t, c in zip(self.tokens or (), self.coefs or ()) if c > 0],
                    [int(t) for t, c in zip(self.tokens or (), self.coefs or ()) if c < 0])
        raise TargetError(f"{self.kind} target {self.label!r} compares no token sets; prob_diff needs diff: or group:")


TARGET_KINDS = ("logit", "logit_diff", "logit_group", "feature", "direction")


def prob_diff(logits: torch.Tensor, plus: Sequence[int], minus: Sequence[int] = ()) -> torch.Tensor:
    """Probability difference: ``sum_{y in plus} p(y) - sum_{y in minus} p(y)``, with ``p`` the
    softmax of ``logits`` over the whole vocabulary (not renormalised over the two sets).

    For greater-than, Hanna et al. 2023 ("How does GPT-2 compute greater-than?") define
    ``PD = sum_{y > YY} p(y) - sum_{y <= YY} p(y)`` over the two-digit year tokens; SmolLM2 writes
    years digit by digit, so our task takes it over the tens digit: ``plus`` the digits greater
    than the start year's tens digit, ``minus`` the others (``'0'`` up to and including it). A
    linear target (``group:``) explains the logits; PD is what the prediction does with them.

    Args:
        logits: ``[..., vocab]`` (pass the logits the model samples from, after any soft-cap).
        plus, minus: vocabulary ids (each set without repeats; ``minus`` may be empty).

    Returns:
        ``[...]`` float64, in ``[-1, 1]``.
    """
    logp = logits.double().log_softmax(-1)
    p = logp.exp()
    out = p[..., list(plus)].sum(-1)
    if len(minus):
        out = out - p[..., list(minus)].sum(-1)
    return out


def target_prob_diff(target: Target, logits: torch.Tensor) -> float | None:
    """:func:`prob_diff` of a ``logit_group`` or ``logit_diff`` target at its position (``plus``:
    its positively weighted tokens; ``logit_diff``: ``p(A) - p(B)``); None for other kinds.

    Args:
        logits: ``[T, vocab]``, after any soft-cap.
    """
    if target.kind not in ("logit_group", "logit_diff"):
        return None
    t = target.resolved(int(logits.shape[0]))
    plus, minus = t.token_sets()
    return float(prob_diff(logits[t.pos], plus, minus))


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


def _token_id(text: str, tokenizer, vocab_size: int, what: str = "logit target") -> int:
    if text == "":
        raise TargetError(f"an empty token in a {what}; write the token text (e.g. ' Paris') or #ID")
    if text.startswith("#") and text[1:].isdigit():
        tid = int(text[1:])
    else:
        if tokenizer is None:
            raise TargetError(f"no tokenizer to encode {text!r}; give the token id as #ID")
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            pieces = [tokenizer.decode([i]) for i in ids]
            raise TargetError(
                f"{text!r} encodes to {len(ids)} tokens {ids} {pieces}; a {what} needs exactly one "
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
    if kind == "group":
        return _parse_group(spec, arg, pos, tokenizer, vocab_size)
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
    raise TargetError(f"unknown target kind {kind!r} in {spec!r}; use logit:, rawlogit:, diff:, group:, feature: or "
                      "direction:")


def _parse_group(spec: str, arg: str, pos: int, tokenizer, vocab_size: int) -> Target:
    how = "write group:+A,B,C;-D,E (either set may be left out)"
    sets: dict[str, list[int]] = {}
    for part in arg.split(";"):
        sign, items = part[:1], part[1:]
        if sign not in ("+", "-"):
            raise TargetError(f"group target {spec!r}: the set {part!r} must start with + or -; {how}")
        if sign in sets:
            raise TargetError(f"group target {spec!r} has two {sign} sets; {how}")
        if items == "":
            raise TargetError(f"group target {spec!r}: the {sign} set is empty; list its tokens or leave it out "
                              "(group:+A,B or group:-D,E)")
        sets[sign] = [_token_id(x, tokenizer, vocab_size, what=f"group target {spec!r}") for x in items.split(",")]
    plus, minus = sets.get("+", []), sets.get("-", [])
    seen: set[int] = set()
    for tid in plus + minus:
        if tid in seen:
            raise TargetError(f"group target {spec!r} names {_show(tokenizer, tid)} (#{tid}) twice; each token may "
                              "appear once, in one set")
        seen.add(tid)
    return group_target(plus, minus, pos, tokenizer=tokenizer)


def group_target(plus: Sequence[int], minus: Sequence[int] = (), pos: int = -1, *, tokenizer=None,
                 weight: float = 1.0) -> Target:
    """A ``logit_group`` target: mean logit of ``plus`` minus mean logit of ``minus`` at ``pos``
    (``coefs`` ``+1/len(plus)``, ``-1/len(minus)``), centred over the vocabulary when one set is
    empty (see the module docstring). Labelled ``group(+'4','5';-'0','1')``.

    Raises:
        TargetError: both sets are empty.
    """
    plus, minus = [int(t) for t in plus], [int(t) for t in minus]
    if not plus and not minus:
        raise TargetError("a group target needs at least one token; write group:+A,B,C;-D,E")
    coefs = [1.0 / len(plus) for _ in plus] + [-1.0 / len(minus) for _ in minus]
    parts = [sign + ",".join(_show(tokenizer, t) for t in ids) for sign, ids in (("+", plus), ("-", minus)) if ids]
    return Target("logit_group", pos, tokens=plus + minus, coefs=coefs, label=f"group({';'.join(parts)})",
                  weight=weight, centered=not (plus and minus))


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
