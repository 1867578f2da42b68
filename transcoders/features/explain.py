"""Explanations from a language model: show a feature's top examples, ask what it responds to.

The prompt follows Bills et al. 2023 ("Language models can explain neurons in language
models") and Paulo et al. 2024 ("Automatically interpreting millions of features in large
language models"): excerpts of the feature's top examples with the tokens it fires on marked
``<<like this>>``, optionally the tokens it promotes, and a request for a short explanation.
The explainer may be a small model (SmolLM2-135M, about 2k tokens of context), so excerpts are
cropped around their peak and the prompt has a character budget.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from transcoders.features.examples import Example

if TYPE_CHECKING:
    from transcoders.features.scoring import ChatModel

SYSTEM_PROMPT = (
    "You explain what a feature of a language model responds to. You see text excerpts in which "
    "the tokens where the feature fires are marked <<like this>>. "
    "Reply with one short line of a few words and nothing else."
)


def crop(n: int, focus: int, width: int) -> tuple[int, int]:
    """``(start, end)`` of a window of at most ``width`` of ``n`` positions around ``focus``.

    Two thirds of the window come before ``focus`` (what a causal model has read matters most),
    and the window is shifted to stay inside ``[0, n)``.
    """
    width = max(1, width)
    if n <= width:
        return 0, n
    start = min(max(0, focus - (2 * width) // 3), n - width)
    return start, start + width


def _visible(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def render_marked(tokens: Sequence[str], marked: set[int] | Sequence[int], start: int = 0, end: int | None = None) -> str:
    """``tokens[start:end]`` joined into text with the ``marked`` indices shown ``<<like this>>``.

    Adjacent marked tokens share one pair of marks, whitespace at the edges of a marked run is
    kept outside the marks (``" <<cat>>"``), and newlines are shown as ``\\n``.
    """
    end = len(tokens) if end is None else end
    marked = set(marked)
    parts: list[str] = []
    i = start
    while i < end:
        if i not in marked:
            parts.append(_visible(tokens[i]))
            i += 1
            continue
        j = i
        while j < end and j in marked:
            j += 1
        run = _visible("".join(tokens[i:j]))
        core = run.strip()
        if core:
            lead = run[: len(run) - len(run.lstrip())]
            trail = run[len(run.rstrip()) :]
            parts.append(f"{lead}<<{core}>>{trail}")
        else:
            parts.append(f"<<{run}>>")
        i = j
    return "".join(parts)


def mark_activating(example: Example, fraction: float = 0.3) -> list[int]:
    """Indices of the tokens whose activation is positive and above ``fraction`` of the example's max."""
    top = example.max_act
    if top <= 0:
        return []
    return [i for i, a in enumerate(example.acts) if a > 0 and a >= fraction * top]


def _excerpt(example: Example, window: int, fraction: float, max_line_chars: int) -> str:
    """The example cropped to ``window`` tokens around its peak, marked; shrunk until it fits."""
    peak = max(range(len(example.acts)), key=lambda i: (example.acts[i], -i))
    marks = mark_activating(example, fraction)
    while True:
        start, end = crop(len(example.tokens), peak, window)
        text = render_marked(example.tokens, marks, start, end).strip()
        if len(text) <= max_line_chars or window <= 1:
            return text[:max_line_chars]
        window -= max(1, window // 4)


def explanation_messages(
    top: Sequence[Example],
    top_logits: Sequence[str] | None = None,
    *,
    max_examples: int = 10,
    window: int = 24,
    fraction: float = 0.3,
    max_chars: int = 2000,
    max_line_chars: int = 200,
) -> list[dict]:
    """A chat prompt (system and user message) asking for an explanation of a feature.

    Shows up to ``max_examples`` activating examples, strongest first, each cropped to
    ``window`` tokens around its peak (at most ``max_line_chars`` characters), with the tokens
    above ``fraction`` of the example's max marked ``<<like this>>`` (adjacent ones merged).
    ``top_logits`` (raw tokens the feature promotes, strongest first) are listed when given.
    Excerpts are added while the user message stays within ``max_chars`` characters (at least
    one is always shown). Raises ValueError when no example activates.
    """
    active = sorted((e for e in top if e.activating), key=lambda e: -e.max_act)[: max(1, max_examples)]
    if not active:
        raise ValueError("cannot explain a feature without activating examples")
    question = "What does the feature respond to? Answer with one line of a few words."
    tail = ""
    if top_logits:
        tail = "It makes these tokens more likely next: " + ", ".join(repr(t) for t in list(top_logits)[:8]) + "\n"
    head = "Excerpts:\n"
    budget = max_chars - len(head) - len(tail) - len(question)
    lines: list[str] = []
    for n, example in enumerate(active, 1):
        line = f"{n}. {_excerpt(example, window, fraction, max_line_chars)}\n"
        if lines and len(line) > budget:
            break
        lines.append(line)
        budget -= len(line)
    user = head + "".join(lines) + tail + question
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_BULLET = re.compile(r"^(?:[-*•>]+|\d+[.)])\s*")
_PREFIX = re.compile(r"^(?:explanation|answer|feature|label|description|response)\s*[:：\-–—]\s*", re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "`": "`", "“": "”", "‘": "’", "«": "»"}


def _unquote(s: str) -> str:
    while len(s) >= 2 and _QUOTES.get(s[0]) == s[-1]:
        s = s[1:-1].strip()
    if len(s) >= 1 and s[0] in _QUOTES and _QUOTES[s[0]] not in s[1:]:  # an opening quote left open
        s = s[1:].strip()
    return s


def parse_explanation(text: str, *, max_chars: int = 120) -> str:
    """The explanation in a model's reply: its first non-empty line, cleaned.

    Drops list bullets, prefixes such as ``Explanation:`` or ``Answer -``, markdown bold, the
    ``<< >>`` marks of the prompt and surrounding quotes; a line that is only a prefix
    (``Explanation:`` followed by the answer on the next line) is skipped. The result is cut
    at a word boundary to at most ``max_chars`` characters. Raises ValueError (quoting the
    reply) when nothing is left.
    """
    for line in text.splitlines():
        s = line.replace("**", "").replace("<<", "").replace(">>", "").strip()
        for _ in range(3):
            s = _unquote(_PREFIX.sub("", _BULLET.sub("", s)).strip())
        if not s:
            continue
        if len(s) > max_chars:
            cut = s[:max_chars]
            space = cut.rfind(" ")
            s = (cut[:space] if space > max_chars // 2 else cut).rstrip(" ,;:")
        return s
    raise ValueError(f"no explanation in the model's reply {text!r}")


def explain(
    model: ChatModel,
    top: Sequence[Example],
    top_logits: Sequence[str] | None = None,
    *,
    max_new_tokens: int = 40,
    **kw,
) -> str:
    """Ask ``model`` for a one-line explanation of the feature (greedy, temperature 0).

    ``kw`` goes to :func:`explanation_messages`; the reply is cleaned by :func:`parse_explanation`.
    """
    messages = explanation_messages(top, top_logits, **kw)
    return parse_explanation(model.chat(messages, max_tokens=max_new_tokens, temperature=0.0))
