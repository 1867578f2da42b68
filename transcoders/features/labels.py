"""Labels without a language model: a feature named by the tokens it fires on.

A :class:`Label` is read off a feature's top examples in microseconds: the tokens at the
examples' peaks (weighted by activation), the preceding token when most peaks share one (a
context cue), and the tokens the feature's decoder promotes through the unembedding. It reads
like ``' America', ' Nation' | after ' the' → ' is'``.

The label doubles as a simulator (:func:`rule_predict`): a token is predicted to fire when it is
one of the label's tokens. :mod:`transcoders.features.scoring` scores such labels with the same
detection, fuzzing and simulation scores as LLM explanations, which gives every feature a
cheap baseline an LLM explanation has to beat.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from transcoders.features.examples import Example

#: what :func:`rule_predict` gives a label token that is not preceded by the label's context cue
#: (a label without a cue gives 1.0 to every one of its tokens): still above the 0.5 decision
#: threshold, since the token is the main evidence, but ranked below a cued occurrence.
UNCUED = 0.75

_MAX_SHOWN = 16  # characters of one token shown in a label's text


@dataclass(frozen=True)
class Label:
    """A short, LLM-free name for a feature.

    Attributes:
        text: the label as shown, e.g. ``' cat', ' dog' | after ' the' → ' food'``;
            ``"dead"`` for a feature without activating examples.
        tokens: the raw token strings the feature fires on most, strongest first.
        context: the raw preceding token the feature's peaks share (empty when none is
            concentrated enough).
        promotes: the raw tokens the feature promotes most, strongest first.
    """

    text: str
    tokens: tuple[str, ...] = ()
    context: tuple[str, ...] = ()
    promotes: tuple[str, ...] = ()

    @property
    def dead(self) -> bool:
        """Whether the label names no token (no activating example)."""
        return not self.tokens


def token_key(token: str) -> str:
    """How tokens are compared: stripped and casefolded (``" Cat"`` and ``"cat"`` match).

    A token that is only whitespace (``"\\n"``, ``" "``) keeps its raw form, so different
    whitespace tokens stay distinct instead of all becoming ``""``.
    """
    key = token.strip().casefold()
    return key if key else token


def _show(token: str) -> str:
    """A token as it appears in a label: quoted with ``repr`` (whitespace stays visible), cut."""
    if len(token) > _MAX_SHOWN:
        token = token[: _MAX_SHOWN - 1] + "…"
    return repr(token)


def _peak(example: Example) -> int:
    """Index of the example's largest activation (the first one on ties)."""
    return max(range(len(example.acts)), key=lambda i: (example.acts[i], -i))


def _ranked(weights: dict[str, float]) -> list[str]:
    """Keys by decreasing weight, ties broken by the key itself (deterministic)."""
    return sorted(weights, key=lambda k: (-weights[k], k))


def _raw_form(forms: Counter[str]) -> str:
    """The most frequent raw spelling of a key (ties: the smallest string)."""
    return min(forms, key=lambda f: (-forms[f], f))


def token_label(
    top: Sequence[Example],
    top_logits: Sequence[tuple[str, float]] | None = None,
    *,
    max_tokens: int = 3,
    min_share: float = 0.1,
    min_context_share: float = 0.5,
) -> Label:
    """Label a feature by the tokens at its examples' peaks.

    Each activating example votes for the token at its peak with the peak activation; tokens
    are grouped by :func:`token_key`. The label keeps up to ``max_tokens`` tokens whose weight
    is at least ``min_share`` of the strongest one (a single stray peak does not make it into
    the label of a feature that fires on one token 30 times). The token just before each peak is
    a context cue when at least ``min_context_share`` of the peaks (and at least two) share it.
    ``top_logits`` are ``(token, logit effect)`` pairs; the ``max_tokens`` with the largest
    positive effect are the label's promoted tokens.

    The result depends only on the examples and logits, not on their order (up to
    floating-point rounding in the sums). Without activating examples the label is ``"dead"``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    weights: dict[str, float] = defaultdict(float)
    forms: dict[str, Counter[str]] = defaultdict(Counter)
    before: Counter[str] = Counter()
    before_forms: dict[str, Counter[str]] = defaultdict(Counter)
    n_with_before = 0
    for example in top:
        if not example.activating:
            continue
        peak = _peak(example)
        token = example.tokens[peak]
        weights[token_key(token)] += example.acts[peak]
        forms[token_key(token)][token] += 1
        if peak > 0:
            prev = example.tokens[peak - 1]
            before[token_key(prev)] += 1
            before_forms[token_key(prev)][prev] += 1
            n_with_before += 1
    if not weights:
        return Label("dead")

    ranked = _ranked(weights)
    strongest = weights[ranked[0]]
    keys = [k for k in ranked if weights[k] >= min_share * strongest][:max_tokens]
    tokens = tuple(_raw_form(forms[k]) for k in keys)

    context: tuple[str, ...] = ()
    if before:
        cue = min(before, key=lambda k: (-before[k], k))
        if before[cue] >= 2 and before[cue] >= min_context_share * n_with_before:
            context = (_raw_form(before_forms[cue]),)

    promotes: tuple[str, ...] = ()
    if top_logits:
        positive = sorted(((tok, val) for tok, val in top_logits if val > 0), key=lambda tv: (-tv[1], tv[0]))
        promotes = tuple(tok for tok, _ in positive[:max_tokens])

    text = ", ".join(_show(t) for t in tokens)
    if context:
        text += f" | after {_show(context[0])}"
    if promotes:
        text += " → " + ", ".join(_show(t) for t in promotes)
    return Label(text, tokens, context, promotes)


def rule_predict(label: Label, example: Example) -> list[float]:
    """The label read as a simulator: a predicted activation in [0, 1] for each token.

    A token scores 1.0 when its :func:`token_key` is one of the label's tokens. When the label has
    a context cue, a label token preceded by the cue scores 1.0 and one that is not scores
    :data:`UNCUED` (0.75). Every other token scores 0.0; a dead label predicts 0.0 everywhere.
    """
    wanted = {token_key(t) for t in label.tokens}
    cues = {token_key(t) for t in label.context}
    out: list[float] = []
    for i, token in enumerate(example.tokens):
        if token_key(token) not in wanted:
            out.append(0.0)
        elif not cues or (i > 0 and token_key(example.tokens[i - 1]) in cues):
            out.append(1.0)
        else:
            out.append(UNCUED)
    return out
