"""Tests for transcoders.data.stream: streamed training text (lazy documents, the per-document split,
packing equal to the in-memory path, weighted interleaving, the seeded shuffle buffer, the eval
collector), ActivationStream on a stream, exact resume through ``train_run``, and memory that
stays flat on a 2 GB file (offline, CPU, tiny models)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import D_MODEL, N_LAYERS, build_tiny_tokenizer
from safetensors.torch import load_file

import transcoders.data.stream as stream_mod
import transcoders.evaluation.run as eval_mod
import transcoders.training.run as run_mod
from transcoders.data.activations import ActivationStream, rank_stream
from transcoders.data.cache import ActivationCacheError
from transcoders.data.sources import DataSourceError, Document, iter_documents, load_documents
from transcoders.data.stream import (
    TokenStream,
    collect_eval,
    interleave_schedule,
    pack_contexts,
    should_stream,
    side_documents,
)
from transcoders.data.tokens import build_token_split, tokenize_documents
from transcoders.evaluation.run import evaluate_run
from transcoders.models.loading import load_model
from transcoders.training.config import TrainConfig
from transcoders.training.run import train_run
from transcoders.training.trainer import Trainer, TrainingInterrupted

pytestmark = pytest.mark.usefixtures("single_thread")

CTX = 16
EVAL_FRACTION = 0.2
WORDS = ("the state of union is strong citizens senate house representatives nation people congress law year work "
         "peace war trade country government public new great quick brown fox jumps over lazy dog").split()
BATCH = 64
BASE = dict(layers=[1], batch_size=BATCH, total_tokens=BATCH * 8, ctx_len=CTX, block_contexts=3, model_batch=4, d_sae=64,
            k=4, warmup_steps=2, checkpoint_every=5, precision="fp32", harvest_dtype="float32", device="cpu", lr=1e-2,
            log_every=1, eval_fraction=EVAL_FRACTION, shuffle_contexts=32, streaming=True)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSCODERS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def _jsonl(path: Path, n_docs: int, seed: int, lo: int = 5, hi: int = 60) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": _text(rng, rng.randint(lo, hi))}) + "\n" for _ in range(n_docs)))
    return path


def _hash(name: str) -> float:
    """The split rule, computed here on its own: sha256 of the name, first 16 hex digits, over 2**64."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) / 2**64


def _sides(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    train = [d for d in docs if _hash(d.name) >= EVAL_FRACTION]
    evals = [d for d in docs if _hash(d.name) < EVAL_FRACTION]
    assert train and evals  # the sources of these tests have documents on both sides
    return train, evals


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """``a.jsonl`` (300 documents), ``docs/`` (40 .txt files), ``short.jsonl`` (10 short documents)."""
    root = tmp_path_factory.mktemp("corpus")
    _jsonl(root / "a.jsonl", 300, seed=1)
    (root / "docs").mkdir()
    rng = random.Random(2)
    for i in range(40):
        (root / "docs" / f"d{i:02d}.txt").write_text(_text(rng, rng.randint(10, 40)))
    _jsonl(root / "short.jsonl", 10, seed=3, lo=3, hi=8)
    return root


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A tiny Llama with the tiny tokenizer's vocabulary, saved and loaded as a user's model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("model") / "tiny-llama"
    tokenizer = build_tiny_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<eos>")
    assert isinstance(eos, int)
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=len(tokenizer), max_position_embeddings=64,
                      eos_token_id=eos, bos_token_id=eos)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(str(folder))


def _take(it, n: int) -> list:
    return list(itertools.islice(it, n))


def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "token-stream" and t.is_alive()]


# ---------------------------------------------------------------- lazy documents


def test_iter_documents_reads_lazily_what_load_documents_reads(corpus, tmp_path):
    for source in (corpus / "a.jsonl", corpus / "docs", str(corpus / "short.jsonl")):
        assert list(iter_documents(source)) == load_documents(source)
    first = next(iter_documents("sotu"))
    assert first == load_documents("sotu")[0]
    # a small text file is one document, as load_documents reads it
    small = tmp_path / "small.txt"
    small.write_text("one line\nanother\n")
    assert list(iter_documents(small)) == load_documents(small) == [Document("small.txt", "one line\nanother\n")]
    with pytest.raises(DataSourceError, match="does not exist"):
        iter_documents(tmp_path / "missing.jsonl")  # at once, not at the first document


def test_big_text_file_is_read_in_pieces_cut_at_newlines(tmp_path):
    rng = random.Random(0)
    text = "".join(_text(rng, rng.randint(1, 30)) + "\n" for _ in range(200))
    path = tmp_path / "big.txt"
    path.write_bytes(("\ufeff" + text).encode())
    pieces = list(iter_documents(path, piece_bytes=500))
    assert [d.name for d in pieces] == [f"big.txt@{i}" for i in range(1, len(pieces) + 1)] and len(pieces) > 5
    assert "".join(d.text for d in pieces) == text  # the BOM dropped, nothing else lost
    assert all(d.text.endswith("\n") and len(d.text.encode()) <= 500 for d in pieces)
    assert load_documents(path) == [Document("big.txt", text)]  # unchanged: one document
    # no newline at all: cut after a space, else never inside a character
    path.write_text("é" * 700)
    pieces = list(iter_documents(path, piece_bytes=301))
    assert "".join(d.text for d in pieces) == "é" * 700 and len(pieces) >= 4
    path.write_text("ab " * 300)
    assert all(d.text.endswith(" ") for d in list(iter_documents(path, piece_bytes=100))[:-1])


def test_hub_datasets_are_streamed(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    class Rows:  # what load_dataset(..., streaming=True) returns: an iterable of dicts, read as iterated
        column_names = ["text", "id"]

        def __iter__(self):
            yield {"text": "one", "id": 0}
            yield {"text": "", "id": 1}
            yield {"text": "three", "id": 2}

    def fake_load(name, split, streaming=False):
        calls.append((name, split, streaming))
        if name == "broken/ds":
            raise ConnectionError("network unreachable")
        return Rows()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = list(iter_documents("owner/some_ds", split="validation"))
    assert calls == [("owner/some_ds", "validation", True)]
    # named as load_documents names them
    assert docs == [Document("owner/some_ds:0", "one"), Document("owner/some_ds:2", "three")]
    with pytest.raises(DataSourceError, match=r"'broken/ds' as a Hugging Face dataset \(streaming\).*network unreachable"):
        iter_documents("broken/ds")
    with pytest.raises(DataSourceError, match="no column 'body'"):
        iter_documents("owner/some_ds", text_field="body")
    assert should_stream("owner/some_ds") and should_stream("sotu:0.5,owner/some_ds:0.5")


def test_auto_streaming_rule(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not should_stream("sotu") and not should_stream("books:0.5,sotu:0.5") and not should_stream(None)
    assert not should_stream(str(corpus / "a.jsonl")) and not should_stream(str(corpus / "docs"))
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as fh:  # a sparse file: 300 MB long, nothing written
        fh.truncate(300 * 2**20)
    assert should_stream(str(big)) and should_stream(f"{big}:0.5,sotu:0.5")
    (tmp_path / "folder").mkdir()
    for i in range(2):
        with open(tmp_path / "folder" / f"{i}.txt", "wb") as fh:
            fh.truncate(130 * 2**20)  # 260 MB in all
    assert should_stream("folder")
    assert not should_stream(str(big), False) and should_stream("sotu", True)
    assert not should_stream("./missing.jsonl")  # a missing path is the in-memory path's error to give


# ---------------------------------------------------------------- packing and the split


@pytest.mark.parametrize("bos_id", [None, 7])
def test_streamed_rows_equal_the_in_memory_tokenization(corpus, tok, bos_id):
    docs = load_documents(corpus / "a.jsonl")
    train, _ = _sides(docs)
    expected = tokenize_documents(train, tok, CTX, bos_id=bos_id)  # the in-memory path on the same documents
    stream = TokenStream(str(corpus / "a.jsonl"), tok, CTX, eval_fraction=EVAL_FRACTION, bos_id=bos_id)
    n = expected.shape[0]
    rows = torch.stack(_take(stream.unshuffled(), 2 * n + 3))
    assert torch.equal(rows[:n], expected)
    assert torch.equal(rows[n : 2 * n], expected)  # the next epoch starts again from the first document
    assert torch.equal(rows[2 * n :], expected[:3])
    # the pieces on their own
    assert list(side_documents(docs, EVAL_FRACTION, "train")) == train
    assert torch.equal(torch.stack(list(pack_contexts(train, tok, CTX, bos_id))), expected)


def test_single_document_source_is_cut_as_in_memory(tmp_path, tok):
    rng = random.Random(5)
    path = tmp_path / "speech.txt"
    path.write_text(" ".join(_text(rng, 12) for _ in range(60)))
    split = build_token_split(str(path), tok, CTX, eval_fraction=EVAL_FRACTION, max_eval_tokens=CTX * 4)
    stream = TokenStream(str(path), tok, CTX, eval_fraction=EVAL_FRACTION)
    assert torch.equal(torch.stack(_take(stream.unshuffled(), split.train.shape[0])), split.train)
    rows, _ = collect_eval(str(path), tok, CTX, eval_fraction=EVAL_FRACTION, max_eval_tokens=CTX * 4)
    assert torch.equal(rows, split.eval)


def test_eval_rows_equal_build_token_split(corpus, tok):
    source = str(corpus / "a.jsonl")
    _sides(load_documents(source))  # both sides non-empty by the hash rule alone
    for cap in (CTX * 5, CTX * 100_000):  # a few rows, and all the source has
        split = build_token_split(source, tok, CTX, eval_fraction=EVAL_FRACTION, max_eval_tokens=cap, bos_id=3)
        rows, sources = collect_eval(source, tok, CTX, eval_fraction=EVAL_FRACTION, max_eval_tokens=cap, bos_id=3)
        assert torch.equal(rows, split.eval) and sources == split.eval_sources
    assert split.eval.shape[0] > 5
    mixture = f"{corpus / 'a.jsonl'}:0.6,{corpus / 'docs'}:0.4"
    logs_mem, logs_stream = [], []
    split = build_token_split(mixture, tok, CTX, eval_fraction=EVAL_FRACTION, max_eval_tokens=CTX * 30,
                              log=logs_mem.append)
    rows, sources = collect_eval(mixture, tok, CTX, eval_fraction=EVAL_FRACTION, max_eval_tokens=CTX * 30,
                                 log=logs_stream.append)
    assert torch.equal(rows, split.eval) and sources == split.eval_sources
    assert logs_stream == [line for line in logs_mem if "eval split" in line]


def test_eval_collector_reads_only_as_far_as_needed(corpus, tok, monkeypatch):
    read = []
    real = stream_mod.iter_documents

    def counting(*args, **kw):
        for doc in real(*args, **kw):
            read.append(doc.name)
            yield doc

    monkeypatch.setattr(stream_mod, "iter_documents", counting)
    collect_eval(str(corpus / "a.jsonl"), tok, CTX, eval_fraction=EVAL_FRACTION, max_eval_tokens=CTX * 2)
    assert 0 < len(read) < 60  # of 300


def test_eval_collector_says_when_the_eval_side_is_too_small(corpus, tmp_path, tok):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    assert all(_hash(f"few.jsonl:{i}") >= EVAL_FRACTION for i in (1, 2, 3))  # nothing on the eval side
    with pytest.raises(DataSourceError, match=r"eval split \(eval_fraction=0.2\): the held-out documents \(0 of them\)"):
        collect_eval(str(few), tok, CTX, eval_fraction=EVAL_FRACTION, max_eval_tokens=CTX * 4)
    with pytest.raises(DataSourceError, match=r"eval split .* of mixture source '.*few.jsonl'.*fewer than ctx_len"):
        collect_eval(f"{corpus / 'a.jsonl'}:0.5,{few}:0.5", tok, CTX, eval_fraction=EVAL_FRACTION,
                     max_eval_tokens=CTX * 4)
    with pytest.raises(ValueError, match="max_eval_tokens"):
        collect_eval(str(few), tok, CTX, eval_fraction=EVAL_FRACTION, max_eval_tokens=CTX - 1)


# ---------------------------------------------------------------- mixtures and the shuffle


def test_mixture_interleaves_by_share_and_repeats_a_short_source(corpus, tok):
    labels = [str(corpus / "a.jsonl"), str(corpus / "docs"), str(corpus / "short.jsonl")]
    weights = ["5", "3", "2"]
    shares = [Fraction(w) / 10 for w in weights]
    data = ",".join(f"{label}:{w}" for label, w in zip(labels, weights))
    own = [tokenize_documents(_sides(load_documents(label))[0], tok, CTX) for label in labels]
    assert own[2].shape[0] < 20  # the short source runs out many times below
    n = 600
    pairs = _take(TokenStream(data, tok, CTX, eval_fraction=EVAL_FRACTION).unshuffled(with_source=True), n)
    taken = [0, 0, 0]
    for i, (k, row) in enumerate(pairs):
        # each source gives its own rows in order, and starts again when it runs out
        assert torch.equal(row, own[k][taken[k] % own[k].shape[0]]), (i, k)
        taken[k] += 1
        assert all(abs(taken[j] - (i + 1) * shares[j]) < 1 for j in range(3)), (i, taken)
    assert taken[2] > 3 * own[2].shape[0]
    # the schedule on its own: the source furthest behind its share, ties to the earlier one
    assert _take(interleave_schedule([Fraction(1, 2), Fraction(1, 2)]), 4) == [0, 1, 0, 1]
    assert _take(interleave_schedule([Fraction(2, 3), Fraction(1, 3)]), 6) == [0, 1, 0, 0, 1, 0]


def test_shuffle_buffer_is_the_seeded_rule(corpus, tok):
    source, size, n = str(corpus / "a.jsonl"), 16, 200
    plain = _take(TokenStream(source, tok, CTX, eval_fraction=EVAL_FRACTION).unshuffled(), n + size)
    shuffled = _take(TokenStream(source, tok, CTX, eval_fraction=EVAL_FRACTION, seed=3, shuffle_contexts=size).shuffled(), n)
    # the documented rule, by index: a buffer of the first `size` contexts; each step emits a
    # position drawn by random.Random(seed) and refills it with the next context
    rng, buffer, nxt, expected = random.Random(3), list(range(size)), size, []
    for _ in range(n):
        j = rng.randrange(size)
        expected.append(buffer[j])
        buffer[j], nxt = nxt, nxt + 1
    assert all(torch.equal(a, plain[i]) for a, i in zip(shuffled, expected))
    assert sum(abs(a - b) for a, b in zip(expected, expected[1:])) / (n - 1) > size / 4  # neighbours spread apart
    other = _take(TokenStream(source, tok, CTX, eval_fraction=EVAL_FRACTION, seed=4, shuffle_contexts=size).shuffled(), n)
    assert not all(torch.equal(a, b) for a, b in zip(shuffled, other))


def test_contexts_from_any_start_and_rank_shares(corpus, tok):
    stream = TokenStream(str(corpus / "a.jsonl"), tok, CTX, eval_fraction=EVAL_FRACTION, shuffle_contexts=8, seed=1)
    whole = _take(stream.shuffled(), 60)
    assert all(torch.equal(a, b) for a, b in zip(_take(stream.contexts(17), 20), whole[17:37]))  # a background thread
    for rank in range(3):
        share = _take(stream.shard(rank, 3).contexts(2), 10)
        assert all(torch.equal(a, whole[(2 + j) * 3 + rank]) for j, a in enumerate(share))
    blocks = stream.blocks(4, start_block=3)
    assert torch.equal(next(blocks), torch.stack(whole[12:16]))
    blocks.close()


def test_errors_of_the_text_reach_the_reader_of_the_stream(corpus, tmp_path, tok):
    bad = _jsonl(tmp_path / "bad.jsonl", 60, seed=7)
    with open(bad, "a") as fh:
        fh.write('{"text": oops}\n')
    with pytest.raises(DataSourceError, match="bad.jsonl, line 61 is not valid JSON"):
        _take(TokenStream(str(bad), tok, CTX, eval_fraction=EVAL_FRACTION).contexts(), 10_000)  # raised in the thread
    assert not _stream_threads()
    blank = tmp_path / "blank.jsonl"
    blank.write_text("".join(json.dumps({"text": "a"}) + "\n" for _ in range(5)))  # under 16 tokens
    mixture = f"{corpus / 'a.jsonl'}:0.5,{blank}:0.5"
    with pytest.raises(DataSourceError, match=r"mixture source '.*blank.jsonl': the train side .* fewer than ctx_len=16"):
        _take(TokenStream(mixture, tok, CTX, eval_fraction=EVAL_FRACTION).unshuffled(), 10)
    with pytest.raises(ValueError, match="eval_fraction"):
        TokenStream(str(bad), tok, CTX, eval_fraction=1.0)


# ---------------------------------------------------------------- ActivationStream on a stream


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k][0], y[k][0]) and torch.equal(x[k][1], y[k][1]) for k in x)
        for x, y in zip(a, b))


def test_activation_stream_on_a_token_stream_resumes_exactly(corpus, loaded):
    tokens = TokenStream(str(corpus / "a.jsonl"), loaded.tokenizer, CTX, eval_fraction=EVAL_FRACTION, shuffle_contexts=8)
    kw = dict(seed=2, block_contexts=3, model_batch=2, skip_first=1)  # 45-token blocks: batches straddle blocks
    stream = ActivationStream(loaded.adapter, tokens, [0, 2], BATCH, **kw)
    gen = stream.batches(0)
    run = _take(gen, 7)
    gen.close()
    assert not _stream_threads()  # closing the batches stops the tokenizing thread
    resumed = _take(ActivationStream(loaded.adapter, tokens, [0, 2], BATCH, **kw).batches(4), 3)
    assert _same_batches(run[4:], resumed)
    assert not _stream_threads()
    # block b is contexts [3b, 3b + 3) of the stream; rank r of 2 takes contexts i % 2 == r
    whole = _take(tokens.shuffled(), 24)
    assert torch.equal(stream.block_ids(2), torch.stack(whole[6:9]))
    for rank in range(2):
        share = rank_stream(loaded.adapter, tokens, [0], 2 * BATCH, seed=2, rank=rank, world=2, block_contexts=3)
        assert torch.equal(share.block_ids(1), torch.stack(whole[6 + rank : 12 : 2]))
        share.close()
    stream.close()


def test_activation_stream_on_a_tensor_is_unchanged(corpus, loaded):
    """The tensor path reads rows in the seeded permutation, as before streams existed."""
    tokens = tokenize_documents(load_documents(corpus / "a.jsonl"), loaded.tokenizer, CTX)[:20]
    stream = ActivationStream(loaded.adapter, tokens, [1], BATCH, seed=5, block_contexts=4)
    order = [int(torch.randperm(20, generator=torch.Generator().manual_seed(5 * 1_000_003))[j]) for j in range(4, 8)]
    assert torch.equal(stream.block_ids(1), tokens[order])
    with pytest.raises(TypeError, match="token tensor"):
        ActivationStream(loaded.adapter, TokenStream(str(corpus / "a.jsonl"), loaded.tokenizer, CTX), [1], BATCH
                         ).context_index(0)


# ---------------------------------------------------------------- train_run


def _cfg(loaded, data, **kw) -> TrainConfig:
    return TrainConfig(**{**BASE, "model": loaded.name, "data": data, **kw})


def _interrupt_at(step: int):
    class Interrupted(Trainer):
        def fit(self, **kw):
            def on_step(trainer, _metrics):
                if trainer.step == step:
                    trainer._stop_signal = 15  # as the SIGTERM handler does

            return super().fit(**kw, on_step=on_step)

    return Interrupted


def test_train_run_streams_and_resumes_exactly(corpus, loaded, tmp_path, monkeypatch):
    data = f"{corpus / 'a.jsonl'}:0.7,{corpus / 'short.jsonl'}:0.3"
    cfg = _cfg(loaded, data)
    lines: list[str] = []
    whole = train_run(cfg, tmp_path / "a", progress=False, loaded=loaded, eval_tokens=CTX * 6, log=lines.append)
    assert any(line.startswith("streaming the training text") for line in lines)
    assert json.loads((tmp_path / "a" / "train_config.json").read_text())["streaming"] is True

    monkeypatch.setattr(run_mod, "Trainer", _interrupt_at(3))
    with pytest.raises(TrainingInterrupted):
        train_run(cfg, tmp_path / "b", progress=False, loaded=loaded, evaluate=False)
    monkeypatch.setattr(run_mod, "Trainer", Trainer)
    train_run(cfg, tmp_path / "b", resume=True, progress=False, loaded=loaded, evaluate=False)
    for name in ("coder.safetensors", "stats.safetensors"):
        a, b = load_file(tmp_path / "a" / "layers.1.mlp" / name), load_file(tmp_path / "b" / "layers.1.mlp" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # evaluating the run again rebuilds the same held-out rows, by streaming them again
    evals, _ = collect_eval(data, loaded.tokenizer, CTX, eval_fraction=EVAL_FRACTION, max_eval_tokens=CTX * 6)
    seen = []
    real = eval_mod.evaluate_coders
    monkeypatch.setattr(eval_mod, "evaluate_coders",
                        lambda adapter, coders, tokens, **kw: seen.append(tokens) or real(adapter, coders, tokens, **kw))
    again = evaluate_run(tmp_path / "a", loaded=loaded, eval_tokens=CTX * 6, progress=False)
    assert torch.equal(seen[0], evals)
    assert again["layers"]["1"]["fvu"] == whole["metrics"]["layers"]["1"]["fvu"]


def test_auto_streaming_is_recorded_and_the_cache_is_built_from_the_stream(corpus, loaded, tmp_path, monkeypatch):
    source = str(corpus / "a.jsonl")
    monkeypatch.setattr(stream_mod, "STREAM_AUTO_BYTES", 1000)  # a.jsonl counts as large
    cfg = _cfg(loaded, source, streaming=None, total_tokens=BATCH * 3, activation_cache=str(tmp_path / "acts"),
               cache_dtype="float32")
    train_run(cfg, tmp_path / "cached", progress=False, loaded=loaded, evaluate=False)
    saved = TrainConfig.model_validate_json((tmp_path / "cached" / "train_config.json").read_text())
    assert saved.streaming is True
    meta = json.loads((tmp_path / "acts" / "meta.json").read_text())
    assert meta["streaming"] is True and meta["shuffle_contexts"] == 32
    train_run(saved.model_copy(update={"activation_cache": None}), tmp_path / "live", progress=False, loaded=loaded,
              evaluate=False)
    a, b = (load_file(tmp_path / run / "layers.1.mlp" / "coder.safetensors") for run in ("cached", "live"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the cache holds the stream's first activations
    with pytest.raises(ActivationCacheError, match="streaming"):  # never read as an in-memory cache
        train_run(saved.model_copy(update={"streaming": False}), tmp_path / "other", progress=False, loaded=loaded,
                  evaluate=False)


# ---------------------------------------------------------------- memory


def _write_big_jsonl(path: Path, n_bytes: int) -> None:
    """``n_bytes`` of JSON lines, every document distinct (numbered), written a few MB at a time."""
    rng = random.Random(0)
    bodies = [" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(16)]
    written, line = 0, 0
    with open(path, "w") as fh:
        while written < n_bytes:
            chunk = "".join(f'{{"text": "{line + i} {bodies[(line + i) % 16]}."}}\n' for i in range(2000))
            line += 2000
            fh.write(chunk)
            written += len(chunk)


def _peak_rss_of_training(loaded, data: Path, run_dir: Path, *extra: str) -> int:
    """Peak resident memory (bytes) of ``transcoders train`` on ``data`` in a fresh process."""
    args = [sys.executable, "-c", "from transcoders.cli import main; main()", "--threads", "1", "train",
            "--model", loaded.name, "--data", str(data), "--run-dir", str(run_dir), "--layers", "1", "--ctx-len", str(CTX),
            "--batch-size", str(BATCH), "--total-tokens", str(BATCH * 6), "--d-sae", "64", "-k", "4", "--precision", "fp32",
            "--harvest-dtype", "float32", "--device", "cpu", "--eval-tokens", "0", "--quiet", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(run_dir.parent / f"{run_dir.name}.log", "w+") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: ru_maxrss, as RUSAGE_CHILDREN reports it
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        assert proc.returncode == 0, out.read()[-3000:]
    return usage.ru_maxrss * 1024  # kilobytes on Linux


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units and sparse disk use are Linux's")
def test_memory_stays_flat_on_a_2gb_jsonl(loaded, tmp_path):
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    _write_big_jsonl(small, 20 * 2**20)
    _write_big_jsonl(big, 2 * 2**30)
    try:
        rss_small = _peak_rss_of_training(loaded, small, tmp_path / "small", "--streaming")
        rss_big = _peak_rss_of_training(loaded, big, tmp_path / "big")  # streams by the auto rule (> 256 MB)
        assert json.loads((tmp_path / "big" / "train_config.json").read_text())["streaming"] is True
    finally:
        big.unlink()
    print(f"peak RSS: 20 MB file {rss_small / 2**20:.0f} MiB, 2 GB file {rss_big / 2**20:.0f} MiB")
    # Flat: the 2 GB file costs what a 20 MB one does. (The absolute level depends on the process
    # environment: 484 MiB alone, about 3 GiB for both files inside the full suite.)
    assert rss_big - rss_small < 200 * 2**20
