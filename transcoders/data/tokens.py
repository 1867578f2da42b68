"""Deterministic train/eval document splits and fixed-length token contexts."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from .sources import DataSourceError, Document, load_documents

__all__ = ["TokenSplit", "split_documents", "tokenize_documents", "build_token_split", "separator_token_id"]

_BATCH_DOCS = 64


@dataclass
class TokenSplit:
    """Train and eval token contexts from disjoint sets of documents.

    ``train``: [n_train_ctx, ctx_len] int64; ``eval``: [n_eval_ctx, ctx_len] int64.
    ``train_documents`` / ``eval_documents``: names of the documents that contributed tokens
    to those rows, in order. ``separator_id``: the token appended after every document.
    """

    train: torch.Tensor
    eval: torch.Tensor
    train_documents: list[str]
    eval_documents: list[str]
    separator_id: int


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
              bos_id: int | None = None) -> tuple[torch.Tensor, int]:
    """Rows of tokens (each led by ``bos_id`` when given) and the number of leading documents
    that contributed to them."""
    if ctx_len < 1 + (bos_id is not None):
        raise ValueError(f"ctx_len must be >= {1 + (bos_id is not None)}, got {ctx_len}")
    if max_tokens is not None and max_tokens < ctx_len:
        raise ValueError(f"max_tokens ({max_tokens}) must be at least ctx_len ({ctx_len})")
    sep = separator_token_id(tokenizer)
    body = ctx_len - (bos_id is not None)  # text tokens per row
    wanted = None if max_tokens is None else (max_tokens // ctx_len) * body
    pieces: list[torch.Tensor] = []
    total = 0
    for start in range(0, len(docs), _BATCH_DOCS):
        if wanted is not None and total >= wanted:
            break
        batch = [d.text for d in docs[start : start + _BATCH_DOCS]]
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            pieces.append(torch.tensor([*ids, sep], dtype=torch.int64))
            total += len(ids) + 1
    n_rows = (total if wanted is None else min(total, wanted)) // body
    if n_rows == 0:
        raise DataSourceError(
            f"{len(docs)} documents gave only {total} tokens, fewer than ctx_len={ctx_len}; "
            f"use a smaller ctx_len or more text."
        )
    used, n_docs = 0, 0
    while used < n_rows * body:
        used += len(pieces[n_docs])
        n_docs += 1
    rows = torch.cat(pieces[:n_docs])[: n_rows * body].view(n_rows, body)
    if bos_id is not None:
        rows = torch.cat([torch.full((n_rows, 1), bos_id, dtype=torch.int64), rows], dim=1)
    return rows, n_docs


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
) -> TokenSplit:
    """Load ``source`` (see :func:`load_documents`), split it by document and tokenize both sides.

    Returns a :class:`TokenSplit` with train [n_train_ctx, ctx_len] and eval [n_eval_ctx, ctx_len]
    int64 tensors from disjoint documents, capped at ``max_train_tokens`` / ``max_eval_tokens``;
    every row starts with ``bos_id`` when it is given.
    Raises DataSourceError (bad source, too little text on either side) or ValueError (bad
    ``eval_fraction`` / ``ctx_len`` / caps, tokenizer without eos/bos).
    """
    docs = load_documents(source, text_field=text_field, split=split)
    train_docs, eval_docs = split_documents(docs, eval_fraction)
    train, n_train = _tokenize(train_docs, tokenizer, ctx_len, max_train_tokens, bos_id)
    try:
        evals, n_eval = _tokenize(eval_docs, tokenizer, ctx_len, max_eval_tokens, bos_id)
    except DataSourceError as e:
        raise DataSourceError(f"eval split (eval_fraction={eval_fraction}): {e}") from None
    return TokenSplit(
        train=train,
        eval=evals,
        train_documents=[d.name for d in train_docs[:n_train]],
        eval_documents=[d.name for d in eval_docs[:n_eval]],
        separator_id=separator_token_id(tokenizer),
    )
