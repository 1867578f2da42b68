"""Tests for transcoders.data.sources and transcoders.data.tokens (offline, CPU, fast)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transcoders.data.sources import DEFAULT_SOURCE, DataSourceError, Document, describe_source, load_documents
from transcoders.data.tokens import (
    TokenSplit,
    build_token_split,
    separator_token_id,
    split_documents,
    tokenize_documents,
)

CORPUS = Path(__file__).resolve().parents[1] / "transcoders" / "data" / "corpus"


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE tokenizer with an <eos> token, trained here (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sentences = ["Fellow citizens of the Senate and House of Representatives.",
                 "The quick brown fox jumps over the lazy dog.", "the state of the union is strong"]
    tok.train_from_iterator(sentences * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


# ---------------------------------------------------------------- sources


def test_bundled_corpus():
    docs = load_documents()
    assert len(docs) == 233
    assert load_documents(DEFAULT_SOURCE) == docs
    names = [d.name for d in docs]
    assert names == sorted(names) and len(set(names)) == 233
    assert names[0] == "1790_george_washington_n.txt" and names[-1] == "2021_joseph_r_biden_d.txt"
    assert all(n.endswith(".txt") and "/" not in n for n in names)
    assert all(d.text.strip() for d in docs)
    assert "Senate and House of Representatives" in docs[0].text
    assert describe_source(None) == "State of the Union corpus (bundled, 233 documents)"
    assert (CORPUS / "PROVENANCE.md").is_file()


def test_txt_file(tmp_path):
    path = _write(tmp_path / "notes.md", "Some plain text.\n")
    assert load_documents(path) == [Document("notes.md", "Some plain text.\n")]
    assert load_documents(str(path)) == load_documents(path)
    assert str(path) in describe_source(path)


def test_folder_recursion(tmp_path):
    _write(tmp_path / "b.txt", "bee")
    _write(tmp_path / "a" / "z.txt", "zed")
    _write(tmp_path / "a" / "deep" / "c.txt", "sea")
    _write(tmp_path / "empty.txt", "  \n ")
    _write(tmp_path / "skip.md", "not a txt")
    docs = load_documents(tmp_path)
    assert [d.name for d in docs] == ["a/deep/c.txt", "a/z.txt", "b.txt"]
    assert [d.text for d in docs] == ["sea", "zed", "bee"]


def test_jsonl_custom_field(tmp_path):
    rows = [{"body": "first", "id": 1}, {"body": "   "}, {"body": "third"}]
    lines = [json.dumps(rows[0]), "", json.dumps(rows[1]), json.dumps(rows[2])]
    path = _write(tmp_path / "notes.jsonl", "\n".join(lines) + "\n")
    docs = load_documents(path, text_field="body")
    assert docs == [Document("notes.jsonl:1", "first"), Document("notes.jsonl:4", "third")]
    array = _write(tmp_path / "arr.json", json.dumps([{"body": "x"}, {"body": ""}, {"body": "z"}]))
    assert load_documents(array, text_field="body") == [Document("arr.json:1", "x"), Document("arr.json:3", "z")]
    assert describe_source(path).startswith("JSON lines file")


def test_hf_dataset_branch_local_folder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "my_ds"
    _write(folder / "data.jsonl", "".join(json.dumps({"content": t}) + "\n" for t in ["alpha", "", "gamma"]))

    from transcoders.data.sources import _load_hf_dataset

    docs = _load_hf_dataset(str(folder), "content", "train")
    assert [(d.name, d.text) for d in docs if d.text] == [(f"{folder}:0", "alpha"), (f"{folder}:2", "gamma")]
    with pytest.raises(DataSourceError, match="no column 'text'.*content"):
        _load_hf_dataset(str(folder), "text", "train")
    with pytest.raises(DataSourceError, match="could not load 'nobody/no_such_dataset'.*offline"):
        load_documents("nobody/no_such_dataset")


def test_hf_dataset_name_dispatch(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        if name == "broken/ds":
            raise ConnectionError("network unreachable")
        return datasets.Dataset.from_dict({"text": ["one", "", "three"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = load_documents("owner/some_ds", split="validation")
    assert calls == [("owner/some_ds", "validation")]
    assert docs == [Document("owner/some_ds:0", "one"), Document("owner/some_ds:2", "three")]
    assert describe_source("owner/some_ds") == "Hugging Face dataset owner/some_ds"
    with pytest.raises(DataSourceError, match=r"'broken/ds'.*network unreachable.*offline"):
        load_documents("broken/ds")


@pytest.mark.parametrize("source", ["missing_notes.txt", "data.jsonl", "./missing", "no/such/dir", "x.json"])
def test_missing_path(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataSourceError, match=f"{source}.*does not exist"):
        load_documents(source)
    with pytest.raises(DataSourceError, match="does not exist"):
        load_documents(tmp_path / "gone")


def test_no_text(tmp_path):
    _write(tmp_path / "only.jsonl", json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(DataSourceError, match=r"no non-empty text.*\.txt"):
        load_documents(tmp_path)
    path = _write(tmp_path / "blank.txt", " \n\t")
    with pytest.raises(DataSourceError, match="blank.txt.*no non-empty text"):
        load_documents(path)


def test_not_utf8(tmp_path):
    path = _write(tmp_path / "latin.txt", "caf\xe9".encode("latin-1"))
    with pytest.raises(DataSourceError, match="latin.txt.*not valid UTF-8.*convert it to UTF-8"):
        load_documents(path)
    with pytest.raises(DataSourceError, match="latin.txt.*UTF-8"):
        load_documents(tmp_path)


def test_jsonl_errors(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DataSourceError, match="bad.jsonl, line 3 is not valid JSON"):
        load_documents(bad)
    lacking = _write(tmp_path / "lacking.jsonl", '{"text": "ok"}\n{"body": "x", "id": 2}\n')
    with pytest.raises(DataSourceError, match=r"line 2 has no field 'text' \(keys present: \['body', 'id'\]\)"):
        load_documents(lacking)


# ---------------------------------------------------------------- splitting


def _docs(names):
    return [Document(n, f"text of {n}") for n in names]


@settings(max_examples=60, deadline=None)
@given(
    names=st.lists(st.text(min_size=1, max_size=12), min_size=0, max_size=40, unique=True),
    fraction=st.floats(min_value=0.01, max_value=0.99),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_properties(names, fraction, seed):
    docs = _docs(names)
    train, evals = split_documents(docs, fraction)
    if len(docs) == 1:
        assert {d.name for d in train + evals} <= {names[0] + "#train", names[0] + "#eval"}
        return
    train_names, eval_names = {d.name for d in train}, {d.name for d in evals}
    assert not train_names & eval_names
    assert train_names | eval_names == set(names)
    if len(docs) >= 2:
        assert train and evals
    assert [d.name for d in train] == [n for n in names if n in train_names]  # input order kept
    shuffled = docs[:]
    random.Random(seed).shuffle(shuffled)
    train2, eval2 = split_documents(shuffled, fraction)
    assert {d.name for d in train2} == train_names and {d.name for d in eval2} == eval_names


def test_split_rule_and_validation():
    names = [f"doc{i}.txt" for i in range(200)]
    train, evals = split_documents(_docs(names), 0.1)
    expected = {n for n in names if int(hashlib.sha256(n.encode()).hexdigest()[:16], 16) / 2**64 < 0.1}
    assert {d.name for d in evals} == expected and 5 < len(expected) < 40
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="eval_fraction"):
            split_documents(_docs(names), bad)
    assert split_documents([], 0.5) == ([], [])


def test_single_document_split():
    text = " ".join(f"word{i}" for i in range(200))
    train, evals = split_documents([Document("only.txt", text)], 0.1)
    assert [d.name for d in train] == ["only.txt#train"] and [d.name for d in evals] == ["only.txt#eval"]
    assert train[0].text + " " + evals[0].text == text
    assert 0.05 < len(evals[0].text) / len(text) < 0.15
    assert evals[0].text.startswith("word")


# ---------------------------------------------------------------- tokenization


def test_separator_token_id(tokenizer):
    assert separator_token_id(tokenizer) == tokenizer.eos_token_id

    class BosOnly:
        eos_token_id, bos_token_id = None, 7

    class Neither:
        eos_token_id = bos_token_id = None

    assert separator_token_id(BosOnly()) == 7
    with pytest.raises(ValueError, match="neither"):
        separator_token_id(Neither())


def test_tokenize_documents(tokenizer):
    docs = [Document(f"d{i}", f"The quick brown fox number {i} jumps over {'the lazy dog ' * i}") for i in range(150)]
    sep = separator_token_id(tokenizer)
    stream = []
    for d in docs:
        stream += tokenizer(d.text, add_special_tokens=False)["input_ids"] + [sep]
    ctx = 16
    rows = tokenize_documents(docs, tokenizer, ctx)
    assert rows.dtype == torch.int64 and rows.shape == (len(stream) // ctx, ctx)
    assert rows.flatten().tolist() == stream[: rows.numel()]
    first_len = len(tokenizer(docs[0].text, add_special_tokens=False)["input_ids"])
    assert rows.flatten()[first_len].item() == sep and sep not in rows.flatten()[:first_len].tolist()
    assert (rows == sep).sum().item() > 100  # one after each document

    capped = tokenize_documents(docs, tokenizer, ctx, max_tokens=100)
    assert capped.shape == (6, ctx) and torch.equal(capped, rows[:6])
    with pytest.raises(DataSourceError, match=r"only \d+ tokens.*ctx_len=100000.*smaller ctx_len"):
        tokenize_documents(docs[:2], tokenizer, 100_000)
    with pytest.raises(ValueError, match="max_tokens"):
        tokenize_documents(docs, tokenizer, ctx, max_tokens=ctx - 1)


def test_tokenize_stops_early(tokenizer, monkeypatch):
    docs = [Document(f"d{i}", "the state of the union " * 20) for i in range(1000)]
    seen = []
    real_call = type(tokenizer).__call__

    def counting_call(self, texts, **kw):
        seen.append(len(texts))
        return real_call(self, texts, **kw)

    monkeypatch.setattr(type(tokenizer), "__call__", counting_call)
    rows = tokenize_documents(docs, tokenizer, 32, max_tokens=320)
    assert rows.shape == (10, 32)
    assert sum(seen) < len(docs)


def test_build_token_split_bundled(tokenizer):
    split = build_token_split(None, tokenizer, 64, eval_fraction=0.05, max_train_tokens=6400, max_eval_tokens=640)
    assert isinstance(split, TokenSplit)
    assert split.train.shape == (100, 64) and split.eval.shape == (10, 64)
    assert split.train.dtype == split.eval.dtype == torch.int64
    assert split.separator_id == tokenizer.eos_token_id
    assert split.train_documents and split.eval_documents
    assert not set(split.train_documents) & set(split.eval_documents)
    all_train, all_eval = split_documents(load_documents(), 0.05)
    assert set(split.train_documents) <= {d.name for d in all_train}
    assert set(split.eval_documents) <= {d.name for d in all_eval}


def test_build_token_split_single_file(tmp_path, tokenizer):
    path = _write(tmp_path / "speech.txt", " ".join(["the state of the union is strong"] * 60))
    split = build_token_split(path, tokenizer, 8, eval_fraction=0.2)
    assert split.train_documents == ["speech.txt#train"] and split.eval_documents == ["speech.txt#eval"]
    assert split.train.shape[1] == split.eval.shape[1] == 8
    assert split.train.shape[0] > 2 * split.eval.shape[0] > 0
