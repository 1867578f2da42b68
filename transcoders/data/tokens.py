"""Deterministic train/eval document splits and fixed-length token contexts."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from .mixture import MixturePart, mixture_counts, parse_data
from .sources import DataSourceError, Document, iter_documents, load_documents

__all__ = ["TokenSplit", "split_documents", "tokenize_documents", "tokenize_source", "build_token_split",
           "separator_token_id"]

_BATCH_DOCS = 64


@dataclass
class TokenSplit:
    """Train and eval token contexts from disjoint sets of documents.

    ``train``: [n_train_ctx, ctx_len] int64; ``eval``: [n_eval_ctx, ctx_len] int64.
    ``train_documents`` / ``eval_documents``: names of the documents that contributed tokens
    to those rows, in order (in a mixture prefixed by their source's label: ``"sotu|1790_...txt"``).
    ``separator_id``: the token appended after every document.
    ``train_sources`` / ``eval_sources``: ``(label, rows)`` per source, in the order given,
    ``rows`` a slice of the row axis (``split.eval[rows]`` are that source's contexts); the
    slices tile the rows in order. One entry for a lone source.
    """

    train: torch.Tensor
    eval: torch.Tensor
    train_documents: list[str]
    eval_documents: list[str]
    separator_id: int
    train_sources: list[tuple[str, slice]] = field(default_factory=list)
    eval_sources: list[tuple[str, slice]] = field(default_factory=list)


def _hash_fraction(name: str) -> float:
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:16], 16) / 2**64


def _split_single(doc: Document, eval_fraction: float) -> tuple[list[Document], list[Document]]:
    text = doc.text
    target = min(max(round(len(text) * (1 - eval_fraction)), 1), max(len(text) - 1, 1))
    back = target
    while back > 0 and not text[back - 1].isspace():
        back -= 1
    fwd = target
    while fwd < len(text) and not text[fwd].isspace():
        fwd += 1
    candidates = [c for c in (back, fwd) if 0 < c < len(text)]
    cut = min(candidates, key=lambda c: abs(c - target)) if candidates else target
    train_text, eval_text = text[:cut].rstrip(), text[cut:].lstrip()
    train = [Document(doc.name + "#train", train_text)] if train_text else []
    evals = [Document(doc.name + "#eval", eval_text)] if eval_text else []
    return train, evals


def split_documents(docs: list[Document], eval_fraction: float = 0.05) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, eval) by a hash of their names.

    A document goes to eval iff ``int(sha256(name)[:16 hex], 16) / 2**64 < eval_fraction``, so the
    split is independent of input order and of Python's hash seed. With >= 2 documents both sides
    are non-empty (the smallest hash is moved to eval / the largest back to train if needed). A
    single document is cut at a whitespace boundary into ``name#train`` and the last ~eval_fraction
    of its characters, ``name#eval``. Both lists keep the input order.
    Raises ValueError unless ``0 < eval_fraction < 1``.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be strictly between 0 and 1, got {eval_fraction!r}")
    if len(docs) == 1:
        return _split_single(docs[0], eval_fraction)
    keys = [(_hash_fraction(d.name), d.name, d.text) for d in docs]
    is_eval = [k[0] < eval_fraction for k in keys]
    if len(docs) >= 2 and not any(is_eval):
        is_eval[min(range(len(docs)), key=keys.__getitem__)] = True
    if len(docs) >= 2 and all(is_eval):
        is_eval[max(range(len(docs)), key=keys.__getitem__)] = False
    return [d for d, e in zip(docs, is_eval) if not e], [d for d, e in zip(docs, is_eval) if e]


def separator_token_id(tokenizer) -> int:
    """The id placed between documents: ``eos_token_id``, else ``bos_token_id``.

    Raises ValueError if the tokenizer has neither.
    """
    for attr in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} has neither an eos_token_id nor a bos_token_id, "
        f"so documents cannot be separated; give it an eos token (e.g. tokenizer.add_special_tokens(...))."
    )


def _tokenize(docs: list[Document], tokenizer, ctx_len: int, max_tokens: int | None,
              bos_id: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Rows of tokens (each led by ``bos_id`` when given) and the end of each tokenized
    document in the joined text tokens (cumulative lengths, separators included)."""
    _check_ctx_len(ctx_len, bos_id)
    if max_tokens is not None and max_tokens < ctx_len:
        raise ValueError(f"max_tokens ({max_tokens}) must be at least ctx_len ({ctx_len})")
    sep = separator_token_id(tokenizer)
    body = ctx_len - (bos_id is not None)  # text tokens per row
    wanted = None if max_tokens is None else (max_tokens // ctx_len) * body
    pieces: list[torch.Tensor] = []
    ends: list[int] = []
    total = 0
    for start in range(0, len(docs), _BATCH_DOCS):
        if wanted is not None and total >= wanted:
            break
        batch = [d.text for d in docs[start : start + _BATCH_DOCS]]
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            pieces.append(torch.tensor([*ids, sep], dtype=torch.int64))
            total += len(ids) + 1
            ends.append(total)
    n_rows = (total if wanted is None else min(total, wanted)) // body
    if n_rows == 0:
        raise _too_little_text(len(docs), total, ctx_len)
    n_docs = _docs_in(ends, n_rows * body)
    rows = torch.cat(pieces[:n_docs])[: n_rows * body].view(n_rows, body)
    if bos_id is not None:
        rows = torch.cat([torch.full((n_rows, 1), bos_id, dtype=torch.int64), rows], dim=1)
    return rows, ends


def _check_ctx_len(ctx_len: int, bos_id: int | None) -> None:
    if ctx_len < 1 + (bos_id is not None):
        raise ValueError(f"ctx_len must be >= {1 + (bos_id is not None)}, got {ctx_len}")


def _too_little_text(n_docs: int, n_tokens: int, ctx_len: int) -> DataSourceError:
    return DataSourceError(f"{n_docs} documents gave only {n_tokens} tokens, fewer than ctx_len={ctx_len}; "
                           f"use a smaller ctx_len or more text.")


def _docs_in(ends: list[int], n_tokens: int) -> int:
    """How many leading documents (ending at ``ends``) contribute to the first ``n_tokens`` tokens."""
    return 0 if n_tokens <= 0 else bisect.bisect_left(ends, n_tokens) + 1


def tokenize_documents(docs: list[Document], tokenizer, ctx_len: int, max_tokens: int | None = None,
                       bos_id: int | None = None) -> torch.Tensor:
    """Tokenize documents into consecutive fixed-length contexts.

    Each text is tokenized without special tokens (batched, fast tokenizer), followed by
    ``separator_token_id(tokenizer)``; documents are joined in order and cut into rows of
    ``ctx_len`` tokens, dropping the incomplete remainder. With ``bos_id`` (models trained with
    a BOS token at the start of every sequence, see :mod:`transcoders.models.bos`), each row is
    that token followed by ``ctx_len - 1`` text tokens. With ``max_tokens``, at most
    ``max_tokens // ctx_len`` rows are made and tokenization stops once they are filled.
    Returns an int64 tensor of shape [n_ctx, ctx_len].
    Raises DataSourceError if fewer than ``ctx_len`` tokens result; ValueError if ``ctx_len < 1``
    (2 with ``bos_id``), ``max_tokens < ctx_len`` or the tokenizer has no eos/bos token.
    """
    return _tokenize(docs, tokenizer, ctx_len, max_tokens, bos_id)[0]


def _check_cap(name: str, cap: int | None, ctx_len: int) -> int | None:
    """``cap`` tokens as whole contexts (None: no cap); the same check as :func:`_tokenize`."""
    if cap is None:
        return None
    if cap < ctx_len:
        raise ValueError(f"{name} ({cap}) must be at least ctx_len ({ctx_len})")
    return cap // ctx_len


def _load(label: str, source, text_field: str, split: str) -> list[Document]:
    try:
        return load_documents(source, text_field=text_field, split=split)
    except DataSourceError as e:
        raise DataSourceError(f"mixture source {label!r}: {e}") from None


def _mix(what: str, groups: Sequence[tuple[str, list[Document]]], shares: Sequence[Fraction], tokenizer,
         ctx_len: int, cap: int | None, bos_id: int | None, log: Callable[[str], None] | None,
         ) -> tuple[torch.Tensor, list[str], list[tuple[str, slice]]]:
    """Tokenize each ``(label, documents)`` group and keep the first ``counts[i]`` contexts of group
    ``i``, ``counts = mixture_counts(contexts per group, shares, cap)`` (``cap`` in contexts).

    Returns rows [sum(counts), ctx_len] grouped by source in order, the labelled names of the
    contributing documents, and ``(label, slice)`` per source.
    """
    body = ctx_len - (bos_id is not None)
    tokenized, complete = [], []
    for (label, docs), share in zip(groups, shares):
        # No source can give more than ceil(cap * share) contexts, so tokenization stops there; a
        # prefix of a capped tokenization is the same prefix as of the full one.
        limit = None if cap is None else math.ceil(cap * share)
        try:
            tokenized.append(_tokenize(docs, tokenizer, ctx_len, None if limit is None else limit * ctx_len, bos_id))
        except DataSourceError as e:
            raise DataSourceError(f"{what} of mixture source {label!r}: {e}") from None
        complete.append(limit is None or tokenized[-1][0].shape[0] < limit)  # False: it may have more
    available = [rows.shape[0] for rows, _ in tokenized]
    counts, sources = take_shares(what, [label for label, _ in groups], shares, available, complete, cap, ctx_len, log)
    pieces, names = [], []
    for (label, docs), (rows, ends), n in zip(groups, tokenized, counts):
        pieces.append(rows[:n])
        names += [f"{label}|{d.name}" for d in docs[: _docs_in(ends, n * body)]]
    return torch.cat(pieces), names, sources


def take_shares(what: str, labels: Sequence[str], shares: Sequence[Fraction], available: list[int], complete: list[bool],
                cap: int | None, ctx_len: int, log: Callable[[str], None] | None,
                ) -> tuple[list[int], list[tuple[str, slice]]]:
    """How many contexts each source of a mixture gives (:func:`~transcoders.data.mixture.mixture_counts`
    of ``available``), the ``(label, rows)`` slice of each in the grouped rows, and the log line
    saying so (``complete[i]``: source ``i`` was read to its end, not cut at a limit)."""
    counts = mixture_counts(available, shares, cap)
    sources, start = [], 0
    for label, n in zip(labels, counts):
        sources.append((label, slice(start, start + n)))
        start += n
    if log is not None:
        log(_summary(what, list(labels), counts, available, shares, cap, ctx_len, complete))
    return counts, sources


def _summary(what: str, labels: list[str], counts: list[int], available: list[int], shares: Sequence[Fraction],
             cap: int | None, ctx_len: int, complete: list[bool]) -> str:
    """One log line: how many contexts each source gave, and what limited the total."""
    total = sum(counts)
    each = []
    for label, n, have, share, whole in zip(labels, counts, available, shares, complete):
        of = (f"all {have} it has" if n == have else f"of {have}") if whole else f"of the first {have}"
        each.append(f"{n} from {label} ({float(share) * 100:.3g}%, {of})")
    if cap is not None and total == cap:
        why = "the cap on tokens sets the total"
    else:
        short = [label for label, have, share in zip(labels, available, shares) if math.floor(have / share) == total]
        verb = "limits" if len(short) == 1 else "limit"
        why = f"{' and '.join(short)} ran out first and {verb} the total (sources are not repeated)"
    empty = [label for label, n in zip(labels, counts) if n == 0]
    warn = f"; warning: {', '.join(empty)} gave no contexts (share below one context)" if empty else ""
    return f"data mixture, {what}: {total} contexts of {ctx_len} tokens: {', '.join(each)}; {why}{warn}"


def tokenize_source(
    source: str | os.PathLike | None,
    tokenizer,
    ctx_len: int,
    *,
    max_tokens: int | None = None,
    text_field: str = "text",
    split: str = "train",
    bos_id: int | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, list[tuple[str, slice]]]:
    """All documents of ``source`` (one source or a mixture, see
    :func:`~transcoders.data.mixture.parse_data`) as contexts, without a train/eval split: for
    text other than a run's own (``evaluate --data``).

    A lone source gives exactly ``tokenize_documents(load_documents(source), ...)``. A mixture
    takes from each source the number of contexts that
    :func:`~transcoders.data.mixture.mixture_counts` gives for ``cap = max_tokens // ctx_len``:
    the first contexts of each source, grouped by source in the order given.

    What is read: without ``max_tokens``, every document of every source (``load_documents``).
    With it, each source is read lazily, one document at a time
    (:func:`~transcoders.data.sources.iter_documents` with whole text files, as
    ``load_documents`` reads them; a Hub dataset streamed), and only until its contexts are
    full: a lone source's ``max_tokens // ctx_len``, a mixture source's ``ceil(cap * share)``
    (the most it can give), plus at most the rest of the tokenizer batch in progress (1, 2,
    4, ... up to 64 documents). The rows, slices and log line are the same either way; so is
    the error for a source that cannot be read -- unless the bad part lies beyond what a capped
    call reads, which then never sees it. A Hub dataset that cannot be streamed is loaded whole.

    Returns (int64 rows [n_ctx, ctx_len], ``(label, slice)`` per source); ``log`` gets a line
    saying what each source of a mixture gave.
    Raises DataSourceError (a source that is missing, malformed in the part that is read, or
    empty; too little text: fewer than ``ctx_len`` tokens in a whole source; in a mixture the
    message names the source) or ValueError (bad ``ctx_len`` / ``max_tokens``, tokenizer without
    eos/bos; with ``max_tokens`` these are raised before any document is read).
    """
    parts = parse_data(source)
    if max_tokens is not None:
        return _tokenize_first(parts, tokenizer, ctx_len, max_tokens, text_field=text_field, split=split,
                               bos_id=bos_id, log=log)
    if len(parts) == 1:
        rows = tokenize_documents(load_documents(parts[0].source, text_field=text_field, split=split), tokenizer,
                                  ctx_len, max_tokens, bos_id)
        return rows, [(parts[0].label, slice(0, rows.shape[0]))]
    groups = [(p.label, _load(p.label, p.source, text_field, split)) for p in parts]
    rows, _, sources = _mix("all documents", groups, [p.share for p in parts], tokenizer, ctx_len, None, bos_id, log)
    return rows, sources


def _lazy_documents(source: str | os.PathLike | None, text_field: str, split: str) -> Iterator[Document]:
    """The documents of one source in ``load_documents``'s order, read as they are iterated
    (text files whole, as ``load_documents`` reads them). A source that cannot be opened so
    (a Hub dataset that cannot be streamed, e.g. offline with a cached copy) is read by
    ``load_documents``, which raises what it raises today when it cannot read it either."""
    try:
        return iter_documents(source, text_field=text_field, split=split, piece_bytes=None)
    except DataSourceError:
        return iter(load_documents(source, text_field=text_field, split=split))


def _close(it: Iterator) -> None:
    """Close a generator now (an open file with it) rather than when it is collected."""
    close = getattr(it, "close", None)
    if close is not None:
        close()


def _first_rows(docs: Iterator[Document], source: str | os.PathLike | None, tokenizer, ctx_len: int, limit: int, *,
                text_field: str, split: str, bos_id: int | None) -> tuple[list[torch.Tensor], int, int]:
    """The first ``limit`` contexts of ``docs``, the documents of ``source`` (fewer if it has
    fewer), reading them only until those are full; and how many documents and tokens were
    tokenized for them. ``docs`` is closed.

    Raises DataSourceError for documents read before the contexts are full that are malformed,
    or a source with no non-empty text (the message ``load_documents`` gives); none for a source
    too short for one context (no rows).
    """
    from .stream import _Packed, pack_contexts  # stream.py imports this module

    counts = _Packed()
    try:
        made = pack_contexts(docs, tokenizer, ctx_len, bos_id, counts)
        try:
            rows = list(itertools.islice(made, limit))
        finally:
            _close(made)
    finally:
        _close(docs)
    if counts.documents == 0:  # an empty source: the error load_documents gives for it
        load_documents(source, text_field=text_field, split=split)
    return rows, counts.documents, counts.tokens


def _tokenize_first(parts: list[MixturePart], tokenizer, ctx_len: int, max_tokens: int, *, text_field: str,
                    split: str, bos_id: int | None, log: Callable[[str], None] | None,
                    ) -> tuple[torch.Tensor, list[tuple[str, slice]]]:
    """:func:`tokenize_source` with a cap, each source read only as far as its contexts need;
    the checks in the order of the uncapped path (a missing path first, then the arguments)."""
    if len(parts) == 1:
        source = parts[0].source
        docs = _lazy_documents(source, text_field, split)
        try:
            _check_ctx_len(ctx_len, bos_id)
            cap = _check_cap("max_tokens", max_tokens, ctx_len)
            assert cap is not None
            separator_token_id(tokenizer)
        except ValueError:
            _close(docs)
            raise
        first, n_docs, n_tokens = _first_rows(docs, source, tokenizer, ctx_len, cap, text_field=text_field,
                                              split=split, bos_id=bos_id)
        if not first:
            raise _too_little_text(n_docs, n_tokens, ctx_len)
        return torch.stack(first), [(parts[0].label, slice(0, len(first)))]
    cap = _check_cap("max_tokens", max_tokens, ctx_len)
    assert cap is not None
    _check_ctx_len(ctx_len, bos_id)
    separator_token_id(tokenizer)
    what = "all documents"
    shares = [p.share for p in parts]
    limits = [math.ceil(cap * share) for share in shares]  # the most each source can give (see _mix)
    got: list[list[torch.Tensor]] = []
    short: list[DataSourceError] = []
    for part, limit in zip(parts, limits):
        try:
            rows, n_docs, n_tokens = _first_rows(_lazy_documents(part.source, text_field, split), part.source,
                                                 tokenizer, ctx_len, limit, text_field=text_field, split=split,
                                                 bos_id=bos_id)
        except DataSourceError as e:
            raise DataSourceError(f"mixture source {part.label!r}: {e}") from None
        if not rows:  # raised once every source is read, as _mix tokenizes only after loading them all
            short.append(DataSourceError(f"{what} of mixture source {part.label!r}: "
                                         f"{_too_little_text(n_docs, n_tokens, ctx_len)}"))
        got.append(rows)
    if short:
        raise short[0]
    available = [len(rows) for rows in got]
    complete = [n < limit for n, limit in zip(available, limits)]  # False: it may have more
    counts, sources = take_shares(what, [p.label for p in parts], shares, available, complete, cap, ctx_len, log)
    return torch.stack([row for rows, n in zip(got, counts) for row in rows[:n]]), sources


def build_token_split(
    source: str | os.PathLike | None,
    tokenizer,
    ctx_len: int,
    *,
    eval_fraction: float = 0.05,
    max_train_tokens: int | None = None,
    max_eval_tokens: int | None = None,
    text_field: str = "text",
    split: str = "train",
    bos_id: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TokenSplit:
    """Load ``source`` (see :func:`load_documents`), split it by document and tokenize both sides.

    ``source`` may be a weighted mixture ``"a.jsonl:0.5,sotu:0.3,docs/:0.2"`` (see
    :func:`~transcoders.data.mixture.parse_data`). Each source is then loaded and split on its own
    by :func:`split_documents` (so its held-out documents are the same as when it is used alone,
    and never reach training) and tokenized on its own; each split takes the first
    ``counts[i]`` contexts of source ``i``, ``counts = mixture_counts(contexts of each source,
    shares, cap)`` (:func:`~transcoders.data.mixture.mixture_counts`: exact shares, the source
    that runs out first limits the total, nothing is repeated; ``cap = max_*_tokens // ctx_len``).
    Rows are grouped by source in the order given; ``train_sources`` / ``eval_sources`` say
    which rows came from which source, and ``log`` gets one line per split with the counts.
    A lone source, with or without a weight, gives exactly what it gave before mixtures.

    Returns a :class:`TokenSplit` with train [n_train_ctx, ctx_len] and eval [n_eval_ctx, ctx_len]
    int64 tensors from disjoint documents, capped at ``max_train_tokens`` / ``max_eval_tokens``;
    every row starts with ``bos_id`` when it is given.
    Raises DataSourceError (bad or malformed source, too little text on either side of any
    source) or ValueError (bad ``eval_fraction`` / ``ctx_len`` / caps, tokenizer without eos/bos).
    """
    parts = parse_data(source)
    if len(parts) > 1:
        return _build_mixture_split(parts, tokenizer, ctx_len, eval_fraction=eval_fraction,
                                    max_train_tokens=max_train_tokens, max_eval_tokens=max_eval_tokens,
                                    text_field=text_field, split=split, bos_id=bos_id, log=log)
    label = parts[0].label
    docs = load_documents(parts[0].source, text_field=text_field, split=split)
    train_docs, eval_docs = split_documents(docs, eval_fraction)
    train, train_ends = _tokenize(train_docs, tokenizer, ctx_len, max_train_tokens, bos_id)
    try:
        evals, eval_ends = _tokenize(eval_docs, tokenizer, ctx_len, max_eval_tokens, bos_id)
    except DataSourceError as e:
        raise DataSourceError(f"eval split (eval_fraction={eval_fraction}): {e}") from None
    body = ctx_len - (bos_id is not None)
    return TokenSplit(
        train=train,
        eval=evals,
        train_documents=[d.name for d in train_docs[: _docs_in(train_ends, train.shape[0] * body)]],
        eval_documents=[d.name for d in eval_docs[: _docs_in(eval_ends, evals.shape[0] * body)]],
        separator_id=separator_token_id(tokenizer),
        train_sources=[(label, slice(0, train.shape[0]))],
        eval_sources=[(label, slice(0, evals.shape[0]))],
    )


def _build_mixture_split(parts, tokenizer, ctx_len: int, *, eval_fraction: float, max_train_tokens: int | None,
                         max_eval_tokens: int | None, text_field: str, split: str, bos_id: int | None,
                         log: Callable[[str], None] | None) -> TokenSplit:
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be strictly between 0 and 1, got {eval_fraction!r}")
    train_cap = _check_cap("max_train_tokens", max_train_tokens, ctx_len)
    eval_cap = _check_cap("max_eval_tokens", max_eval_tokens, ctx_len)
    train_groups, eval_groups = [], []
    for part in parts:
        train_docs, eval_docs = split_documents(_load(part.label, part.source, text_field, split), eval_fraction)
        train_groups.append((part.label, train_docs))
        eval_groups.append((part.label, eval_docs))
    shares = [p.share for p in parts]
    train, train_names, train_sources = _mix("train split", train_groups, shares, tokenizer, ctx_len, train_cap,
                                             bos_id, log)
    evals, eval_names, eval_sources = _mix(f"eval split (eval_fraction={eval_fraction})", eval_groups, shares,
                                           tokenizer, ctx_len, eval_cap, bos_id, log)
    return TokenSplit(train=train, eval=evals, train_documents=train_names, eval_documents=eval_names,
                      separator_id=separator_token_id(tokenizer), train_sources=train_sources,
                      eval_sources=eval_sources)
