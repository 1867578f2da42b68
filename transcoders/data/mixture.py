"""Weighted text mixtures for ``--data``: ``a.jsonl:0.5,sotu:0.3,docs/:0.2``.

:func:`parse_data` is the one place where a ``--data`` value is read; :func:`mixture_counts` is
the rule that says how many contexts each source contributes (used by
:func:`~transcoders.data.tokens.build_token_split` and
:func:`~transcoders.data.tokens.tokenize_source`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

from .sources import DEFAULT_SOURCE, NAMED_SOURCES, DataSourceError

__all__ = ["DEFAULT_DATA", "MixturePart", "is_mixture", "mixture_counts", "parse_data"]

# The default training text: English of several genres, all bundled or read from this Python (see
# sources.py for each source's size and licence). Weights chosen so no one genre dominates; with
# the default 5% held out, email (the smallest) limits the train split to about 5.9M SmolLM2 tokens.
# A layer-6 transcoder trained on it recovers 87-98% of the loss on every source's held-out text,
# against 46-98% for one trained on the State of the Union corpus alone (benchmarks/RESULTS.md).
DEFAULT_DATA = "books:0.3,email:0.15,pydocs:0.15,djangodocs:0.1,stdlib:0.2,sotu:0.1"

_EXAMPLE = "e.g. --data notes.jsonl:0.5,sotu:0.3,docs/:0.2"


@dataclass(frozen=True)
class MixturePart:
    """One source of a ``--data`` value.

    ``source``: what :func:`~transcoders.data.sources.load_documents` takes (``None`` for the
    bundled corpus, a path, or a dataset name). ``share``: its exact share of the contexts,
    the weights normalised so the shares of a mixture sum to exactly 1 (1 for a lone source).
    ``label``: the source as written (``"sotu"`` for ``None``), unique within a mixture.
    """

    source: str | os.PathLike | None
    share: Fraction
    label: str


def _exists(name: str) -> bool:
    return Path(name).expanduser().exists()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _weight(name: str, tail: str) -> Fraction:
    """The number ``tail`` as the exact weight of source ``name`` (the decimal as written: 0.3 is
    3/10, not the nearest binary float). Raises DataSourceError unless it is positive and finite."""
    value = float(tail)
    if not (math.isfinite(value) and value > 0):
        raise DataSourceError(f"the weight of {name!r} is {tail.strip()!r}, not a positive number; weights are "
                              f"shares such as 0.5 or 2 ({_EXAMPLE}).")
    try:
        return Fraction(Decimal(tail.strip()))
    except (InvalidOperation, ValueError):  # pragma: no cover - float() and Decimal() accept the same finite numbers
        return Fraction(value)


def _split_entry(entry: str) -> tuple[str, Fraction | None]:
    """``"NAME:WEIGHT"`` -> (NAME, weight); a path that exists as written, or one whose last
    ``:`` is not followed by a number, has no weight (None)."""
    if _exists(entry) or ":" not in entry:
        return entry, None
    name, tail = entry.rsplit(":", 1)
    name = name.strip()
    if not tail.strip():
        raise DataSourceError(f"{entry!r} ends in ':' with no weight after it; write SOURCE:WEIGHT ({_EXAMPLE}).")
    if not _is_number(tail):
        return entry, None
    if not name:
        raise DataSourceError(f"weight {tail.strip()!r} has no source before it; write SOURCE:WEIGHT ({_EXAMPLE}).")
    return name, _weight(name, tail)


def _key(name: str) -> str:
    """What makes two entries the same source: the name of a named source, else the resolved path
    of an existing path, else the name."""
    if name in NAMED_SOURCES:
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def parse_data(data: str | os.PathLike | None) -> list[MixturePart]:
    """Read a ``--data`` value: one source, or a weighted mixture ``SOURCE:WEIGHT,SOURCE:WEIGHT,...``.

    A lone source (``None``, a named source such as ``"sotu"``, a path that exists as written,
    anything without a comma or a trailing ``:NUMBER``) is returned unchanged as one part with
    share 1, so it loads exactly as before. Otherwise the value is split at commas (spaces around entries are ignored) and
    each entry that is not an existing path is split at its last ``:`` when what follows is a
    number (``float()`` syntax): that number is the weight. Local paths and dataset names may
    therefore contain ``:`` (an existing path always wins) and ``/``. A lone weighted source
    (``notes.jsonl:0.5``) is that source with share 1. Weights are positive numbers in any
    unit; they are normalised exactly (as the decimals written) to shares summing to 1.

    Returns one :class:`MixturePart` per source, in the order written.
    Raises DataSourceError (one line: the problem and the fix) for an empty entry, a weight that
    is not a positive finite number, a weight without a source, an entry of a mixture without
    a weight, and a source given twice (paths compared after resolving).
    """
    if data is None or isinstance(data, os.PathLike):
        return [MixturePart(data, Fraction(1), DEFAULT_SOURCE if data is None else str(data))]
    if data in NAMED_SOURCES or _exists(data):
        return [MixturePart(data, Fraction(1), data)]
    entries = [e.strip() for e in data.split(",")]
    if len(entries) == 1:
        name, weight = _split_entry(entries[0])
        return [MixturePart(data if weight is None else name, Fraction(1), data if weight is None else name)]
    parts: list[tuple[str, Fraction]] = []
    seen: dict[str, str] = {}
    for entry in entries:
        if not entry:
            raise DataSourceError(f"data mixture {data!r} has an empty entry (two commas in a row, or one at an end); "
                                  f"write SOURCE:WEIGHT,SOURCE:WEIGHT ({_EXAMPLE}).")
        name, weight = _split_entry(entry)
        if weight is None:
            if _is_number(entry):  # a bare number: "a.jsonl:0,5" split at a decimal comma
                raise DataSourceError(f"data mixture {data!r} has an entry {entry!r} with no source name; write weights "
                                      f"with a decimal point (0.5, not 0,5) ({_EXAMPLE}).")
            raise DataSourceError(f"{entry!r} in data mixture {data!r} has no weight; give every source of a mixture "
                                  f"one as SOURCE:WEIGHT ({_EXAMPLE}), or if {entry!r} is a path, it does not exist.")
        key = _key(name)
        if key in seen:
            raise DataSourceError(f"{name!r} appears twice in data mixture {data!r} (as {seen[key]!r} and {name!r}); "
                                  f"give each source once, with the sum of its weights.")
        seen[key] = name
        parts.append((name, weight))
    total = sum(w for _, w in parts)
    return [MixturePart(name, w / total, name) for name, w in parts]


def is_mixture(data: str | os.PathLike | None) -> bool:
    """True if ``data`` names more than one source (see :func:`parse_data`; raises as it does)."""
    return len(parse_data(data)) > 1


def mixture_counts(available: Sequence[int], shares: Sequence[Fraction], cap: int | None = None) -> list[int]:
    """How many contexts each source contributes, so that the shares hold exactly and no source
    is repeated.

    With ``n_i = available[i]`` contexts and share ``p_i`` (summing to 1), the total is
    ``N = min(cap, min_i floor(n_i / p_i))``: the source that runs out first (relative to its
    share) limits the total, and the larger sources are subsampled. Source ``i`` gives
    ``floor(N * p_i)`` contexts, and the ``N - sum_i floor(N * p_i)`` left over go one each to
    the sources with the largest fractional parts ``N * p_i - floor(N * p_i)`` (ties: the
    earlier source) -- largest-remainder rounding, in exact rational arithmetic. So
    ``sum(counts) == N``, ``|counts[i] - N * p_i| < 1`` and ``counts[i] <= available[i]``.

    Returns a list of ints (contexts, not tokens) in source order.
    Raises ValueError if the lengths differ, a share is not positive, or ``cap < 1``.
    """
    if len(available) != len(shares) or not shares:
        raise ValueError(f"need one share per source, got {len(shares)} shares for {len(available)} sources")
    if any(p <= 0 for p in shares):
        raise ValueError(f"shares must be positive, got {list(shares)}")
    if cap is not None and cap < 1:
        raise ValueError(f"cap must be at least 1 context, got {cap}")
    total = min(math.floor(Fraction(n) / p) for n, p in zip(available, shares))
    if cap is not None:
        total = min(total, cap)
    exact = [total * Fraction(p) for p in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - exact[i], i))  # largest remainder first
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    assert all(c <= n for c, n in zip(counts, available)), (counts, available)
    return counts
