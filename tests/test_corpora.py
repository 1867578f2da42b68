"""Tests for the named text sources (``sotu``, ``books``, ``email``, ``pydocs``, ``djangodocs``,
``stdlib``): each loads offline, has the documented size, matches its provenance file, and mixes."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

import pytest
import torch
from conftest import build_tiny_tokenizer

from transcoders.data.mixture import parse_data
from transcoders.data.sources import NAMED_SOURCES, DataSourceError, describe_source, load_documents
from transcoders.data.tokens import build_token_split

CORPUS = Path(__file__).resolve().parents[1] / "transcoders" / "data" / "corpus"

# name -> (archive, provenance file, documents) for the bundled sources; the counts are documented
# in transcoders/data/sources.py and in each provenance file
BUNDLED = {
    "sotu": ("sotu-1790-2021.tar.xz", "PROVENANCE.md", 233),
    "books": ("books.tar.xz", "BOOKS_PROVENANCE.md", 382),
    "email": ("email.tar.xz", "EMAIL_PROVENANCE.md", 3862),
    "pydocs": ("pydocs.tar.xz", "PYDOCS_PROVENANCE.md", 496),
    "djangodocs": ("djangodocs.tar.xz", "DJANGODOCS_PROVENANCE.md", 271),
}
STDLIB_MIN_DOCUMENTS = 400  # 728 files for CPython 3.11.7; fewer in later versions (distutils, lib2to3 removed)
LICENCE_TEXT = {"pydocs": "This LICENSE AGREEMENT is between the Python Software Foundation",
                "djangodocs": "Redistributions of source code must retain the above copyright notice"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_the_table_is_complete():
    assert set(NAMED_SOURCES) == {*BUNDLED, "stdlib"}
    assert {a for a, _, _ in BUNDLED.values()} == {p.name for p in CORPUS.glob("*.tar.xz")}  # no stray archive


@pytest.mark.parametrize("name", sorted(NAMED_SOURCES))
def test_named_source_loads(name):
    docs = load_documents(name)
    names = [d.name for d in docs]
    if name in BUNDLED:
        assert len(docs) == BUNDLED[name][2]
    else:
        assert len(docs) >= STDLIB_MIN_DOCUMENTS
    assert names == sorted(names) and len(set(names)) == len(names)
    for d in docs:
        assert d.text.strip(), d.name
        d.text.encode("utf-8")  # no lone surrogates: the text is valid UTF-8
    assert load_documents(name) == docs  # cached, and the same every time
    assert describe_source(name) == f"{NAMED_SOURCES[name].title} ({NAMED_SOURCES[name].where}, {len(docs)} documents)"


def test_document_names_and_contents():
    books = {d.name: d.text for d in load_documents("books")}
    assert {n.split("#")[0] for n in books} == {
        "austen-emma.txt", "austen-persuasion.txt", "austen-sense.txt", "bible-kjv.txt", "blake-poems.txt",
        "bryant-stories.txt", "carroll-alice.txt", "chesterton-ball.txt",
        "chesterton-brown.txt", "chesterton-thursday.txt", "edgeworth-parents.txt", "melville-moby_dick.txt",
        "milton-paradise.txt", "shakespeare-caesar.txt", "shakespeare-hamlet.txt", "shakespeare-macbeth.txt",
        "whitman-leaves.txt"}
    assert all(re.fullmatch(r"[a-z_-]+\.txt#\d{3}", n) for n in books)
    assert books["austen-emma.txt#001"].startswith("[Emma by Jane Austen 1816]")
    assert "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy" in books["austen-emma.txt#001"]
    assert "\r" not in "".join(books.values())
    assert all(len(t) > 10_000 for t in books.values())

    email = {d.name: d.text for d in load_documents("email")}
    assert all(re.fullmatch(r"easy-ham-[12]/\d{5}", n) for n in email)
    assert not any(line.startswith(">") for t in email.values() for line in t.split("\n"))  # quotes dropped
    assert sum(t.startswith("Received: ") for t in email.values()) < 5  # headers dropped (a few bodies discuss some)

    assert "library/os.rst" in {d.name for d in load_documents("pydocs")}
    django = {d.name for d in load_documents("djangodocs")}
    assert "ref/models/fields.txt" in django and not any(n.startswith("releases/") for n in django)


def test_stdlib_is_code_without_tests():
    docs = {d.name: d.text for d in load_documents("stdlib")}
    assert {"os.py", "json/__init__.py", "asyncio/base_events.py"} <= set(docs)
    assert "def makedirs(" in docs["os.py"]
    for name in docs:
        path = PurePosixPath(name)
        assert path.suffix == ".py"
        assert not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(path.parts[:-1]), name
    assert "Python standard library source (read from this Python 3." in describe_source("stdlib")


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_provenance_records_the_archive(name):
    archive, provenance, n_docs = BUNDLED[name]
    text = (CORPUS / provenance).read_text(encoding="utf-8")
    recorded = re.search(r"SHA-256 of the archive.*?`([0-9a-f]{64})`", text, re.DOTALL)
    assert recorded, f"{provenance} records no archive SHA-256"
    assert hashlib.sha256((CORPUS / archive).read_bytes()).hexdigest() == recorded.group(1)
    assert f"`{archive}`" in text
    assert f"{n_docs} " in text  # the document count
    assert LICENCE_TEXT.get(name, "") in text  # licences that ask for their text to travel with copies


def test_describe_a_mixture_of_named_sources():
    spec = "books:0.3,email:0.15,pydocs:0.15,djangodocs:0.1,stdlib:0.15,sotu:0.1"
    assert [p.label for p in parse_data(spec)] == ["books", "email", "pydocs", "djangodocs", "stdlib", "sotu"]
    text = describe_source(spec)
    for name in NAMED_SOURCES:
        assert NAMED_SOURCES[name].title in text
    assert text.startswith("mixture: 31.6% Project Gutenberg books (bundled, 382 documents), ")


def test_a_mixture_of_two_named_sources_tokenizes(tokenizer):
    split = build_token_split("email:3,djangodocs:1", tokenizer, 32, max_train_tokens=32 * 40, max_eval_tokens=32 * 8)
    assert [(label, s.stop - s.start) for label, s in split.train_sources] == [("email", 30), ("djangodocs", 10)]
    assert [(label, s.stop - s.start) for label, s in split.eval_sources] == [("email", 6), ("djangodocs", 2)]
    assert split.train.shape == (40, 32) and split.train.dtype == torch.int64
    assert split.train_documents[0].startswith("email|") and split.train_documents[-1].startswith("djangodocs|")
    assert not set(split.train_documents) & set(split.eval_documents)


def test_a_named_source_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "mine.txt").write_text("my own book\n", encoding="utf-8")
    assert len(load_documents("books")) == BUNDLED["books"][2]
    assert [d.name for d in load_documents("./books")] == ["mine.txt"]
    assert [p.label for p in parse_data("books:1,./books:1")] == ["books", "./books"]
    with pytest.raises(DataSourceError, match="'books' appears twice"):
        parse_data("books:1,sotu:1,books:2")


@pytest.mark.parametrize("name", ["bookz", "Books"])
def test_an_unknown_bare_name_is_tried_as_a_dataset_and_the_error_lists_the_named_sources(tmp_path, monkeypatch,
                                                                                          tokenizer, name):
    import datasets
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # bare names (e.g. "imdb") are Hugging Face datasets
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    with pytest.raises(DataSourceError, match=r"as a Hugging Face dataset.*sotu, books, email, pydocs, djangodocs, stdlib"):
        load_documents(name)
    with pytest.raises(DataSourceError, match=rf"mixture source '{name}'.*Hugging Face dataset"):
        build_token_split(f"sotu:1,{name}:1", tokenizer, 32)
