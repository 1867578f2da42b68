"""Streamed token contexts: training text read, split, tokenized and shuffled as training needs it.

:func:`~transcoders.data.tokens.build_token_split` holds a whole source in memory twice (its
documents, then all their tokens); a 2 GB ``.jsonl`` file or a Hub dataset such as FineWeb does
not fit. Here the same contexts are made one document at a time:

1. the documents of each source are read lazily (:func:`~transcoders.data.sources.iter_documents`);
2. each goes to the train or the eval side by the hash rule of
   :func:`~transcoders.data.tokens.split_documents` (``sha256(name) < eval_fraction``: eval),
   decided document by document (:func:`side_documents`);
3. the documents of a side are packed into contexts exactly as
   :func:`~transcoders.data.tokens.tokenize_documents` packs them (text ids + separator, cut into
   rows of ``ctx_len``, each led by ``bos_id`` when given, :func:`pack_contexts`), so one pass
   over a lone source's train side gives the rows the in-memory path would give for the same
   documents in the same order;
4. the sources of a mixture are interleaved by weight (:func:`interleave_schedule`); a source that
   runs out starts again (its next epoch), and so does a lone source, so the stream is endless;
5. a seeded buffer of ``shuffle_contexts`` contexts spreads the contexts of one document apart.

Context ``i`` of a :class:`TokenStream` is therefore a pure function of (source, tokenizer,
settings, seed, ``i``): resuming at context ``i`` replays steps 1-5 without the model, and
gives exactly the contexts an uninterrupted run would have had. Tokenization runs in a
background thread (fast tokenizers release the GIL) ahead of the consumer through a bounded
queue; the memory held is the shuffle buffer, the queue and the document being tokenized,
whatever the size of the corpus.

:func:`collect_eval` gives the held-out contexts, reading each source only as far as it needs.

What differs from the in-memory split, because a stream cannot look at all of its documents
first: when the hash rule happens to put no document (or every document) of a source on one
side, the in-memory split moves one document across, and the stream does not (the eval side
is then empty, and :func:`collect_eval` says so). A source of exactly one document is cut
into ``#train`` and ``#eval`` parts as in the in-memory split. A plain text file larger than
:data:`~transcoders.data.sources.TXT_PIECE_BYTES` is read in pieces (``file.txt@1``, ...),
each piece a document.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import random
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Literal

import torch

from .mixture import MixturePart, parse_data
from .sources import NAMED_SOURCES, DataSourceError, Document, _folder_files, _looks_like_path, iter_documents
from .tokens import _check_cap, _hash_fraction, _split_single, separator_token_id, take_shares

__all__ = ["STREAM_AUTO_BYTES", "SHUFFLE_CONTEXTS", "TokenStream", "collect_eval", "interleave_schedule",
           "pack_contexts", "should_stream", "side_documents"]

# --streaming auto: local files larger than this in total are streamed.
STREAM_AUTO_BYTES = 256 * 2**20
SHUFFLE_CONTEXTS = 1024
PREFETCH_CONTEXTS = 256
_BATCH_DOCS = 64  # documents per tokenizer call, as tokens.py
_BATCH_CHARS = 1 << 20  # ... and at most about this much text
# One tokenizer may serve several streams (the ranks of a MergedStream): their calls take turns,
# since a fast tokenizer whose settings change under a running call raises "Already borrowed".
_TOKENIZER_LOCK = threading.Lock()


def _hub_dataset(source: str | os.PathLike | None) -> bool:
    """True if :func:`~transcoders.data.sources.load_documents` would read ``source`` from the Hub."""
    if source is None or isinstance(source, os.PathLike):
        return False
    return source not in NAMED_SOURCES and not Path(source).expanduser().exists() and not _looks_like_path(source)


def _local_bytes(source: str | os.PathLike | None) -> int:
    """Size of the local files ``source`` reads (a folder: its ``*.txt`` files); 0 for a named
    source, a dataset or a missing path."""
    if source is None or (isinstance(source, str) and source in NAMED_SOURCES):
        return 0
    path = Path(source).expanduser()
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in _folder_files(path))
    return 0


def should_stream(data: str | os.PathLike | None, streaming: bool | None = None) -> bool:
    """Whether training on ``data`` (a ``--data`` value, see
    :func:`~transcoders.data.mixture.parse_data`) streams: ``streaming`` when it is given, else
    (auto) True when any source is a Hugging Face dataset (not a named source, not an existing
    path) or its local files hold more than :data:`STREAM_AUTO_BYTES` (256 MiB) in total.

    Raises:
        DataSourceError: a malformed mixture.
    """
    if streaming is not None:
        return streaming
    parts = parse_data(data)
    if any(_hub_dataset(p.source) for p in parts):
        return True
    return sum(_local_bytes(p.source) for p in parts) > STREAM_AUTO_BYTES


def side_documents(docs: Iterable[Document], eval_fraction: float, side: Literal["train", "eval"]) -> Iterator[Document]:
    """The documents of ``docs`` that :func:`~transcoders.data.tokens.split_documents` puts on
    ``side``, decided one document at a time: eval iff ``_hash_fraction(name) < eval_fraction``.
    A source of exactly one document (seen by reading one document ahead) is cut into
    ``name#train`` / ``name#eval`` as there. Unlike there, a side the rule leaves empty stays
    empty (a stream cannot move a document across after the fact).

    Raises:
        ValueError: ``eval_fraction`` not strictly between 0 and 1.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be strictly between 0 and 1, got {eval_fraction!r}")
    return _side(iter(docs), eval_fraction, side == "eval")


def _side(it: Iterator[Document], eval_fraction: float, want_eval: bool) -> Iterator[Document]:
    first = next(it, None)
    if first is None:
        return
    second = next(it, None)
    if second is None:
        train, evals = _split_single(first, eval_fraction)
        yield from evals if want_eval else train
        return
    for doc in itertools.chain((first, second), it):
        if (_hash_fraction(doc.name) < eval_fraction) == want_eval:
            yield doc


def _text_batches(docs: Iterator[Document]) -> Iterator[list[str]]:
    """Texts in groups of 1, 2, 4, ... and then ``_BATCH_DOCS`` documents, each of about
    ``_BATCH_CHARS`` characters at most: a reader that needs a few contexts reads a few
    documents, a long stream is tokenized in batches."""
    batch: list[str] = []
    chars, size = 0, 1
    for doc in docs:
        batch.append(doc.text)
        chars += len(doc.text)
        if len(batch) >= size or chars >= _BATCH_CHARS:
            yield batch
            batch, chars, size = [], 0, min(2 * size, _BATCH_DOCS)
    if batch:
        yield batch


@dataclass
class _Packed:
    """What :func:`pack_contexts` has read so far: documents and tokens (separators included)."""

    documents: int = 0
    tokens: int = 0


def pack_contexts(docs: Iterable[Document], tokenizer, ctx_len: int, bos_id: int | None = None,
                  counts: _Packed | None = None) -> Iterator[torch.Tensor]:
    """The contexts of ``docs``, made as they are needed, as
    :func:`~transcoders.data.tokens.tokenize_documents` makes them: each text tokenized without
    special tokens (the same tokenizer call, in groups of 1, 2, 4, ... up to 64 documents), followed by
    ``separator_token_id(tokenizer)``; the documents joined in order and cut into rows of
    ``ctx_len`` tokens (``bos_id`` and ``ctx_len - 1`` text tokens with ``bos_id``); the
    incomplete rest at the end dropped. ``counts``, when given, is kept up to date.

    Yields int64 tensors of shape [ctx_len], each its own copy (holding one keeps nothing else).
    Raises ValueError if ``ctx_len < 1`` (2 with ``bos_id``) or the tokenizer has no eos/bos
    token; the reading errors of ``docs`` (DataSourceError) pass through.
    """
    if ctx_len < 1 + (bos_id is not None):
        raise ValueError(f"ctx_len must be >= {1 + (bos_id is not None)}, got {ctx_len}")
    sep = separator_token_id(tokenizer)
    return _pack(iter(docs), tokenizer, ctx_len, bos_id, sep, counts if counts is not None else _Packed())


def _pack(docs: Iterator[Document], tokenizer, ctx_len: int, bos_id: int | None, sep: int,
          counts: _Packed) -> Iterator[torch.Tensor]:
    body = ctx_len - (bos_id is not None)
    carry = torch.empty(0, dtype=torch.int64)
    for texts in _text_batches(docs):
        with _TOKENIZER_LOCK:
            ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        pieces = [carry, *(torch.tensor([*one, sep], dtype=torch.int64) for one in ids)]
        counts.documents += len(texts)
        counts.tokens += sum(len(one) + 1 for one in ids)
        joined = torch.cat(pieces)
        n = joined.numel() // body
        rows = joined[: n * body].view(n, body)
        if bos_id is not None:
            rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.int64), rows], dim=1)
        carry = joined[n * body :].clone()
        for row in rows:
            yield row.clone()


def interleave_schedule(shares: Sequence[Fraction]) -> Iterator[int]:
    """Which source each context of a mixture comes from: context ``i`` goes to the source that
    is furthest behind its share, ``argmax_k ((i + 1) * shares[k] - taken_k)`` (ties: the earlier
    source) -- smooth weighted round robin, in exact integer arithmetic. After ``n`` contexts
    source ``k`` has given ``n * shares[k]`` of them, less than one off.

    Yields source indices forever. Raises ValueError for no shares or a share that is not positive.
    """
    if not shares or any(s <= 0 for s in shares):
        raise ValueError(f"need positive shares, got {list(shares)}")
    return _schedule([Fraction(s) for s in shares])


def _schedule(shares: list[Fraction]) -> Iterator[int]:
    scale = math.lcm(*(s.denominator for s in shares))
    weights = [s.numerator * (scale // s.denominator) for s in shares]
    total = sum(weights)
    behind = [0] * len(weights)  # total * ((i + 1) * share - taken), up to the common factor
    while True:
        for k, w in enumerate(weights):
            behind[k] += w
        k = max(range(len(weights)), key=lambda j: (behind[j], -j))
        behind[k] -= total
        yield k


class _Prefetch:
    """Runs ``make()`` in a daemon thread and hands its items over through a queue of at most
    ``size`` items: the thread runs ahead of the consumer by that much and then waits. An
    exception of the thread is raised in the consumer; :meth:`close` stops the thread."""

    _ITEM, _END, _ERROR = range(3)

    def __init__(self, make: Callable[[], Iterator], size: int, name: str = "token-stream"):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(make,), name=name, daemon=True)
        self._thread.start()

    def _run(self, make: Callable[[], Iterator]) -> None:
        try:
            for item in make():
                if not self._put((self._ITEM, item)):
                    return
            self._put((self._END, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._put((self._ERROR, e))

    def _put(self, message) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> _Prefetch:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        kind, item = self._queue.get()
        if kind == self._ITEM:
            return item
        self._done = True
        if kind == self._ERROR:
            raise item
        raise StopIteration

    def close(self) -> None:
        self._stop.set()
        self._done = True
        while True:  # free a thread blocked on a full queue at once
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)


@dataclass(frozen=True, eq=False)
class TokenStream:
    """The endless, shuffled training contexts of a ``--data`` value, made while training reads them.

    Args:
        data: one source or a weighted mixture (see :func:`~transcoders.data.mixture.parse_data`).
        tokenizer: the model's tokenizer (a fast one tokenizes in parallel with the model).
        ctx_len: tokens per context.
        eval_fraction: share of documents held out (those :func:`collect_eval` reads), never trained on.
        seed: seed of the shuffle buffer.
        shuffle_contexts: contexts in the shuffle buffer.
        text_field, split: as for :func:`~transcoders.data.sources.load_documents`.
        bos_id: lead every context with this token (see :mod:`transcoders.models.bos`).
        prefetch: contexts the background thread may make ahead of the consumer.
        rank, world: this stream is contexts ``i`` with ``i % world == rank`` of the whole one
            (data-parallel training, see :meth:`shard`).

    The stream before shuffling (:meth:`unshuffled`) takes context ``i`` from source
    ``interleave_schedule(shares)[i]``; each source gives the contexts of its train side in
    order (:func:`side_documents`, :func:`pack_contexts`), and starts again when it runs out.
    :meth:`shuffled` passes them through a buffer of ``shuffle_contexts``: each step a
    position drawn by ``random.Random(seed)`` is emitted and refilled with the next context.

    Memory: ``shuffle_contexts + prefetch`` contexts and one tokenizer batch, whatever the corpus.
    Errors of the source (DataSourceError) are raised by the iterator that meets them,
    including a source whose train side holds fewer than ``ctx_len`` tokens.
    """

    data: str | os.PathLike | None
    tokenizer: object
    ctx_len: int
    eval_fraction: float = 0.05
    seed: int = 0
    shuffle_contexts: int = SHUFFLE_CONTEXTS
    text_field: str = "text"
    split: str = "train"
    bos_id: int | None = None
    prefetch: int = PREFETCH_CONTEXTS
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.ctx_len < 1 + (self.bos_id is not None):
            raise ValueError(f"ctx_len must be >= {1 + (self.bos_id is not None)}, got {self.ctx_len}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be strictly between 0 and 1, got {self.eval_fraction!r}")
        if self.shuffle_contexts < 1:
            raise ValueError(f"shuffle_contexts must be at least 1, got {self.shuffle_contexts}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world - 1}")
        separator_token_id(self.tokenizer)  # a tokenizer without eos/bos fails now
        parse_data(self.data)  # so does a malformed mixture

    @property
    def parts(self) -> list[MixturePart]:
        """The sources, in the order given."""
        return parse_data(self.data)

    def shard(self, rank: int, world: int) -> TokenStream:
        """Rank ``rank``'s share of this (whole) stream: contexts ``i`` with ``i % world == rank``
        (every rank tokenizes the whole stream and keeps its share, so the shares never overlap).

        Raises:
            ValueError: this stream is a share already, or ``rank`` is not in ``0..world - 1``.
        """
        if (self.rank, self.world) != (0, 1):
            raise ValueError("shard a whole stream, not a shard")
        return replace(self, rank=rank, world=world)

    # ---------------------------------------------------------------- the contexts
    def source_contexts(self, k: int) -> Iterator[torch.Tensor]:
        """Source ``k``'s train-side contexts ([ctx_len] int64 each), epoch after epoch.

        Raises:
            DataSourceError: the source cannot be read, or a whole pass over it gives no context.
        """
        part = self.parts[k]
        mixture = len(self.parts) > 1
        try:
            for epoch in itertools.count():
                counts = _Packed()
                docs = iter_documents(part.source, text_field=self.text_field, split=self.split)
                n = 0
                for row in pack_contexts(side_documents(docs, self.eval_fraction, "train"), self.tokenizer,
                                         self.ctx_len, self.bos_id, counts):
                    n += 1
                    yield row
                if n == 0:
                    raise DataSourceError(
                        f"the train side (eval_fraction={self.eval_fraction}) of {part.label!r} gave "
                        f"{counts.tokens} tokens from {counts.documents} documents in epoch {epoch}, fewer than "
                        f"ctx_len={self.ctx_len}; use a smaller ctx_len or more text.")
        except DataSourceError as e:
            if mixture:
                raise DataSourceError(f"mixture source {part.label!r}: {e}") from None
            raise

    def unshuffled(self, with_source: bool = False) -> Iterator:
        """The whole stream before shuffling: contexts ([ctx_len] int64), or ``(source index,
        context)`` pairs with ``with_source``, interleaved by :func:`interleave_schedule`."""
        parts = self.parts
        if len(parts) == 1:
            rows = self.source_contexts(0)
            return ((0, row) for row in rows) if with_source else rows
        return self._interleave(parts, with_source)

    def _interleave(self, parts: list[MixturePart], with_source: bool) -> Iterator:
        sources = [self.source_contexts(k) for k in range(len(parts))]
        for k in interleave_schedule([p.share for p in parts]):
            row = next(sources[k])
            yield (k, row) if with_source else row

    def shuffled(self) -> Iterator[torch.Tensor]:
        """The whole stream, shuffled (in the calling thread): context ``i`` of training."""
        rows = self.unshuffled()
        buffer = list(itertools.islice(rows, self.shuffle_contexts))
        rng = random.Random(self.seed)
        while True:
            j = rng.randrange(len(buffer))
            yield buffer[j]
            buffer[j] = next(rows)

    def contexts(self, start: int = 0) -> Generator[torch.Tensor, None, None]:
        """This stream's contexts from its ``start``-th on (the whole stream's ``i = j * world +
        rank`` for ``j >= start``), made by a background thread that replays the stream from
        its beginning to get there (tokenizing, never running the model). Closing the iterator
        stops the thread."""
        first = start * self.world + self.rank
        prefetch = _Prefetch(lambda: itertools.islice(self.shuffled(), first, None, self.world), self.prefetch)
        try:
            yield from prefetch
        finally:
            prefetch.close()

    def blocks(self, n: int, start_block: int = 0) -> Generator[torch.Tensor, None, None]:
        """Consecutive blocks of ``n`` contexts of this stream, [n, ctx_len] int64, from block
        ``start_block`` (its contexts ``[start_block * n, (start_block + 1) * n)``) on."""
        if n < 1:
            raise ValueError(f"a block needs at least one context, got {n}")
        rows = self.contexts(start_block * n)
        try:
            while True:
                yield torch.stack([next(rows) for _ in range(n)])
        finally:
            rows.close()


def _first_contexts(part: MixturePart, tokenizer, ctx_len: int, limit: int, *, eval_fraction: float, text_field: str,
                    split: str, bos_id: int | None) -> tuple[torch.Tensor, _Packed]:
    """The first ``limit`` eval-side contexts of one source ([<= limit, ctx_len]), reading no further."""
    counts = _Packed()
    docs = side_documents(iter_documents(part.source, text_field=text_field, split=split), eval_fraction, "eval")
    rows = list(itertools.islice(pack_contexts(docs, tokenizer, ctx_len, bos_id, counts), limit))
    if not rows:
        raise DataSourceError(
            f"the held-out documents ({counts.documents} of them) gave only {counts.tokens} tokens, fewer than "
            f"ctx_len={ctx_len}; use a smaller ctx_len, a larger eval_fraction or more text.")
    return torch.stack(rows), counts


def collect_eval(data: str | os.PathLike | None, tokenizer, ctx_len: int, *, max_eval_tokens: int,
                 eval_fraction: float = 0.05, text_field: str = "text", split: str = "train",
                 bos_id: int | None = None, log: Callable[[str], None] | None = None,
                 ) -> tuple[torch.Tensor, list[tuple[str, slice]]]:
    """The held-out contexts of ``data`` as a stream gives them: the eval side (see
    :func:`side_documents`) of each source, packed by :func:`pack_contexts`, reading each source
    only until it has given what is needed.

    A lone source gives its first ``max_eval_tokens // ctx_len`` eval contexts (fewer if it has
    fewer). A mixture takes from each source its first ``ceil(cap * share)`` eval contexts,
    then ``counts = mixture_counts(available, shares, cap)`` of them, grouped by source in the
    order given, as :func:`~transcoders.data.tokens.build_token_split` does (``log`` gets the
    same line saying what each source gave). Where the hash rule puts documents on both sides,
    these rows equal ``build_token_split(...).eval``.

    Returns (int64 rows [n, ctx_len], ``(label, slice of rows)`` per source).
    Raises DataSourceError (a source that cannot be read, or whose eval side gives fewer than
    ``ctx_len`` tokens: the message names it) or ValueError (``max_eval_tokens < ctx_len``, bad
    ``eval_fraction`` or ``ctx_len``, a tokenizer without eos/bos).
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be strictly between 0 and 1, got {eval_fraction!r}")
    cap = _check_cap("max_eval_tokens", max_eval_tokens, ctx_len)
    assert cap is not None
    what = f"eval split (eval_fraction={eval_fraction})"

    def first(part: MixturePart, limit: int) -> torch.Tensor:
        return _first_contexts(part, tokenizer, ctx_len, limit, eval_fraction=eval_fraction, text_field=text_field,
                               split=split, bos_id=bos_id)[0]

    parts = parse_data(data)
    if len(parts) == 1:
        try:
            rows = first(parts[0], cap)
        except DataSourceError as e:
            raise DataSourceError(f"{what}: {e}") from None
        return rows, [(parts[0].label, slice(0, rows.shape[0]))]
    shares = [p.share for p in parts]
    got = []
    for part in parts:
        limit = math.ceil(cap * part.share)
        try:
            got.append(first(part, limit))
        except DataSourceError as e:
            raise DataSourceError(f"{what} of mixture source {part.label!r}: {e}") from None
    available = [rows.shape[0] for rows in got]
    complete = [rows.shape[0] < math.ceil(cap * p.share) for rows, p in zip(got, parts)]
    counts, sources = take_shares(what, [p.label for p in parts], shares, available, complete, cap, ctx_len, log)
    return torch.cat([rows[:n] for rows, n in zip(got, counts)]), sources
