"""Tests for sweeps (several coders per layer trained from one activation stream) and the on-disk
activation cache (build, read back exactly, wrap around, atomic build, errors, training from it
bitwise like training live), through the Trainer, ``train_run`` and the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner
from conftest import D_MODEL, N_LAYERS, VOCAB, build_tiny_tokenizer
from conftest import read_log as _log
from pydantic import ValidationError
from safetensors.torch import load_file

import transcoders.data.activations as acts_mod
from transcoders.cli import main
from transcoders.coders.io import load_coder
from transcoders.coders.run_folder import CoderKey
from transcoders.data.activations import ActivationStream
from transcoders.data.cache import ActivationCacheError, CachedStream, build_cache
from transcoders.evaluation.run import evaluate_run
from transcoders.models.loading import LoadedModel, load_model
from transcoders.training.config import SWEEPABLE, TrainConfig
from transcoders.training.run import open_cache, train_run
from transcoders.training.trainer import Trainer


def same_tensors(a, b) -> bool:
    """Bitwise-equal tensors in two safetensors files (their metadata, which names the run's
    own settings such as the cache folder, may differ)."""
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH = 64
BASE = dict(
    model="tiny-llama", layers=[1], batch_size=BATCH, total_tokens=BATCH * 6, ctx_len=16, block_contexts=4,
    model_batch=4, d_sae=64, k=4, warmup_steps=2, checkpoint_every=5, precision="fp32",
    harvest_dtype="float32", device="cpu", lr=1e-2, log_every=1,
)


def make_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**BASE, **kw})


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSCODERS_CACHE", str(tmp_path / "cache"))




def _stream(adapter, tokens, layers=(1,), **kw) -> ActivationStream:
    kw = {"seed": 0, "block_contexts": 4, "model_batch": 4, **kw}
    return ActivationStream(adapter, tokens, list(layers), BATCH, **kw)


def _same_batch(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


# ---------------------------------------------------------------- sweeps


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory, llama_adapter, train_tokens, single_thread):
    """A k2/k8 sweep on layer 1, counting forward passes, stream batches and per-coder inputs."""
    run_dir = tmp_path_factory.mktemp("sweep")
    harvests = []
    real_harvest = acts_mod.harvest

    def counting(adapter, ids, layers):
        harvests.append(sorted(layers))
        return real_harvest(adapter, ids, layers)

    acts_mod.harvest = counting
    try:
        trainer = Trainer(make_cfg(sweep=[{"k": 2}, {"k": 8}]), llama_adapter, train_tokens, run_dir)
        yielded = []
        real_batches = trainer.stream.batches

        def recording(start=0):
            for batch in real_batches(start):
                yielded.append(batch)
                yield batch

        trainer.stream.batches = recording
        seen = []
        real_train_one = trainer._train_one

        def train_one(st, x, y):
            seen.append((trainer.step, str(st.key), x, y))
            return real_train_one(st, x, y)

        trainer._train_one = train_one
        coders = trainer.fit(progress=False)
    finally:
        acts_mod.harvest = real_harvest
    return trainer, coders, run_dir, harvests, yielded, seen


def test_sweep_trains_one_coder_per_variant_and_saves_them_in_variant_folders(sweep_run):
    trainer, coders, run_dir, _, _, _ = sweep_run
    keys = [CoderKey(1, "k2"), CoderKey(1, "k8")]
    assert list(trainer.states) == keys and sorted(coders) == keys
    assert [trainer.states[n].cfg.k for n in keys] == [2, 8]
    assert all(trainer.states[n].cfg.sweep == [] for n in trainer.states)
    for name, k in (("k2", 2), ("k8", 8)):
        folder = run_dir / "layers.1.mlp" / name
        coder = load_coder(folder)
        assert coder.cfg.k == k and coder.cfg.layer == 1 and coder.cfg.d_sae == 64
        assert TrainConfig.model_validate(coder.cfg.training).k == k
        assert int(load_file(folder / "stats.safetensors")["tokens"]) == BATCH * 6
        for (pname, p), (_, q) in zip(coder.named_parameters(), coders[CoderKey(1, name)].named_parameters()):
            assert torch.equal(p, q), pname
    assert not (run_dir / "layers.1.mlp" / "coder.safetensors").exists()
    assert not torch.equal(coders[CoderKey(1, "k2")].W_enc, coders[CoderKey(1, "k8")].W_enc)
    log = _log(run_dir)
    assert all(set(r["layers"]) == {"1/k2", "1/k8"} for r in log)
    assert all(r["layers"]["1/k2"]["l0"] <= 2 and r["layers"]["1/k8"]["l0"] <= 8 for r in log)
    assert TrainConfig.model_validate_json((run_dir / "train_config.json").read_text()).sweep == [{"k": 2}, {"k": 8}]


def test_sweep_variants_share_one_activation_stream(sweep_run):
    trainer, _, run_dir, harvests, yielded, seen = sweep_run
    steps = trainer.cfg.total_steps
    # one batch per step for all variants, and one forward pass per block (= one batch here),
    # plus at most one look-ahead block: the model is not run once per variant
    assert len(yielded) == steps
    assert harvests and all(h == [1] for h in harvests)
    assert steps <= len(harvests) <= steps + 1
    assert len(seen) == 2 * steps
    for s in range(steps):
        (s1, n1, x1, y1), (s2, n2, x2, y2) = seen[2 * s], seen[2 * s + 1]
        assert (s1, s2, n1, n2) == (s, s, "1/k2", "1/k8")
        assert x1 is x2 and y1 is y2 and x1 is yielded[s][1][0]
    a, b = (load_file(run_dir / "layers.1.mlp" / v / "stats.safetensors") for v in ("k2", "k8"))
    assert torch.equal(a["mlp_in_mean"], b["mlp_in_mean"]) and torch.equal(a["mlp_out_mean"], b["mlp_out_mean"])


def test_evaluate_run_reports_every_sweep_variant(sweep_run, tiny_llama, llama_adapter):
    _, _, run_dir, _, _, _ = sweep_run
    loaded = LoadedModel("tiny-llama", tiny_llama, None, llama_adapter)
    eval_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    metrics = evaluate_run(run_dir, loaded=loaded, eval_split=eval_ids, progress=False)
    assert set(metrics["layers"]) == {"1/k2", "1/k8"}
    assert metrics["layers"]["1/k2"]["l0"] <= 2 < metrics["layers"]["1/k8"]["l0"] <= 8
    assert metrics["layers"]["1/k2"]["ce_zero_ablation"] == metrics["layers"]["1/k8"]["ce_zero_ablation"]
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert set(saved["layers"]) == {"1/k2", "1/k8"}


def test_sweep_variant_with_unknown_key_names_the_allowed_keys():
    with pytest.raises(ValidationError) as info:
        make_cfg(sweep=[{"k": 2}, {"seed": 3}])
    message = str(info.value)
    assert "seed" in message
    for key in SWEEPABLE:
        assert key in message, key


@pytest.mark.parametrize("sweep", [
    [{"k": 2}, {"k": 2}],
    [{"k": 2, "lr": 0.1}, {"lr": 0.1, "k": 2}],
])
def test_duplicate_sweep_variants_raise(tmp_path, llama_adapter, train_tokens, sweep):
    with pytest.raises(ValueError, match="differ"):
        cfg = make_cfg(sweep=sweep)
        cfg.variants()
    with pytest.raises(ValueError):
        Trainer(TrainConfig.model_construct(**{**make_cfg().__dict__, "sweep": sweep}), llama_adapter, train_tokens, tmp_path)


def test_sweep_variant_suffixes():
    cfg = make_cfg(sweep=[{"k": 16, "lr": 0.5}, {"activation": "relu"}, {"l1_coefficient": 0.25}])
    assert [s for s, _ in cfg.variants()] == ["k16_lr0.5", "activation-relu", "l1_coefficient0.25"]
    assert [(v.k, v.lr, v.activation) for _, v in cfg.variants()] == [(16, 0.5, "topk"), (4, 1e-2, "relu"), (4, 1e-2, "topk")]
    assert make_cfg().variants() == [("", make_cfg())]


def test_sweep_variant_that_breaks_validation_raises(tmp_path, llama_adapter, train_tokens):
    with pytest.raises(ValidationError, match="k=100"):
        make_cfg(sweep=[{"k": 100}]).variants()


def test_one_variant_sweep_gives_bitwise_the_same_coder_as_no_sweep(tmp_path, llama_adapter, train_tokens):
    plain = Trainer(make_cfg(k=2), llama_adapter, train_tokens, tmp_path / "plain")
    plain.fit(progress=False)
    swept = Trainer(make_cfg(sweep=[{"k": 2}]), llama_adapter, train_tokens, tmp_path / "swept")
    swept.fit(progress=False)
    assert list(swept.states) == [CoderKey(1, "k2")]
    a, b = plain.states[CoderKey(1)], swept.states[CoderKey(1, "k2")]
    for (name, p), (_, q) in zip(a.coder.named_parameters(), b.coder.named_parameters()):
        assert torch.equal(p, q), name
    for name in ("coder.safetensors", "stats.safetensors", "cfg.json"):
        assert ((tmp_path / "plain" / "layers.1.mlp" / name).read_bytes()
                == (tmp_path / "swept" / "layers.1.mlp" / "k2" / name).read_bytes()), name


def test_sweep_resume_is_exact(tmp_path, llama_adapter, train_tokens):
    import os
    import signal

    from transcoders.training.trainer import TrainingInterrupted

    cfg = make_cfg(sweep=[{"k": 2}, {"activation": "relu", "l1_coefficient": 0.1}], total_tokens=BATCH * 8)
    Trainer(cfg, llama_adapter, train_tokens, tmp_path / "a").fit(progress=False)

    def stop(trainer, metrics):
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        Trainer(cfg, llama_adapter, train_tokens, tmp_path / "b").fit(progress=False, on_step=stop)
    Trainer(cfg, llama_adapter, train_tokens, tmp_path / "b").fit(progress=False, resume=True)
    for variant in ("k2", "activation-relu_l1_coefficient0.1"):
        for name in ("coder.safetensors", "stats.safetensors"):
            assert same_tensors(tmp_path / "a" / "layers.1.mlp" / variant / name,
                                tmp_path / "b" / "layers.1.mlp" / variant / name), (variant, name)


# ---------------------------------------------------------------- activation cache: reading back


STEPS_CACHED = 5


@pytest.fixture(scope="module")
def cache32(tmp_path_factory, llama_adapter, train_tokens, single_thread):
    """A float32 cache of layers 0 and 2, built from a stream with 48-token blocks (not aligned
    with the 64-token batches), plus the live batches it should hold."""
    folder = tmp_path_factory.mktemp("c32") / "cache"
    stream = _stream(llama_adapter, train_tokens, layers=(2, 0), block_contexts=3)
    out = build_cache(stream, folder, BATCH * STEPS_CACHED + 10, dtype="float32", progress=False)
    assert out == folder
    live = stream.batches(0)
    return folder, stream, [next(live) for _ in range(STEPS_CACHED)]


def test_float32_cache_batches_equal_live_batches_exactly(cache32):
    folder, stream, _ = cache32
    cached = CachedStream(folder, BATCH)
    assert cached.layers == [0, 2]
    for start in (0, 1, 3):
        c, live = cached.batches(start), stream.batches(start)
        for _ in range(STEPS_CACHED - start):
            a, b = next(c), next(live)
            assert _same_batch(a, b)
            assert a[0][0].dtype == torch.float32 and a[0][0].shape == (BATCH, D_MODEL)


def test_cache_meta_describes_the_cache(cache32):
    folder, stream, _ = cache32
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["n_tokens"] == BATCH * STEPS_CACHED  # rounded down to whole batches
    assert meta["layers"] == [0, 2] and meta["dtype"] == "float32" and meta["d_model"] == D_MODEL
    assert (meta["batch_size"], meta["seed"], meta["block_contexts"]) == (BATCH, 0, 3)
    for layer in (0, 2):
        for which in ("in", "out"):
            assert (folder / f"layer_{layer}.{which}.bin").stat().st_size == BATCH * STEPS_CACHED * D_MODEL * 4
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["meta.json"] + [f"layer_{layer}.{w}.bin" for layer in (0, 2) for w in ("in", "out")])


def test_cache_wraps_around_after_n_tokens(cache32):
    folder, _, live = cache32
    table = {layer: tuple(torch.cat([b[layer][i] for b in live]) for i in (0, 1)) for layer in (0, 2)}
    n = BATCH * STEPS_CACHED
    cached = CachedStream(folder, BATCH)
    it = cached.batches(STEPS_CACHED - 1)
    assert _same_batch(next(it), live[-1])
    assert _same_batch(next(it), live[0])  # step 5 = step 0
    assert _same_batch(next(it), live[1])
    assert _same_batch(next(CachedStream(folder, BATCH).batches(3 * STEPS_CACHED + 2)), live[2])
    # a batch size that does not divide n_tokens: a batch straddles the end of the cache
    odd = CachedStream(folder, 48, layers=[2])
    assert odd.layers == [2]
    for step in (0, 6, 7, 13):
        idx = (torch.arange(48) + step * 48) % n
        batch = next(odd.batches(step))
        assert list(batch) == [2]
        assert torch.equal(batch[2][0], table[2][0][idx]) and torch.equal(batch[2][1], table[2][1][idx]), step
    assert ((torch.arange(48) + 6 * 48) % n)[0] == 288 and ((torch.arange(48) + 6 * 48) % n)[-1] == 15


def test_cache_batches_are_copies_not_views_of_the_file(cache32):
    folder, _, live = cache32
    batch = next(CachedStream(folder, BATCH).batches(0))
    batch[0][0].zero_()
    assert _same_batch(next(CachedStream(folder, BATCH).batches(0)), live[0])


def test_bfloat16_cache_equals_live_batches_cast_to_bfloat16(tmp_path, llama_adapter, train_tokens):
    stream = _stream(llama_adapter, train_tokens)
    folder = build_cache(stream, tmp_path / "bf16", BATCH * 3, progress=False)  # default dtype
    assert json.loads((folder / "meta.json").read_text())["dtype"] == "bfloat16"
    assert (folder / "layer_1.in.bin").stat().st_size == BATCH * 3 * D_MODEL * 2
    cached, live = CachedStream(folder, BATCH).batches(0), stream.batches(0)
    for _ in range(3):
        a, b = next(cached), next(live)
        assert a[1][0].dtype == torch.bfloat16
        assert torch.equal(a[1][0], b[1][0].to(torch.bfloat16)) and torch.equal(a[1][1], b[1][1].to(torch.bfloat16))


# ---------------------------------------------------------------- activation cache: atomic build and errors


class _FailingStream(ActivationStream):
    """A stream whose batch of step 3 raises."""

    def batches(self, start_step: int = 0):
        for step, batch in enumerate(super().batches(start_step), start_step):
            if step == 3:
                raise RuntimeError("harvest failed at step 3")
            yield batch


def test_failed_cache_build_leaves_no_folder_and_no_temporary_files(tmp_path, llama_adapter, train_tokens):
    parent = tmp_path / "caches"
    parent.mkdir()
    stream = _FailingStream(llama_adapter, train_tokens, [1], BATCH, block_contexts=4, model_batch=4)
    with pytest.raises(RuntimeError, match="step 3"):
        build_cache(stream, parent / "cache", BATCH * 6, dtype="float32", progress=False)
    assert list(parent.iterdir()) == []


def test_rebuild_over_a_complete_cache_is_refused_and_a_failed_build_leaves_nothing(tmp_path, llama_adapter, train_tokens):
    good = build_cache(_stream(llama_adapter, train_tokens), tmp_path / "cache", BATCH * 2, dtype="float32", progress=False)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    with pytest.raises(ActivationCacheError, match="already exists"):
        build_cache(_stream(llama_adapter, train_tokens), good, BATCH * 2, dtype="float32", progress=False)
    stream = _FailingStream(llama_adapter, train_tokens, [1], BATCH, block_contexts=4, model_batch=4)
    with pytest.raises(RuntimeError):
        build_cache(stream, tmp_path / "new", BATCH * 6, dtype="float32", progress=False)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_build_cache_rejects_bad_dtype_and_too_few_tokens(tmp_path, llama_adapter, train_tokens):
    stream = _stream(llama_adapter, train_tokens)
    with pytest.raises(ValueError, match="float16"):
        build_cache(stream, tmp_path / "a", BATCH * 2, dtype="float16", progress=False)
    with pytest.raises(ValueError, match="one batch"):
        build_cache(stream, tmp_path / "b", BATCH - 1, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def small_cache(tmp_path, llama_adapter, train_tokens):
    return build_cache(_stream(llama_adapter, train_tokens, layers=(0, 1)), tmp_path / "cache", BATCH * 2,
                       dtype="float32", progress=False)


def test_cache_without_meta_json_raises(small_cache):
    (small_cache / "meta.json").unlink()
    with pytest.raises(ActivationCacheError, match="meta.json"):
        CachedStream(small_cache, BATCH)
    with pytest.raises(ActivationCacheError, match="meta.json"):
        CachedStream(small_cache.parent / "nowhere", BATCH)


@pytest.mark.parametrize("damage", ["truncate", "delete", "grow"])
def test_cache_file_of_wrong_size_raises_naming_the_file(small_cache, damage):
    path = small_cache / "layer_1.out.bin"
    if damage == "delete":
        path.unlink()
    else:
        data = path.read_bytes()
        path.write_bytes(data[:-4] if damage == "truncate" else data + b"\0" * 4)
    with pytest.raises(ActivationCacheError, match="wrong size") as info:
        CachedStream(small_cache, BATCH)
    assert "layer_1.out.bin" in str(info.value)
    CachedStream(small_cache, BATCH, layers=[0])  # the intact layer still opens


def test_cache_unknown_layer_raises(small_cache):
    with pytest.raises(ActivationCacheError, match=r"\[2\]") as info:
        CachedStream(small_cache, BATCH, layers=[1, 2])
    assert "[0, 1]" in str(info.value)


# ---------------------------------------------------------------- training from the cache


def test_trainer_on_float32_cache_is_bitwise_identical_to_live_training(tmp_path, llama_adapter, train_tokens):
    cfg = make_cfg(layers=[0, 1], total_tokens=BATCH * 8, dead_tokens=BATCH)
    live = Trainer(cfg, llama_adapter, train_tokens, tmp_path / "live")
    live.fit(progress=False)
    folder = build_cache(_stream(llama_adapter, train_tokens, layers=(0, 1), skip_first=cfg.skip_first_tokens),
                         tmp_path / "cache", cfg.total_tokens, dtype="float32", progress=False)
    cached = Trainer(cfg, llama_adapter, None, tmp_path / "cached", stream=CachedStream(folder, BATCH, [0, 1]))
    cached.fit(progress=False)
    for layer in (0, 1):
        for name in ("coder.safetensors", "stats.safetensors"):
            assert same_tensors(tmp_path / "live" / f"layers.{layer}.mlp" / name,
                                tmp_path / "cached" / f"layers.{layer}.mlp" / name), (layer, name)


WORDS = ("the state of union is strong citizens senate house representatives nation people congress "
         "law year work peace war trade country government public new great must have will our "
         "quick brown fox jumps over lazy dog america world freedom budget tax jobs").split()


def _write_corpus(path, n_docs: int = 12, seed: int = 0):
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "." for _ in range(8)]
        docs.append(json.dumps({"text": " ".join(sentences)}))
    path.write_text("\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A tiny Llama (with the tiny tokenizer) saved to a folder, and a .jsonl corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("model")
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=len(tok), max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "tiny-llama")
    tok.save_pretrained(root / "tiny-llama")
    return {"model": root / "tiny-llama", "train": _write_corpus(root / "train.jsonl")}


@pytest.fixture(scope="module")
def loaded(model_files):
    return load_model(str(model_files["model"]))


def _run_cfg(model_files, **kw) -> TrainConfig:
    return make_cfg(model=str(model_files["model"]), data=str(model_files["train"]), **kw)


def test_train_run_from_float32_cache_matches_live_run_and_reuses_the_cache(tmp_path, model_files, loaded):
    live_cfg = _run_cfg(model_files)
    train_run(live_cfg, tmp_path / "live", progress=False, loaded=loaded, evaluate=False)
    folder = tmp_path / "acts"
    cache_cfg = _run_cfg(model_files, activation_cache=str(folder), cache_dtype="float32")
    result = train_run(cache_cfg, tmp_path / "cached", progress=False, loaded=loaded, evaluate=False)
    assert (folder / "meta.json").is_file()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["dtype"] == "float32" and meta["n_tokens"] == live_cfg.total_tokens and meta["layers"] == [1]
    assert meta["ctx_len"] == 16 and meta["model"] == str(model_files["model"])
    assert result["timing"]["cache_build_s"] > 0
    for name in ("coder.safetensors", "stats.safetensors"):
        assert same_tensors(tmp_path / "live" / "layers.1.mlp" / name, tmp_path / "cached" / "layers.1.mlp" / name)

    # a second run with the same settings reads the cache as it is
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    train_run(cache_cfg, tmp_path / "again", progress=False, loaded=loaded, evaluate=False)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert same_tensors(tmp_path / "again" / "layers.1.mlp" / "coder.safetensors",
                        tmp_path / "live" / "layers.1.mlp" / "coder.safetensors")

    # a sweep from the cache: every variant sees the cached data
    sweep_cfg = _run_cfg(model_files, activation_cache=str(folder), cache_dtype="float32", sweep=[{"k": 4}, {"k": 2}])
    train_run(sweep_cfg, tmp_path / "sweep", progress=False, loaded=loaded, evaluate=False)
    assert same_tensors(tmp_path / "sweep" / "layers.1.mlp" / "k4" / "coder.safetensors",
                        tmp_path / "live" / "layers.1.mlp" / "coder.safetensors")


@pytest.mark.parametrize("change", [
    {"ctx_len": 8},
    {"model": "another-model"},
    {"eval_fraction": 0.2},
    {"harvest_dtype": "bfloat16"},
    {"layers": [0, 1]},
])
def test_cache_built_for_other_settings_is_refused(tmp_path, model_files, loaded, train_tokens, change):
    folder = tmp_path / "acts"
    cfg = _run_cfg(model_files, activation_cache=str(folder), cache_dtype="float32", total_tokens=BATCH * 2)
    open_cache(cfg, loaded.adapter, train_tokens, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    other = cfg.model_copy(update=change)
    with pytest.raises(ActivationCacheError, match="other settings|not") as info:
        open_cache(other, loaded.adapter, train_tokens, progress=False)
    assert str(folder) in str(info.value)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes  # not rebuilt


def test_train_run_refuses_a_cache_of_another_context_length(tmp_path, model_files, loaded):
    folder = tmp_path / "acts"
    train_run(_run_cfg(model_files, activation_cache=str(folder), total_tokens=BATCH * 2), tmp_path / "a",
              progress=False, loaded=loaded, evaluate=False)
    with pytest.raises(ActivationCacheError, match="ctx_len"):
        train_run(_run_cfg(model_files, activation_cache=str(folder), total_tokens=BATCH * 2, ctx_len=8), tmp_path / "b",
                  progress=False, loaded=loaded, evaluate=False)
    assert not (tmp_path / "b" / "layers.1.mlp").exists()


def test_cache_of_other_dtype_is_not_silently_reused(tmp_path, model_files, loaded, train_tokens):
    folder = tmp_path / "acts"
    cfg = _run_cfg(model_files, activation_cache=str(folder), cache_dtype="bfloat16", total_tokens=BATCH * 2)
    open_cache(cfg, loaded.adapter, train_tokens, progress=False)
    try:
        cached = open_cache(cfg.model_copy(update={"cache_dtype": "float32"}), loaded.adapter, train_tokens, progress=False)
    except ActivationCacheError:
        return  # refusing is fine
    assert cached.meta["dtype"] == "float32"  # so is rebuilding


# ---------------------------------------------------------------- CLI


FAST = ["--total-tokens", "384", "--batch-size", "64", "--ctx-len", "16", "--d-sae", "64", "-k", "4",
        "--precision", "fp32", "--harvest-dtype", "float32", "--layers", "1", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _train(model_files, run_dir, *extra):
    return invoke("train", "--model", model_files["model"], "--data", model_files["train"], "--run-dir", run_dir, *FAST, *extra)


def test_cli_sweep_trains_and_evaluates_every_variant(tmp_path, model_files):
    run = tmp_path / "run"
    result = _train(model_files, run, "--sweep", '[{"k": 2}, {"k": 4}]', "--eval-tokens", "64")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["layers"]) == {"1/k2", "1/k4"}
    assert "layer 1/k2:" in result.stdout and "layer 1/k4:" in result.stdout
    assert load_coder(run / "layers.1.mlp" / "k2").cfg.k == 2 and load_coder(run / "layers.1.mlp" / "k4").cfg.k == 4
    out = invoke("evaluate", run, "--eval-tokens", "32", "--quiet")
    assert out.exit_code == 0, out.output
    assert set(json.loads(out.stdout.rpartition("report:")[0])["layers"]) == {"1/k2", "1/k4"}


@pytest.mark.parametrize("sweep,needles", [
    ("not json", ["--sweep"]),
    ('[{"seed": 3}]', ["seed", "only"]),
    ('[{"k": 2}, {"k": 2}]', ["differ"]),
])
def test_cli_bad_sweep_is_an_error_with_exit_code_2(tmp_path, model_files, sweep, needles):
    result = _train(model_files, tmp_path / "run", "--sweep", sweep, "--eval-tokens", "0")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert not (tmp_path / "run" / "layers.1.mlp").exists()


def test_cli_activation_cache_is_built_once_and_reused(tmp_path, model_files):
    cache = tmp_path / "acts"
    first = _train(model_files, tmp_path / "a", "--activation-cache", cache, "--eval-tokens", "0")
    assert first.exit_code == 0, first.output
    assert (cache / "meta.json").is_file() and (cache / "layer_1.in.bin").is_file()
    assert json.loads((cache / "meta.json").read_text())["dtype"] == "bfloat16"
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    second = _train(model_files, tmp_path / "b", "--activation-cache", cache, "--eval-tokens", "0")
    assert second.exit_code == 0, second.output
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    assert same_tensors(
        tmp_path / "a" / "layers.1.mlp" / "coder.safetensors", tmp_path / "b" / "layers.1.mlp" / "coder.safetensors"
    )
    # other settings: a one-line error, exit code 2
    third = _train(model_files, tmp_path / "c", "--activation-cache", cache, "--eval-tokens", "0", "--ctx-len", "8")
    assert third.exit_code == 2, third.output
    assert "error:" in third.stderr and "ctx_len" in third.stderr
