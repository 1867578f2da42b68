"""The features pass: every recorded statistic equals a brute-force computation over all
activations of a tiny model; the store grows and merges exactly; lookups and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_tokenizer, save_random_transcoders, write_texts
from test_cli import _save_llama

from transcoders.coders.io import load_coder
from transcoders.features.accumulate import (
    HIST_EDGES,
    N_BINS,
    LayerAccumulator,
    add_cooccurrence,
    cooccurrence,
    event_hash,
)
from transcoders.features.collect import collect_features, pass_tokens
from transcoders.features.config import FeaturesConfig
from transcoders.features.store import FeatureStore, FeatureStoreError
from transcoders.models.loading import load_model
from transcoders.training.config import TrainConfig

CTX = 16


def _quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny Llama saved to disk, random transcoders for its 3 layers, a run config reading
    ``train.jsonl`` in contexts of 16 tokens with the first position left out."""
    root = tmp_path_factory.mktemp("feat")
    model_dir = _save_llama(root / "model", build_tiny_tokenizer())
    train, _ = write_texts(root)
    run = save_random_transcoders(root / "run", str(model_dir), d_sae=64, k=4)
    cfg = TrainConfig(model=str(model_dir), data=str(train), ctx_len=CTX, skip_first_tokens=1)
    (run / "train_config.json").write_text(cfg.model_dump_json())
    return run, model_dir


def _settings(**kw) -> FeaturesConfig:
    base = dict(tokens=100_000, top_k=5, n_samples=4000, before=3, after=2, random_every=2, model_batch=3,
                harvest_dtype="float32", device="cpu")
    return FeaturesConfig(**(base | kw))


def _all_acts(run, model_dir, cfg: FeaturesConfig, layer: int):
    """Brute force: dense activations ``[n_ctx, T, d_sae]`` of every context of the pass,
    computed by a plain forward pass with output_hidden_states (no hooks of ours)."""
    lm = load_model(str(model_dir))
    from transcoders.evaluation.run import read_train_config

    tokens, _ = pass_tokens(lm, read_train_config(run), cfg, None)
    coder = load_coder(run / f"layers.{layer}.mlp")
    block = lm.model.model.layers[layer]
    with torch.no_grad():
        hidden = lm.model(tokens, output_hidden_states=True).hidden_states[layer]
        attn_out = block.self_attn(block.input_layernorm(hidden), position_embeddings=lm.model.model.rotary_emb(
            hidden, torch.arange(tokens.shape[1]).unsqueeze(0)), attention_mask=None)[0]
        mlp_in = block.post_attention_layernorm(hidden + attn_out)
        acts = coder.encode(mlp_in)
    return tokens, acts


def test_pass_equals_brute_force(tiny_run, tmp_path):
    run, model_dir = tiny_run
    cfg = _settings()
    store = collect_features(run, cfg, out=tmp_path / "store", progress=False, log=_quiet)
    tokens, acts = _all_acts(run, model_dir, cfg, 1)
    n_ctx, T, d = acts.shape
    counted = acts[:, 1:].reshape(-1, d)  # position 0 is left out
    n_fires = (counted > 0).sum(0)
    assert store.info(store.keys[1])["n_tokens"] == n_ctx * (T - 1)
    checked = 0
    for f in range(d):
        rec = store.feature(1, f)
        assert rec.count == int(n_fires[f])
        vals = counted[:, f][counted[:, f] > 0]
        assert rec.sum == pytest.approx(float(vals.double().sum()), rel=1e-5, abs=1e-6)
        assert rec.max == pytest.approx(float(vals.max()) if vals.numel() else 0.0, rel=1e-6)
        edges = HIST_EDGES.tolist()
        brute_hist = [0] * N_BINS
        for v in vals.tolist():
            brute_hist[min(N_BINS - 1, max(0, sum(e < v for e in edges[1:-1])))] += 1
        assert rec.hist == brute_hist
        sink = acts[:, 0, f]
        assert rec.sink_count == int((sink > 0).sum())
        # top examples: the 5 largest activations, earlier token first on ties, with their windows
        where = (acts[:, 1:, f] > 0).nonzero()
        events = sorted(((-float(acts[c, p + 1, f]), int(c) * T + int(p) + 1) for c, p in where.tolist()))
        top = rec.top
        assert [e.where for e in top] == [divmod(t, T) for _, t in events[:5]]
        for e in top:
            c, p = e.where
            assert e.acts[e.center] == pytest.approx(float(acts[c, p, f]), rel=1e-6)
            lo = max(0, p - 3)
            assert e.token_ids == tokens[c, lo: min(T, p + 3)].tolist()
            want = acts[c, lo: min(T, p + 3), f].clone()
            if lo == 0:
                want[0] = 0.0  # the excluded position reads 0
            assert e.acts == pytest.approx(want.tolist(), rel=1e-5, abs=1e-6)
        # with n_samples >= fires the sample is every activation, and the quantiles are exact
        assert len(rec.samples) == rec.count
        if rec.count:
            q = torch.quantile(vals.double(), torch.linspace(0, 1, 11, dtype=torch.float64))
            assert rec.quantiles == pytest.approx(q.tolist(), rel=1e-5)
            groups = rec.quantile_groups()
            assert [len(g) for g in groups] == [len([i for i in range(rec.count) if i * 10 // rec.count == g])
                                                for g in range(10)]
            checked += 1
        # co-occurrence: Jaccard index with the features recorded
        for j, jac, n in rec.cooccurring:
            both = int(((counted[:, f] > 0) & (counted[:, j] > 0)).sum())
            assert n == both
            assert jac == pytest.approx(both / (int(n_fires[f]) + int(n_fires[j]) - both), rel=1e-5)
    assert checked > 10


def test_sample_is_the_smallest_hashes_and_random_windows_are_silent(tiny_run, tmp_path):
    run, model_dir = tiny_run
    cfg = _settings(n_samples=4)
    store = collect_features(run, cfg, out=tmp_path / "store", progress=False, log=_quiet)
    tokens, acts = _all_acts(run, model_dir, cfg, 2)
    T = tokens.shape[1]
    for f in range(acts.shape[2]):
        where = (acts[:, 1:, f] > 0).nonzero()
        tok = torch.tensor([c * T + p + 1 for c, p in where.tolist()], dtype=torch.long)
        h = event_hash(tok, torch.full_like(tok, f), cfg.seed)
        want = sorted(zip(h.tolist(), tok.tolist()))[:4]
        got = sorted(e.where[0] * T + e.where[1] for e in store.feature(2, f).samples)
        assert got == sorted(t for _, t in want)
        for ex in store.random_examples(2, f, 3):
            c, p = ex.where
            start = p - cfg.before
            window = acts[c, max(start, 1): start + cfg.before + 1 + cfg.after, f]
            assert not bool((window > 0).any()) and ex.token_ids == tokens[c, start: start + len(ex.token_ids)].tolist()
        for ex in store.near_misses(2, f, 3):
            assert not ex.activating


def test_store_grows_to_the_same_result_as_one_pass(tiny_run, tmp_path):
    run, _ = tiny_run
    one = collect_features(run, _settings(tokens=160), out=tmp_path / "a", progress=False, log=_quiet)
    collect_features(run, _settings(tokens=64, layers=[0, 2]), out=tmp_path / "b", progress=False, log=_quiet)
    grown = collect_features(run, _settings(tokens=160), out=tmp_path / "b", progress=False, log=_quiet)
    assert grown.keys == one.keys
    for key in one.keys:
        assert grown.info(key)["n_tokens"] == one.info(key)["n_tokens"]
        for f in range(0, 64, 7):
            a, b = one.feature(key.layer, f), grown.feature(key.layer, f)
            assert (a.count, a.hist, a.max, a.sink_count) == (b.count, b.hist, b.max, b.sink_count)
            assert a.sum == pytest.approx(b.sum, rel=1e-12)
            assert [e.where for e in a.top] == [e.where for e in b.top]
            assert [e.acts for e in a.top] == [e.acts for e in b.top]
            assert [e.where for e in a.samples] == [e.where for e in b.samples]
            assert a.cooccurring == b.cooccurring


def test_store_refuses_other_settings_and_changed_coders(tiny_run, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "store"
    collect_features(run, _settings(tokens=64, layers=[0]), out=out, progress=False, log=_quiet)
    before = (out / "store.json").read_text()
    with pytest.raises(FeatureStoreError, match="top_k"):
        collect_features(run, _settings(tokens=64, top_k=7), out=out, progress=False, log=_quiet)
    assert (out / "store.json").read_text() == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(FeatureStoreError, match="not a feature store"):
        collect_features(run, _settings(tokens=64), out=other, progress=False, log=_quiet)
    assert (other / "thesis.tex").read_text() == "x"
    with pytest.raises(FeatureStoreError, match="out of range"):
        FeatureStore(out).feature(0, 64)
    with pytest.raises(FeatureStoreError, match="no layer 2"):
        FeatureStore(out).feature(2, 0)
    assert json.loads(before)["coders"]["0"]["n_contexts"] >= 4


def test_cooccurrence_counts_match_brute_force():
    """Counts of tokens where two features both fire, with 1 to 40 active features per token."""
    gen = torch.Generator().manual_seed(0)
    n, d = 50, 40
    active = (torch.rand(n, d, generator=gen) < torch.rand(n, 1, generator=gen)).float()
    row, feat = active.nonzero(as_tuple=True)
    got = cooccurrence(feat, row, active)
    brute = torch.zeros(d, d)
    for t in range(n):
        on = active[t].nonzero().flatten().tolist()
        for i in on:
            for j in on:
                brute[i, j] += 1
    assert torch.equal(got, brute)
    for method in ("pairs", "product", "auto"):  # both exact ways, added to what is there
        counts = torch.ones(d * d, dtype=torch.int32)
        add_cooccurrence(counts, feat, row, active, method)
        assert torch.equal(counts.view(d, d), brute.int() + 1), method


def test_accumulators_merge_exactly_in_any_split():
    """Three accumulators over disjoint random batches merge to the one that saw them all."""
    gen = torch.Generator().manual_seed(3)
    d, T = 10, 8
    dense = torch.relu(torch.randn(9, T, d, generator=gen) - 0.8)
    from transcoders.features.accumulate import BatchEvents

    def feed(acc, rows):
        ctx = torch.tensor(rows)
        block = dense[ctx]
        b, p, f = block.nonzero(as_tuple=True)
        acc.add(BatchEvents(ctx[b], p, f, block[b, p, f], block, ctx), n_tokens=len(rows) * T)

    kw = dict(top_k=3, n_samples=4, before=2, after=1, random_every=1, max_random_windows=4)
    whole = LayerAccumulator(d, T, **kw)
    for rows in ([0, 1, 2], [3, 4, 5], [6, 7, 8]):
        feed(whole, rows)
    parts = [LayerAccumulator(d, T, **kw) for _ in range(3)]
    feed(parts[0], [6, 7, 8]), feed(parts[1], [0, 1, 2]), feed(parts[2], [3, 4, 5])
    merged = LayerAccumulator.from_state(parts[2].state())
    merged.merge(parts[0])
    merged.merge(LayerAccumulator.from_state(parts[1].state()))
    a, b = whole.state(), merged.state()
    assert a["rand_ctx"].numel() == 4  # 9 windows offered, the 4 of smallest hash kept
    for name in a:
        if name == "sum":
            assert torch.allclose(a[name], b[name], rtol=1e-12)
        else:
            assert torch.equal(a[name], b[name]), name


def test_a_coder_in_another_format_gets_the_same_statistics(tiny_run, tmp_path):
    """A sparsify-format copy of one layer's transcoder (read through the format readers) gets
    the same record as that layer of the run."""
    from transcoders.coders.formats import write_coder

    run, model_dir = tiny_run
    peer = write_coder(load_coder(run / "layers.1.mlp"), tmp_path / "peer" / "layers.1.mlp", "sparsify")
    cfg = _settings(tokens=96)
    ours = collect_features(run, cfg.model_copy(update={"layers": [1]}), out=tmp_path / "ours", progress=False, log=_quiet)
    from transcoders.evaluation.run import read_train_config

    same_text = {"model": str(model_dir), "data": read_train_config(run).data, "ctx_len": CTX}
    theirs = collect_features(peer, cfg.model_copy(update=same_text), out=tmp_path / "theirs",
                              progress=False, log=_quiet)
    assert theirs.keys == ours.keys
    for f in range(0, 64, 5):
        a, b = ours.feature(1, f), theirs.feature(1, f)
        assert a.hist == b.hist and [e.where for e in a.top] == [e.where for e in b.top]
