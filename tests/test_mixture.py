"""Tests for weighted text mixtures (``--data a.jsonl:0.5,sotu:0.3,docs/:0.2``): parsing, the
contexts-per-source rule, the train/eval splits they give, and descriptions (offline, CPU, fast)."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch
from conftest import build_tiny_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from transcoders.data.mixture import MixturePart, is_mixture, mixture_counts, parse_data
from transcoders.data.sources import DataSourceError, Document, describe_source, load_documents
from transcoders.data.tokens import build_token_split, split_documents, tokenize_documents, tokenize_source

CTX = 8
WORDS = "the quick brown fox jumps over the lazy dog state of the union is strong".split()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _text(seed: int, n_words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * (seed % 5 + 1)) % len(WORDS)] for i in range(n_words))


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """Three local sources of different sizes in ``tmp_path`` (also the working directory):
    ``notes.jsonl`` (80 records), ``docs/`` (30 .txt files), ``speech.txt`` (one document)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps({"text": _text(i, 20 + i % 13)}) + "\n" for i in range(80)))
    (tmp_path / "docs").mkdir()
    for i in range(30):
        (tmp_path / "docs" / f"d{i:02d}.txt").write_text(_text(100 + i, 15 + i % 7))
    (tmp_path / "speech.txt").write_text(_text(999, 400))
    return tmp_path


def _expected_counts(available: list[int], weights: list[str], cap: int | None) -> list[int]:
    """The documented rule, computed here on its own: N = min(cap, min_i floor(n_i / p_i)), then
    floor(N p_i) each and the rest one each by largest remainder (ties: earlier source)."""
    w = [Fraction(x) for x in weights]
    p = [x / sum(w) for x in w]
    total = min(n * q.denominator // q.numerator for n, q in zip(available, p))
    total = total if cap is None else min(total, cap)
    base = [total * q.numerator // q.denominator for q in p]
    rem = [total * q - b for q, b in zip(p, base)]
    for i in sorted(range(len(p)), key=lambda i: (-rem[i], i))[: total - sum(base)]:
        base[i] += 1
    return base


def _per_source(source, tokenizer, fraction, bos_id=None):
    """(train rows, eval rows, train docs, eval docs) of one source on its own, from the primitives."""
    train, evals = split_documents(load_documents(source), fraction)
    return (tokenize_documents(train, tokenizer, CTX, bos_id=bos_id), tokenize_documents(evals, tokenizer, CTX, bos_id=bos_id),
            train, evals)


# ---------------------------------------------------------------- parsing


def test_lone_sources_unchanged(sources):
    path = sources / "notes.jsonl"
    for lone in [None, "sotu", "notes.jsonl", str(path), path, "owner/dataset", "missing.jsonl", "docs/"]:
        assert parse_data(lone) == [MixturePart(lone, Fraction(1), "sotu" if lone is None else str(lone))]
        assert not is_mixture(lone)
    assert parse_data("notes.jsonl:3") == [MixturePart("notes.jsonl", Fraction(1), "notes.jsonl")]
    assert parse_data("sotu:0.5") == [MixturePart("sotu", Fraction(1), "sotu")]


def test_mixture_parsing(sources):
    parts = parse_data("notes.jsonl:0.5, sotu:0.3 ,docs/:0.2")
    assert [(p.source, p.share, p.label) for p in parts] == [
        ("notes.jsonl", Fraction(1, 2), "notes.jsonl"), ("sotu", Fraction(3, 10), "sotu"), ("docs/", Fraction(1, 5), "docs/")]
    assert sum(p.share for p in parts) == 1
    assert [p.share for p in parse_data("notes.jsonl:1,owner/ds:3")] == [Fraction(1, 4), Fraction(3, 4)]
    assert [p.share for p in parse_data("a.jsonl:1e-3,b.jsonl:2e-3,c.jsonl:7e-3")] == [
        Fraction(1, 10), Fraction(2, 10), Fraction(7, 10)]
    assert is_mixture("notes.jsonl:1,sotu:1")
    # paths may contain ':' (an existing path wins, and only a trailing :NUMBER is a weight)
    odd = sources / "odd:2.txt"
    odd.write_text("some text")
    assert parse_data(str(odd)) == [MixturePart(str(odd), Fraction(1), str(odd))]
    assert parse_data("odd:2.txt") == [MixturePart("odd:2.txt", Fraction(1), "odd:2.txt")]
    assert [(p.source, p.share) for p in parse_data("odd:2.txt:1,owner/ds:abc:1")] == [
        ("odd:2.txt", Fraction(1, 2)), ("owner/ds:abc", Fraction(1, 2))]
    (sources / "a,b.txt").write_text("comma in the name")
    assert parse_data("a,b.txt") == [MixturePart("a,b.txt", Fraction(1), "a,b.txt")]


@pytest.mark.parametrize(("spec", "message"), [
    ("notes.jsonl:0,sotu:1", r"weight of 'notes.jsonl' is '0', not a positive number"),
    ("notes.jsonl:-2,sotu:1", r"weight of 'notes.jsonl' is '-2', not a positive number"),
    ("notes.jsonl:nan,sotu:1", r"'nan', not a positive number"),
    ("notes.jsonl:inf,sotu:1", r"'inf', not a positive number"),
    ("notes.jsonl:0", r"'0', not a positive number"),
    (":0.5,sotu:0.5", r"weight '0.5' has no source before it"),
    ("notes.jsonl:0.5,,sotu:0.5", r"empty entry"),
    ("notes.jsonl:0.5,sotu:0.5,", r"empty entry"),
    ("notes.jsonl:,sotu:1", r"'notes.jsonl:' ends in ':' with no weight"),
    ("notes.jsonl,sotu:1", r"'notes.jsonl' in data mixture .* has no weight; give every source"),
    ("missing,file.txt", r"'missing' in data mixture .* has no weight.*if 'missing' is a path, it does not exist"),
    ("notes.jsonl:1,5", r"entry '5' with no source name.*decimal point"),
    ("sotu:0.5,docs/:0.2,sotu:0.3", r"'sotu' appears twice.*sum of its weights"),
    ("docs:1,./docs/:1", r"'./docs/' appears twice .*as 'docs' and './docs/'"),
])
def test_parse_errors(sources, spec, message):
    with pytest.raises(DataSourceError, match=message) as info:
        parse_data(spec)
    assert "\n" not in str(info.value)
    with pytest.raises(DataSourceError, match=message):  # every reader of --data refuses it the same way
        describe_source(spec)


def test_settings_refuse_bad_mixtures(sources):
    from pydantic import ValidationError

    from transcoders.features.config import FeaturesConfig
    from transcoders.training.config import TrainConfig

    assert TrainConfig(data="notes.jsonl:0.5,sotu:0.5").data == "notes.jsonl:0.5,sotu:0.5"
    assert FeaturesConfig(data="notes.jsonl:1,docs:1").data == "notes.jsonl:1,docs:1"
    for config in (TrainConfig, FeaturesConfig):
        with pytest.raises(ValidationError, match="not a positive number"):
            config(data="notes.jsonl:0,sotu:1")


def test_describe_mixture(sources):
    assert describe_source("notes.jsonl:0.5,sotu:0.3,docs/:0.2") == (
        "mixture: 50% JSON lines file notes.jsonl, 30% State of the Union corpus (bundled, 233 documents), "
        "20% folder docs (*.txt files, recursively)")
    assert describe_source("notes.jsonl:1,owner/ds:2") == (
        "mixture: 33.3% JSON lines file notes.jsonl, 66.7% Hugging Face dataset owner/ds")
    assert describe_source("notes.jsonl:2") == describe_source("notes.jsonl") == "JSON lines file notes.jsonl"


def test_load_documents_refuses_mixtures(sources):
    with pytest.raises(DataSourceError, match="is a mixture of several sources.*build_token_split or tokenize_source"):
        load_documents("notes.jsonl:0.5,docs:0.5")


# ---------------------------------------------------------------- the rule


def test_mixture_counts_examples():
    half, third = Fraction(1, 2), Fraction(1, 3)
    shares = [Fraction(5, 10), Fraction(3, 10), Fraction(2, 10)]
    assert mixture_counts([10, 100, 7], shares) == [10, 6, 4]  # N = min(20, 333, 35) = 20
    assert mixture_counts([1000, 1000, 1000], shares, cap=7) == [4, 2, 1]  # 3.5, 2.1, 1.4 -> +1 to the first
    assert mixture_counts([7, 100], [third, 2 * third]) == [7, 14]
    assert mixture_counts([7, 100], [third, 2 * third], cap=10) == [3, 7]  # 3.33, 6.67
    assert mixture_counts([9, 9], [half, half], cap=5) == [3, 2]  # a tie goes to the earlier source
    assert mixture_counts([5], [Fraction(1)], cap=3) == [3]
    assert mixture_counts([1, 1000], [Fraction(1, 1000), Fraction(999, 1000)], cap=10) == [0, 10]
    with pytest.raises(ValueError, match="one share per source"):
        mixture_counts([1, 2], [Fraction(1)])
    with pytest.raises(ValueError, match="positive"):
        mixture_counts([1, 2], [Fraction(1), Fraction(0)])


@settings(max_examples=200, deadline=None)
@given(available=st.lists(st.integers(1, 10_000), min_size=1, max_size=6), data=st.data())
def test_mixture_counts_properties(available, data):
    weights = data.draw(st.lists(st.integers(1, 1000), min_size=len(available), max_size=len(available)))
    cap = data.draw(st.none() | st.integers(1, 50_000))
    shares = [Fraction(w, sum(weights)) for w in weights]
    counts = mixture_counts(available, shares, cap)
    total = sum(counts)
    assert counts == _expected_counts(available, [str(w) for w in weights], cap)
    assert all(0 <= c <= n for c, n in zip(counts, available))
    assert all(abs(c - total * p) < 1 for c, p in zip(counts, shares))
    # the total is as large as it can be without repeating a source or breaking the shares
    assert total == min(min(math.floor(n / p) for n, p in zip(available, shares)), cap or total + 10**9)


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize("bos", [False, True])
def test_mixture_split_counts_and_rows(sources, tokenizer, bos):
    bos_id = tokenizer.eos_token_id if bos else None
    spec, weights, labels = "notes.jsonl:0.5,docs/:0.3,speech.txt:0.2", ["0.5", "0.3", "0.2"], ["notes.jsonl", "docs/",
                                                                                                "speech.txt"]
    split = build_token_split(spec, tokenizer, CTX, eval_fraction=0.2, bos_id=bos_id)
    alone = [_per_source(label, tokenizer, 0.2, bos_id) for label in labels]
    train_counts = _expected_counts([a[0].shape[0] for a in alone], weights, None)
    eval_counts = _expected_counts([a[1].shape[0] for a in alone], weights, None)
    assert 0 not in train_counts and 0 not in eval_counts
    assert [label for label, _ in split.train_sources] == [label for label, _ in split.eval_sources] == labels
    assert [s.stop - s.start for _, s in split.train_sources] == train_counts
    assert [s.stop - s.start for _, s in split.eval_sources] == eval_counts
    assert split.train.shape == (sum(train_counts), CTX) and split.eval.shape == (sum(eval_counts), CTX)
    start = 0
    for (_, rows), (train, *_), n in zip(split.train_sources, alone, train_counts):
        assert rows == slice(start, start + n)
        start += n
        assert torch.equal(split.train[rows], train[:n])  # the first n contexts of the source alone
    for (label, rows), (_, evals, _, eval_docs), n in zip(split.eval_sources, alone, eval_counts):
        # exactly the held-out documents' tokens of that source, the same as with the source alone
        assert torch.equal(split.eval[rows], evals[:n])
        assert torch.equal(split.eval[rows], build_token_split(label, tokenizer, CTX, eval_fraction=0.2,
                                                                bos_id=bos_id).eval[:n])
        held_out = {f"{label}|{d.name}" for d in eval_docs}
        assert {name for name in split.eval_documents if name.startswith(f"{label}|")} <= held_out
        assert not held_out & set(split.train_documents)
    if bos:
        assert (split.train[:, 0] == bos_id).all() and (split.eval[:, 0] == bos_id).all()
    # the documents listed are those that contributed, source by source
    notes_train = [n for n in split.train_documents if n.startswith("notes.jsonl|")]
    assert notes_train == [f"notes.jsonl|{d.name}" for d in alone[0][2][: len(notes_train)]]
    assert split.train_documents[-1] == "speech.txt|speech.txt#train"


def test_mixture_split_caps(sources, tokenizer):
    """Caps (in tokens) bound the total; each source still gives the first contexts it has, and
    tokenizing only what is needed gives the same rows as tokenizing everything."""
    spec, labels, weights = "docs:1,notes.jsonl:2", ["docs", "notes.jsonl"], ["1", "2"]
    alone = [_per_source(label, tokenizer, 0.3) for label in labels]
    for cap_rows in (1, 2, 7, 40, 10_000):
        split = build_token_split(spec, tokenizer, CTX, eval_fraction=0.3, max_train_tokens=cap_rows * CTX + 3,
                                  max_eval_tokens=cap_rows * CTX)
        want_train = _expected_counts([a[0].shape[0] for a in alone], weights, cap_rows)
        want_eval = _expected_counts([a[1].shape[0] for a in alone], weights, cap_rows)
        assert [s.stop - s.start for _, s in split.train_sources] == want_train
        assert [s.stop - s.start for _, s in split.eval_sources] == want_eval
        for (_, rows), (train, *_), n in zip(split.train_sources, alone, want_train):
            assert torch.equal(split.train[rows], train[:n])
        for (_, rows), (_, evals, *_), n in zip(split.eval_sources, alone, want_eval):
            assert torch.equal(split.eval[rows], evals[:n])
    with pytest.raises(ValueError, match=r"max_train_tokens \(7\) must be at least ctx_len \(8\)"):
        build_token_split(spec, tokenizer, CTX, max_train_tokens=7)


def test_mixture_with_the_bundled_corpus(sources, tokenizer):
    split = build_token_split("sotu:3,notes.jsonl:1", tokenizer, 32, max_train_tokens=32 * 40, max_eval_tokens=32 * 8)
    assert [(label, s.stop - s.start) for label, s in split.train_sources] == [("sotu", 30), ("notes.jsonl", 10)]
    assert [(label, s.stop - s.start) for label, s in split.eval_sources] == [("sotu", 6), ("notes.jsonl", 2)]
    sotu = build_token_split(None, tokenizer, 32, max_train_tokens=32 * 30, max_eval_tokens=32 * 6)
    assert torch.equal(split.train[:30], sotu.train) and torch.equal(split.eval[:6], sotu.eval)
    assert split.eval_documents[0] == f"sotu|{sotu.eval_documents[0]}"


def test_log_says_what_each_source_gave(sources, tokenizer):
    lines: list[str] = []
    split = build_token_split("notes.jsonl:0.5,speech.txt:0.5", tokenizer, CTX, eval_fraction=0.2, log=lines.append)
    n_speech = tokenize_documents(split_documents(load_documents("speech.txt"), 0.2)[0], tokenizer, CTX).shape[0]
    assert split.train.shape[0] == 2 * n_speech
    assert len(lines) == 2 and lines[0].startswith(f"data mixture, train split: {2 * n_speech} contexts of 8 tokens: ")
    assert f"{n_speech} from speech.txt (50%, all {n_speech} it has)" in lines[0]
    assert "speech.txt ran out first and limits the total (sources are not repeated)" in lines[0]
    assert lines[1].startswith("data mixture, eval split (eval_fraction=0.2): ")
    capped: list[str] = []
    build_token_split("notes.jsonl:0.5,speech.txt:0.5", tokenizer, CTX, eval_fraction=0.2, max_train_tokens=4 * CTX,
                      max_eval_tokens=CTX, log=capped.append)
    assert "2 from notes.jsonl (50%, of the first 2)" in capped[0] and "the cap on tokens sets the total" in capped[0]
    assert "warning: speech.txt gave no contexts (share below one context)" in capped[1]
    build_token_split("notes.jsonl", tokenizer, CTX, log=capped.append)
    assert len(capped) == 2  # a lone source logs nothing


def test_mixture_source_errors_name_the_source(sources, tokenizer):
    with pytest.raises(DataSourceError, match=r"mixture source 'gone.jsonl': .*gone.jsonl.*does not exist"):
        build_token_split("notes.jsonl:1,gone.jsonl:1", tokenizer, CTX)
    (sources / "tiny.txt").write_text("the fox")
    with pytest.raises(DataSourceError, match=r"train split of mixture source 'tiny.txt': .*fewer than ctx_len=8"):
        build_token_split("notes.jsonl:1,tiny.txt:1", tokenizer, CTX)
    with pytest.raises(DataSourceError, match=r"eval split \(eval_fraction=0.05\) of mixture source 'speech.txt'"):
        build_token_split("notes.jsonl:1,speech.txt:1", tokenizer, 64)


# ---------------------------------------------------------------- a lone source is unchanged


def test_lone_source_split_unchanged(sources, tokenizer):
    """A lone source, with or without a weight, gives what the primitives give (which is what
    build_token_split gave before mixtures existed)."""
    for source, kw in [("notes.jsonl", {}), (sources / "docs", {"eval_fraction": 0.3}),
                       ("speech.txt", {"bos_id": 0, "max_train_tokens": 10 * CTX}),
                       (None, {"max_train_tokens": 50 * CTX, "max_eval_tokens": 5 * CTX})]:
        fraction = kw.get("eval_fraction", 0.05)
        train_docs, eval_docs = split_documents(load_documents(source), fraction)
        train = tokenize_documents(train_docs, tokenizer, CTX, kw.get("max_train_tokens"), kw.get("bos_id"))
        evals = tokenize_documents(eval_docs, tokenizer, CTX, kw.get("max_eval_tokens"), kw.get("bos_id"))
        label = "sotu" if source is None else str(source)
        weighted = "sotu:0.7" if source is None else f"{source}:0.7"
        for spec in (source, weighted):
            split = build_token_split(spec, tokenizer, CTX, **kw)
            assert torch.equal(split.train, train) and torch.equal(split.eval, evals)
            assert split.train_sources == [(label, slice(0, train.shape[0]))]
            assert split.eval_sources == [(label, slice(0, evals.shape[0]))]
            assert set(split.train_documents) <= {d.name for d in train_docs}
            assert split.eval_documents == [d.name for d in eval_docs][: len(split.eval_documents)]


# ---------------------------------------------------------------- tokenize_source


def test_tokenize_source(sources, tokenizer):
    rows, parts = tokenize_source("notes.jsonl", tokenizer, CTX, max_tokens=30 * CTX)
    assert torch.equal(rows, tokenize_documents(load_documents("notes.jsonl"), tokenizer, CTX, 30 * CTX))
    assert parts == [("notes.jsonl", slice(0, 30))]
    whole = [tokenize_documents(load_documents(s), tokenizer, CTX) for s in ("notes.jsonl", "docs")]
    rows, parts = tokenize_source("notes.jsonl:3,docs:1", tokenizer, CTX, max_tokens=30 * CTX)
    want = _expected_counts([w.shape[0] for w in whole], ["3", "1"], 30)
    assert [(label, s.stop - s.start) for label, s in parts] == [("notes.jsonl", want[0]), ("docs", want[1])]
    for (_, s), w, n in zip(parts, whole, want):
        assert torch.equal(rows[s], w[:n])
    rows, parts = tokenize_source("notes.jsonl:3,docs:1", tokenizer, CTX)
    assert [s.stop - s.start for _, s in parts] == _expected_counts([w.shape[0] for w in whole], ["3", "1"], None)


def _first_of_each(specs: list[tuple[str, str]], tokenizer, cap: int, bos_id=None) -> tuple[torch.Tensor, list[int]]:
    """What a capped mixture gave when every source was loaded whole: per ``mixture_counts``,
    the first contexts of each source on its own, grouped by source (from the primitives)."""
    whole = [tokenize_documents(load_documents(s), tokenizer, CTX, bos_id=bos_id) for s, _ in specs]
    counts = _expected_counts([w.shape[0] for w in whole], [w for _, w in specs], cap)
    return torch.cat([w[:n] for w, n in zip(whole, counts)]), counts


@pytest.mark.parametrize("bos_id", [None, 0])
def test_capped_tokenize_source_equals_loading_everything(sources, tokenizer, bos_id):
    """With a cap, each source is read only as far as needed, and gives what loading it whole
    gave: a lone source ``tokenize_documents(load_documents(...))``, a mixture the first
    contexts of each source per ``mixture_counts``, with the same slices and log line."""
    from transcoders.data.tokens import _mix

    for source in ["notes.jsonl", "docs", "speech.txt"]:
        n_all = tokenize_documents(load_documents(source), tokenizer, CTX, bos_id=bos_id).shape[0]
        for cap in [1, 7, 30, n_all, n_all + 1, 10 * n_all]:
            want = tokenize_documents(load_documents(source), tokenizer, CTX, cap * CTX + CTX - 1, bos_id)
            rows, parts = tokenize_source(source, tokenizer, CTX, max_tokens=cap * CTX + CTX - 1, bos_id=bos_id)
            assert torch.equal(rows, want) and rows.dtype == torch.int64, (source, cap)
            assert parts == [(source, slice(0, min(cap, n_all)))]
    mixtures = [[("notes.jsonl", "3"), ("docs", "1")], [("notes.jsonl", "0.5"), ("docs", "0.3"), ("speech.txt", "0.2")],
                [("speech.txt", "1"), ("notes.jsonl", "2")]]
    for specs in mixtures:
        spec = ",".join(f"{s}:{w}" for s, w in specs)
        for cap in [1, 2, 5, 30, 100_000]:
            want, counts = _first_of_each(specs, tokenizer, cap, bos_id)
            lines: list[str] = []
            rows, parts = tokenize_source(spec, tokenizer, CTX, max_tokens=cap * CTX, bos_id=bos_id, log=lines.append)
            assert torch.equal(rows, want), (spec, cap)
            assert [(label, s.stop - s.start) for label, s in parts] == [(s, n) for (s, _), n in zip(specs, counts)]
            assert [s.start for _, s in parts] == [sum(counts[:i]) for i in range(len(counts))]
            # the line the eager path (all documents loaded, still build_token_split's) logs
            eager: list[str] = []
            groups = [(s, load_documents(s)) for s, _ in specs]
            old_rows, _, old_parts = _mix("all documents", groups, [p.share for p in parse_data(spec)], tokenizer, CTX,
                                          cap, bos_id, eager.append)
            assert torch.equal(old_rows, rows) and old_parts == parts and lines == eager and len(lines) == 1


def test_capped_tokenize_source_reads_large_text_files_whole(sources, tokenizer):
    """A text file over TXT_PIECE_BYTES is one document, as load_documents reads it, not pieces
    (each piece would end in a separator): the same rows, capped or not."""
    from transcoders.data.sources import TXT_PIECE_BYTES

    (sources / "long.txt").write_text(_text(7, 30) + "\n" + _text(8, 220_000))
    assert (sources / "long.txt").stat().st_size > TXT_PIECE_BYTES
    want = tokenize_documents(load_documents("long.txt"), tokenizer, CTX)
    rows, parts = tokenize_source("long.txt", tokenizer, CTX, max_tokens=10**9)
    assert torch.equal(rows, want) and parts == [("long.txt", slice(0, want.shape[0]))]


def test_capped_tokenize_source_errors_as_before(sources, tokenizer):
    """A capped call raises what an uncapped one raises for the part it reads."""
    (sources / "tiny.txt").write_text("the fox")
    (sources / "blank.jsonl").write_text('{"text": "  "}\n\n{"text": ""}\n')
    cases = [("tiny.txt", r"^1 documents gave only \d+ tokens, fewer than ctx_len=8"),
             ("blank.jsonl", r"'blank.jsonl' yielded no non-empty text"),
             ("gone.jsonl", r"gone.jsonl.*does not exist"),
             ("notes.jsonl:1,tiny.txt:1", r"^all documents of mixture source 'tiny.txt': 1 documents gave only"),
             ("tiny.txt:1,blank.jsonl:1", r"^mixture source 'blank.jsonl': .*yielded no non-empty text"),
             ("notes.jsonl:1,gone.jsonl:1", r"^mixture source 'gone.jsonl': .*does not exist")]
    for spec, message in cases:
        errors = []
        for cap in [None, 4 * CTX]:
            with pytest.raises(DataSourceError, match=message) as e:
                tokenize_source(spec, tokenizer, CTX, max_tokens=cap)
            errors.append(str(e.value))
        assert errors[0] == errors[1], spec
    with pytest.raises(ValueError, match=r"max_tokens \(7\) must be at least ctx_len \(8\)"):
        tokenize_source("notes.jsonl", tokenizer, CTX, max_tokens=7)
    with pytest.raises(ValueError, match=r"max_tokens \(7\) must be at least ctx_len \(8\)"):
        tokenize_source("notes.jsonl:1,docs:1", tokenizer, CTX, max_tokens=7)


def test_capped_tokenize_source_reads_no_further_than_needed(sources, tokenizer):
    """A .jsonl file whose lines after the first 300 are not JSON: a small cap never reaches
    them; a call without a cap (or with one the valid lines cannot fill) does, and says where."""
    good = [json.dumps({"text": _text(i, 20 + i % 13)}) for i in range(300)]
    (sources / "bad.jsonl").write_text("\n".join(good + ["{not json"] * 500) + "\n")
    valid = [Document(f"bad.jsonl:{i + 1}", json.loads(line)["text"]) for i, line in enumerate(good)]
    n_valid = tokenize_documents(valid, tokenizer, CTX).shape[0]
    assert n_valid > 200
    valid_rows, docs_rows = tokenize_documents(valid, tokenizer, CTX), tokenize_documents(load_documents("docs"), tokenizer, CTX)
    for cap in [1, 10, 100]:
        rows, parts = tokenize_source("bad.jsonl", tokenizer, CTX, max_tokens=cap * CTX)
        assert torch.equal(rows, valid_rows[:cap]) and parts == [("bad.jsonl", slice(0, cap))]
        rows, parts = tokenize_source("bad.jsonl:1,docs:1", tokenizer, CTX, max_tokens=cap * CTX)
        counts = _expected_counts([n_valid, docs_rows.shape[0]], ["1", "1"], cap)
        assert [s.stop - s.start for _, s in parts] == counts
        assert torch.equal(rows, torch.cat([valid_rows[: counts[0]], docs_rows[: counts[1]]]))
    message = r"bad.jsonl, line 301 is not valid JSON"
    for spec, cap in [("bad.jsonl", None), ("bad.jsonl", (n_valid + 1) * CTX), ("bad.jsonl:1,docs:1", None),
                      ("docs:1,bad.jsonl:1", 10 * n_valid * CTX)]:
        with pytest.raises(DataSourceError, match=message):
            tokenize_source(spec, tokenizer, CTX, max_tokens=cap)


def test_capped_tokenize_source_streams_hub_datasets(monkeypatch, tokenizer):
    """A Hub dataset is streamed and read only as far as needed; one that cannot be streamed
    (offline with a cached copy) is loaded whole, as without a cap; one that cannot be loaded
    either raises what it raised before."""
    datasets = pytest.importorskip("datasets")
    texts = [_text(i, 20 + i % 13) if i % 5 else "" for i in range(200)]
    read: list[int] = []
    calls: list[tuple[str, bool]] = []

    class Rows:  # what load_dataset(..., streaming=True) returns: an iterable of dicts, read as iterated
        column_names = ["text"]

        def __iter__(self):
            for i, text in enumerate(texts):
                read.append(i)
                yield {"text": text}

    def fake_load(name, split, streaming=False):
        calls.append((name, streaming))
        if streaming and name != "owner/ds":
            raise ConnectionError("offline")
        if name == "gone/ds":
            raise ConnectionError("offline, not cached")
        return Rows() if streaming else datasets.Dataset.from_dict({"text": texts})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    whole = tokenize_documents(load_documents("owner/ds"), tokenizer, CTX)
    for name in ["owner/ds", "cached/ds"]:
        calls.clear()
        rows, parts = tokenize_source(name, tokenizer, CTX, max_tokens=5 * CTX)
        assert torch.equal(rows, whole[:5]) and parts == [(name, slice(0, 5))]
        assert calls == ([("owner/ds", True)] if name == "owner/ds" else [("cached/ds", True), ("cached/ds", False)])
    assert 0 < len(read) < 20  # the first few rows, not all 200
    with pytest.raises(DataSourceError) as before:
        tokenize_source("gone/ds", tokenizer, CTX)
    with pytest.raises(DataSourceError) as capped:
        tokenize_source("gone/ds", tokenizer, CTX, max_tokens=5 * CTX)
    assert str(capped.value) == str(before.value) and "not cached" in str(capped.value)
