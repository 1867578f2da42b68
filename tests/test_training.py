"""Tests for transcoders.training: the Trainer on tiny random models (loss goes down, folded
coders are saved, exact resume after a signal, divergence handling, checkpoint errors, the LR
schedule and dead-feature bookkeeping)."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from conftest import D_MODEL, N_LAYERS, tiny_adapter
from conftest import read_log as _log
from safetensors.torch import load_file

import transcoders.training.losses as losses_mod
import transcoders.training.trainer as trainer_mod
from transcoders.coders.io import load_coder
from transcoders.coders.run_folder import CoderKey
from transcoders.data.activations import harvest
from transcoders.evaluation.run import training_dead
from transcoders.training.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint
from transcoders.training.config import TrainConfig
from transcoders.training.trainer import Trainer, TrainingDiverged, TrainingInterrupted

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH = 64
STEPS = 30
BASE = dict(
    model="tiny-llama", layers=[1], batch_size=BATCH, total_tokens=BATCH * STEPS, ctx_len=16, block_contexts=4,
    model_batch=4, d_sae=64, k=4, warmup_steps=2, checkpoint_every=5, precision="fp32",
    harvest_dtype="float32", device="cpu", lr=1e-2, l1_coefficient=0.1,
)


def make_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**BASE, **kw})


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSCODERS_CACHE", str(tmp_path / "cache"))




def _harvested(adapter, tokens, layer):
    x, y = harvest(adapter, tokens[:4], [layer])[layer]
    return x.flatten(0, 1).float(), y.flatten(0, 1).float()


# ---------------------------------------------------------------- training works


@pytest.mark.parametrize("activation", ["topk", "relu"])
@pytest.mark.parametrize("kind", ["transcoder", "skip_transcoder", "sae"])
def test_training_reduces_fvu_and_saves_loadable_coder_with_its_config(tmp_path, llama_adapter, train_tokens, kind, activation):
    cfg = make_cfg(kind=kind, activation=activation, log_every=1)
    trainer = Trainer(cfg, llama_adapter, train_tokens, tmp_path)
    coders = trainer.fit(progress=False)

    log = _log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in log] == [BATCH * s for s in range(1, STEPS + 1)]
    first, last = log[0]["layers"]["1"], log[-1]["layers"]["1"]
    assert set(first) >= {"loss", "fvu", "l0", "dead_fraction"}
    assert all(math.isfinite(r["layers"]["1"]["loss"]) for r in log)
    assert last["fvu"] < 0.9 * first["fvu"], (first, last)
    if activation == "topk":
        assert all(r["layers"]["1"]["l0"] <= cfg.k for r in log)

    folder = tmp_path / "layers.1.mlp"
    coder = load_coder(folder)
    c = coder.cfg
    assert (c.layer, c.d_in, c.d_out, c.d_sae, c.kind, c.activation, c.model_name) == (
        1, D_MODEL, D_MODEL, 64, kind, activation, "tiny-llama")
    assert c.k == (4 if activation == "topk" else None)
    assert c.hookpoint_in == "layers.1.mlp.input"
    assert TrainConfig.model_validate(c.training) == cfg
    for (name, p), (_, q) in zip(coder.named_parameters(), coders[CoderKey(1)].named_parameters()):
        assert torch.equal(p, q), name

    stats = load_file(folder / "stats.safetensors")
    assert int(stats["tokens"]) == BATCH * STEPS
    assert stats["mlp_in_mean"].shape == stats["mlp_out_mean"].shape == (D_MODEL,)
    assert stats["fire_count"].shape == (64,) and int(stats["fire_count"].sum()) > 0
    assert (tmp_path / CHECKPOINT).is_file()
    assert TrainConfig.model_validate_json((tmp_path / "train_config.json").read_text()) == cfg


@pytest.mark.parametrize("activation", ["topk", "relu"])
@pytest.mark.parametrize("kind", ["transcoder", "skip_transcoder"])
def test_saved_coder_on_raw_activations_equals_trained_coder_in_normalised_space(
        tmp_path, llama_adapter, train_tokens, kind, activation):
    trainer = Trainer(make_cfg(kind=kind, activation=activation, total_tokens=BATCH * 8), llama_adapter, train_tokens, tmp_path)
    trainer.fit(progress=False)
    st = trainer.states[CoderKey(1)]
    saved = load_coder(tmp_path / "layers.1.mlp")
    x, _ = _harvested(llama_adapter, train_tokens, 1)
    with torch.no_grad():
        expected = st.coder(x * st.scale_in) / st.scale_out
        torch.testing.assert_close(saved(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        torch.testing.assert_close(saved.encode(x), st.coder.encode(x * st.scale_in), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_saved_sae_reconstructs_raw_mlp_input_in_raw_units(tmp_path, llama_adapter, train_tokens, activation):
    trainer = Trainer(make_cfg(kind="sae", activation=activation, total_tokens=BATCH * 8), llama_adapter, train_tokens, tmp_path)
    trainer.fit(progress=False)
    st = trainer.states[CoderKey(1)]
    saved = load_coder(tmp_path / "layers.1.mlp")
    x, _ = _harvested(llama_adapter, train_tokens, 1)
    with torch.no_grad():
        # the trained SAE maps x*s_in to (approximately) x*s_in; in raw units that is x_hat / s_in
        expected = st.coder(x * st.scale_in) / st.scale_in
        torch.testing.assert_close(saved(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_multiple_layers_train_from_one_activation_stream(tmp_path, llama_adapter, train_tokens, monkeypatch):
    import transcoders.data.activations as acts

    calls = []
    real_harvest = acts.harvest

    def counting(adapter, ids, layers):
        calls.append(sorted(layers))
        return real_harvest(adapter, ids, layers)

    monkeypatch.setattr(acts, "harvest", counting)
    steps = 6
    trainer = Trainer(make_cfg(layers=[2, 0], total_tokens=BATCH * steps, log_every=1), llama_adapter, train_tokens, tmp_path)
    sums = {0: torch.zeros(D_MODEL, dtype=torch.float64), 2: torch.zeros(D_MODEL, dtype=torch.float64)}
    real_batches = trainer.stream.batches

    def recording(start=0):
        for batch in real_batches(start):
            for layer in sums:
                sums[layer] += batch[layer][0].double().sum(0)
            yield batch

    trainer.stream.batches = recording
    coders = trainer.fit(progress=False)

    assert trainer.layers == [0, 2] and sorted(coders) == [CoderKey(0), CoderKey(2)]
    # every forward pass harvested both layers together; one pass per block of 4 contexts
    # (batch == block here), plus at most one look-ahead block
    assert calls and all(c == [0, 2] for c in calls)
    assert steps <= len(calls) <= steps + 1
    for layer in (0, 2):
        folder = tmp_path / f"layers.{layer}.mlp"
        coder = load_coder(folder)
        assert coder.cfg.layer == layer and coder.cfg.hookpoint_in == f"layers.{layer}.mlp.input"
        stats = load_file(folder / "stats.safetensors")
        torch.testing.assert_close(stats["mlp_in_mean"], (sums[layer] / (BATCH * steps)).float())
    assert not torch.equal(coders[CoderKey(0)].W_enc, coders[CoderKey(2)].W_enc)
    assert all(set(r["layers"]) == {"0", "2"} for r in _log(tmp_path))


def test_training_smoke_on_every_model_family(tmp_path, tiny_model, train_tokens):
    adapter = tiny_adapter(tiny_model)
    trainer = Trainer(make_cfg(total_tokens=BATCH * 6, log_every=1), adapter, train_tokens, tmp_path)
    trainer.fit(progress=False)
    assert all(math.isfinite(r["layers"]["1"]["fvu"]) for r in _log(tmp_path))
    coder = load_coder(tmp_path / "layers.1.mlp")
    assert coder.cfg.layer == 1 and coder.cfg.d_in == D_MODEL
    x, _ = _harvested(adapter, train_tokens, 1)
    with torch.no_grad():
        out = coder(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_training_all_layers(tmp_path, llama_adapter, train_tokens):
    trainer = Trainer(make_cfg(layers="all", total_tokens=BATCH * 2), llama_adapter, train_tokens, tmp_path)
    assert trainer.layers == list(range(N_LAYERS))
    trainer.fit(progress=False)
    assert all((tmp_path / f"layers.{i}.mlp" / "coder.safetensors").is_file() for i in range(N_LAYERS))


# ---------------------------------------------------------------- exact resume


def _interrupt_at(step: int, signum=signal.SIGTERM):
    def on_step(trainer, metrics):
        if trainer.step == step:
            os.kill(os.getpid(), signum)

    return on_step


def _assert_same_state(a: Trainer, b: Trainer) -> None:
    assert a.step == b.step
    for layer in a.layers:
        sa, sb = a.states[CoderKey(layer)], b.states[CoderKey(layer)]
        for (name, p), (_, q) in zip(sa.coder.named_parameters(), sb.coder.named_parameters()):
            assert torch.equal(p, q), f"layer {layer} {name}"
        oa, ob = sa.optimizer.state_dict(), sb.optimizer.state_dict()
        assert oa["state"].keys() == ob["state"].keys()
        for idx in oa["state"]:
            assert oa["state"][idx].keys() == ob["state"][idx].keys()
            for key in oa["state"][idx]:
                assert torch.equal(oa["state"][idx][key], ob["state"][idx][key]), f"layer {layer} adam {idx}.{key}"
        assert oa["param_groups"][0]["lr"] == ob["param_groups"][0]["lr"]
        for attr in ("tokens_since_fired", "fire_count", "in_sum", "out_sum"):
            assert torch.equal(getattr(sa, attr), getattr(sb, attr)), attr
        assert (sa.scale_in, sa.scale_out) == (sb.scale_in, sb.scale_out)


RESUME_CASES = {
    "topk-auxk": dict(activation="topk", dead_tokens=BATCH),  # AuxK active, dead counters matter
    "relu": dict(activation="relu"),  # L1 warm-up depends on the step
    "topk-unaligned-blocks": dict(activation="topk", block_contexts=3, kind="skip_transcoder"),  # 48-token blocks
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_after_sigterm_is_bitwise_identical_to_uninterrupted_run(tmp_path, llama_adapter, train_tokens, case):
    cfg = make_cfg(total_tokens=BATCH * 12, layers=[0, 2], **RESUME_CASES[case])
    a = Trainer(cfg, llama_adapter, train_tokens, tmp_path / "a")
    a.fit(progress=False)

    run_b = tmp_path / "b"
    b1 = Trainer(cfg, llama_adapter, train_tokens, run_b)
    with pytest.raises(TrainingInterrupted, match="--resume") as info:
        b1.fit(progress=False, on_step=_interrupt_at(7))
    assert "SIGTERM" in str(info.value)
    _, state = load_checkpoint(run_b)
    assert state["step"] == 7
    assert not (run_b / "layers.0.mlp").exists()

    b2 = Trainer(cfg, llama_adapter, train_tokens, run_b)
    b2.fit(progress=False, resume=True)
    _assert_same_state(a, b2)
    for layer in (0, 2):
        for name in ("coder.safetensors", "stats.safetensors"):
            folder = f"layers.{layer}.mlp"
            assert (tmp_path / "a" / folder / name).read_bytes() == (run_b / folder / name).read_bytes()
    # the log has every step exactly once
    assert [r["step"] for r in _log(run_b)] == [r["step"] for r in _log(tmp_path / "a")]


def test_resume_across_two_interruptions_matches_uninterrupted_run(tmp_path, llama_adapter, train_tokens):
    cfg = make_cfg(total_tokens=BATCH * 12, dead_tokens=BATCH)
    a = Trainer(cfg, llama_adapter, train_tokens, tmp_path / "a")
    a.fit(progress=False)

    run_b = tmp_path / "b"
    with pytest.raises(TrainingInterrupted):  # before the first periodic checkpoint
        Trainer(cfg, llama_adapter, train_tokens, run_b).fit(progress=False, on_step=_interrupt_at(3, signal.SIGINT))
    assert load_checkpoint(run_b)[1]["step"] == 3
    with pytest.raises(TrainingInterrupted, match="--resume"):
        Trainer(cfg, llama_adapter, train_tokens, run_b).fit(progress=False, resume=True, on_step=_interrupt_at(8))
    assert load_checkpoint(run_b)[1]["step"] == 8
    b = Trainer(cfg, llama_adapter, train_tokens, run_b)
    b.fit(progress=False, resume=True)
    _assert_same_state(a, b)


def test_fit_restores_previous_signal_handlers(tmp_path, llama_adapter, train_tokens):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(TrainingInterrupted):
        Trainer(make_cfg(total_tokens=BATCH * 4), llama_adapter, train_tokens, tmp_path).fit(
            progress=False, on_step=_interrupt_at(2, signal.SIGINT))
    assert {s: signal.getsignal(s) for s in before} == before
    Trainer(make_cfg(total_tokens=BATCH * 2), llama_adapter, train_tokens, tmp_path / "x").fit(progress=False)
    assert {s: signal.getsignal(s) for s in before} == before


# ---------------------------------------------------------------- divergence


def _poison(trainer: Trainer, bad_step: int, value: float, where: int = 0):
    """Make the batch of step ``bad_step`` (0-based) hold ``value`` in the MLP input (where=0) or output (1)."""
    real = trainer.stream.batches

    def batches(start=0):
        for step, batch in enumerate(real(start), start):
            if step == bad_step:
                batch = {layer: tuple(t.clone() for t in xy) for layer, xy in batch.items()}
                for xy in batch.values():
                    xy[where][3, 5] = value
            yield batch

    trainer.stream.batches = batches


def _record_checkpoints(trainer: Trainer) -> list[tuple[int, bytes]]:
    written = []
    real = trainer.checkpoint

    def checkpoint():
        path = real()
        written.append((trainer.step, path.read_bytes()))
        return path

    trainer.checkpoint = checkpoint
    return written


@pytest.mark.parametrize("value,where", [(float("nan"), 0), (float("inf"), 0), (float("nan"), 1)])
def test_nan_batch_raises_diverged_and_keeps_last_checkpoint_byte_identical(tmp_path, llama_adapter, train_tokens, value, where):
    trainer = Trainer(make_cfg(total_tokens=BATCH * 12), llama_adapter, train_tokens, tmp_path)
    _poison(trainer, 7, value, where)
    written = _record_checkpoints(trainer)
    with pytest.raises(TrainingDiverged, match="still holds the last good state") as info:
        trainer.fit(progress=False)
    assert "step 7" in str(info.value) and CHECKPOINT in str(info.value)
    assert [s for s, _ in written] == [5]
    assert (tmp_path / CHECKPOINT).read_bytes() == written[-1][1]
    assert load_checkpoint(tmp_path)[1]["step"] == 5
    assert not (tmp_path / "layers.1.mlp").exists()
    # and the kept checkpoint resumes
    resumed = Trainer(make_cfg(total_tokens=BATCH * 12), llama_adapter, train_tokens, tmp_path)
    resumed.fit(progress=False, resume=True)
    assert resumed.step == 12


def test_divergence_before_any_checkpoint_does_not_claim_a_checkpoint(tmp_path, llama_adapter, train_tokens):
    trainer = Trainer(make_cfg(total_tokens=BATCH * 12), llama_adapter, train_tokens, tmp_path)
    _poison(trainer, 2, float("nan"))
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit(progress=False)
    assert not (tmp_path / CHECKPOINT).exists()
    assert "still holds the last good state" not in str(info.value)


# ---------------------------------------------------------------- checkpoint errors


def test_resume_with_different_settings_raises_checkpoint_error(tmp_path, llama_adapter, train_tokens):
    with pytest.raises(TrainingInterrupted):
        Trainer(make_cfg(total_tokens=BATCH * 8), llama_adapter, train_tokens, tmp_path).fit(
            progress=False, on_step=_interrupt_at(3))
    before = (tmp_path / CHECKPOINT).read_bytes()
    other = make_cfg(total_tokens=BATCH * 8, lr=3e-3)
    with pytest.raises(CheckpointError, match="different settings") as info:
        Trainer(other, llama_adapter, train_tokens, tmp_path).fit(progress=False, resume=True)
    assert "lr" in str(info.value)
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_resume_without_checkpoint_raises_checkpoint_error(tmp_path, llama_adapter, train_tokens):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(make_cfg(), llama_adapter, train_tokens, tmp_path / "empty").fit(progress=False, resume=True)


@pytest.mark.parametrize("keep", [0, 7, 0.5, -1])
def test_resume_from_truncated_checkpoint_raises_checkpoint_error(tmp_path, llama_adapter, train_tokens, keep):
    Trainer(make_cfg(total_tokens=BATCH * 2), llama_adapter, train_tokens, tmp_path).fit(progress=False)
    path = tmp_path / CHECKPOINT
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(make_cfg(total_tokens=BATCH * 2), llama_adapter, train_tokens, tmp_path).fit(progress=False, resume=True)


def test_checkpoint_metadata_without_state_raises_checkpoint_error(tmp_path, llama_adapter, train_tokens):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / CHECKPOINT), metadata={"other": "1"})
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(make_cfg(), llama_adapter, train_tokens, tmp_path).fit(progress=False, resume=True)


def test_checkpoint_without_any_metadata_raises_checkpoint_error(tmp_path, llama_adapter, train_tokens):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / CHECKPOINT))
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(make_cfg(), llama_adapter, train_tokens, tmp_path).fit(progress=False, resume=True)


# ---------------------------------------------------------------- LR schedule


def test_lr_schedule_warms_up_stays_constant_then_decays_to_zero(llama_adapter, train_tokens, tmp_path):
    cfg = make_cfg(warmup_steps=5, decay_fraction=0.2, total_tokens=BATCH * 50)
    trainer = Trainer(cfg, llama_adapter, train_tokens, tmp_path)
    lr = trainer.lr
    assert lr == cfg.lr
    lrs = [trainer.lr_at(s) for s in range(cfg.total_steps + 1)]
    warm, middle, decay = lrs[:5], lrs[5:40], lrs[40:]
    assert all(0 < a < b for a, b in zip(warm, warm[1:]))
    assert warm[-1] == pytest.approx(lr)
    assert all(v == pytest.approx(lr) for v in middle)
    assert all(a >= b for a, b in zip(decay, decay[1:])) and decay[-2] < decay[1]
    assert lrs[cfg.total_steps - 1] <= lr / 5 + 1e-12  # the last step is close to 0
    assert lrs[cfg.total_steps] == 0.0


def test_lr_without_warmup_starts_at_full_rate(llama_adapter, train_tokens, tmp_path):
    trainer = Trainer(make_cfg(warmup_steps=0), llama_adapter, train_tokens, tmp_path)
    assert trainer.lr_at(0) == pytest.approx(trainer.lr)


def test_optimizer_uses_and_log_reports_the_scheduled_lr(tmp_path, llama_adapter, train_tokens):
    trainer = Trainer(make_cfg(warmup_steps=3, total_tokens=BATCH * 10, log_every=1), llama_adapter, train_tokens, tmp_path)
    used = []
    trainer.fit(progress=False, on_step=lambda t, _m: used.append(t.states[CoderKey(1)].optimizer.param_groups[0]["lr"]))
    assert used == [trainer.lr_at(s) for s in range(10)]
    assert [r["lr"] for r in _log(tmp_path)] == pytest.approx(used)


def test_default_lr_is_used_when_lr_unset(llama_adapter, train_tokens, tmp_path):
    trainer = Trainer(make_cfg(lr=None), llama_adapter, train_tokens, tmp_path)
    assert trainer.lr == trainer_mod.default_lr(64) > 0


# ---------------------------------------------------------------- dead features


def test_dead_feature_counters_follow_the_topk_selection(tmp_path, llama_adapter, train_tokens, monkeypatch):
    """tokens_since_fired is 0 for features active in the step's batch and grows by batch_size
    otherwise; fire_count adds each feature's activations; the dead mask and k_aux given to the
    encoder follow ``dead_tokens``; features that can never fire stay dead."""
    calls = []
    real = losses_mod.sparse_topk_encode

    def recording(x, W_enc, b_enc, k, *, dead=None, k_aux=0, matmul_dtype=torch.float32, aux_rows=None):
        out = real(x, W_enc, b_enc, k, dead=dead, k_aux=k_aux, matmul_dtype=matmul_dtype, aux_rows=aux_rows)
        calls.append({"dead": None if dead is None else dead.clone(), "k_aux": k_aux,
                      "values": out[0].detach().clone(), "indices": out[1].clone()})
        return out

    monkeypatch.setattr(losses_mod, "sparse_topk_encode", recording)
    dead_tokens = 2 * BATCH
    steps = 10
    cfg = make_cfg(dead_tokens=dead_tokens, total_tokens=BATCH * steps, log_every=1)
    trainer = Trainer(cfg, llama_adapter, train_tokens, tmp_path)
    never = torch.arange(8)
    with torch.no_grad():
        trainer.states[CoderKey(1)].coder.b_enc[never] = -1e4  # these can never be in a token's top k
    snapshots = [(torch.zeros(64, dtype=torch.int64), torch.zeros(64, dtype=torch.int64))]
    reported = []
    trainer.fit(progress=False, on_step=lambda t, m: (
        snapshots.append((t.states[CoderKey(1)].tokens_since_fired.clone(), t.states[CoderKey(1)].fire_count.clone())),
        reported.append(m["1"]["dead_fraction"])))

    assert len(calls) == steps
    for s, call in enumerate(calls):
        (tsf_before, fc_before), (tsf, fc) = snapshots[s], snapshots[s + 1]
        active = call["indices"][call["values"] > 0]
        fired = torch.zeros(64, dtype=torch.bool)
        fired[active] = True
        assert (tsf[fired] == 0).all(), f"step {s}"
        assert torch.equal(tsf[~fired], tsf_before[~fired] + BATCH), f"step {s}"
        assert torch.equal(fc - fc_before, torch.bincount(active, minlength=64)), f"step {s}"
        dead = tsf_before >= dead_tokens
        assert reported[s] == pytest.approx(dead.float().mean().item())
        if dead.any():
            assert torch.equal(call["dead"], dead)
            assert call["k_aux"] == min(D_MODEL // 2, int(dead.sum()))
        else:
            assert call["dead"] is None and call["k_aux"] == 0
    st = trainer.states[CoderKey(1)]
    assert (st.fire_count[never] == 0).all()
    assert (st.tokens_since_fired[never] == BATCH * steps).all()
    assert all(r >= 8 / 64 for r in reported[dead_tokens // BATCH:])
    assert all(r == 0 for r in reported[: dead_tokens // BATCH])
    stats = load_file(tmp_path / "layers.1.mlp" / "stats.safetensors")
    assert torch.equal(stats["fire_count"], st.fire_count)
    assert int(st.fire_count.sum()) == sum(int((c["values"] > 0).sum()) for c in calls)
    # what evaluation reports: silent over the last dead_tokens training tokens, from the calls alone
    recent = torch.zeros(64, dtype=torch.bool)
    ever = torch.zeros(64, dtype=torch.bool)
    for s, call in enumerate(calls):
        active = call["indices"][call["values"] > 0]
        ever[active] = True
        if s >= steps - dead_tokens // BATCH:
            recent[active] = True
    got = training_dead(stats)
    assert got["dead_in_training"] == pytest.approx((~recent).double().mean().item())
    assert got["never_fired_in_training"] == pytest.approx((~ever).double().mean().item())
    assert got["dead_window"] == dead_tokens and got["trained_tokens"] == BATCH * steps
    assert got["dead_in_training"] >= 8 / 64


def test_dead_window_scales_with_the_run_length():
    """A tenth of the run, within [100k, 10M] tokens, unless dead_tokens is set."""
    assert make_cfg(total_tokens=1_228_800, dead_tokens=None).dead_window == 122_880
    assert make_cfg(total_tokens=409_600, dead_tokens=None).dead_window == 100_000
    assert make_cfg(total_tokens=10**9, dead_tokens=None).dead_window == 10_000_000
    assert make_cfg(total_tokens=10**9, dead_tokens=5).dead_window == 5


def test_relu_fire_counts_match_active_features(tmp_path, llama_adapter, train_tokens):
    cfg = make_cfg(activation="relu", total_tokens=BATCH * 4, log_every=1)
    trainer = Trainer(cfg, llama_adapter, train_tokens, tmp_path)
    trainer.fit(progress=False)
    st = trainer.states[CoderKey(1)]
    l0s = [r["layers"]["1"]["l0"] for r in _log(tmp_path)]
    assert int(st.fire_count.sum()) == round(sum(l0s) * BATCH)
    never_fired = st.fire_count == 0
    assert torch.equal(never_fired, st.tokens_since_fired == BATCH * 4)


# ---------------------------------------------------------------- misc


def test_bf16_precision_and_bfloat16_harvest_train(tmp_path, tiny_llama, train_tokens):
    from transcoders.models.loading import LoadedModel
    from transcoders.training.run import harvest_copy

    loaded = LoadedModel("tiny", tiny_llama, None, tiny_adapter(tiny_llama))
    adapter = harvest_copy(loaded, "bfloat16")
    assert adapter.dtype == torch.bfloat16 and tiny_llama.dtype == torch.float32
    cfg = make_cfg(precision="bf16", harvest_dtype="bfloat16", log_every=1)
    Trainer(cfg, adapter, train_tokens, tmp_path).fit(progress=False)
    log = _log(tmp_path)
    assert log[-1]["layers"]["1"]["fvu"] < 0.9 * log[0]["layers"]["1"]["fvu"]
    assert load_coder(tmp_path / "layers.1.mlp").W_enc.dtype == torch.float32


def test_fresh_run_in_used_folder_starts_a_new_log(tmp_path, llama_adapter, train_tokens):
    Trainer(make_cfg(total_tokens=BATCH * 4, log_every=1), llama_adapter, train_tokens, tmp_path).fit(progress=False)
    Trainer(make_cfg(total_tokens=BATCH * 3, log_every=1, seed=1), llama_adapter, train_tokens, tmp_path).fit(progress=False)
    assert [r["step"] for r in _log(tmp_path)] == [1, 2, 3]


def test_auxk_on_a_token_subset_is_the_dense_loss_of_those_tokens_scaled():
    """``auxk_tokens = m``: the AuxK term is (n / m) x the dense AuxK loss of the batch's first m
    tokens (top ``d_out / 2`` dead pre-activations, ReLU, decoded), over the batch's variance."""
    from transcoders.coders.coder import SparseCoder
    from transcoders.coders.config import CoderConfig
    from transcoders.training.losses import topk_loss

    torch.manual_seed(3)
    n, d, m_feat, m = 64, 8, 48, 16
    coder = SparseCoder(CoderConfig(d_in=d, d_out=d, d_sae=m_feat, k=3))
    with torch.no_grad():
        coder.W_enc.normal_(0, 0.5)
        coder.W_dec.normal_(0, 0.5)
        coder.b_enc.normal_(0, 0.5)
    x, y = torch.randn(n, d), torch.randn(n, d)
    dead = torch.rand(m_feat) < 0.5
    for tokens in (None, m):
        cfg = TrainConfig(auxk_coefficient=1.0, auxk_tokens=tokens, precision="fp32")
        r = topk_loss(cfg, coder, x, y, dead, 0)
        with torch.no_grad():
            pre = (x @ coder.W_enc.T + coder.b_enc).double()
            vals, idx = pre.topk(3, dim=1)
            y_hat = (vals.relu()[..., None] * coder.W_dec.double()[idx]).sum(1) + coder.b_dec.double()
            err = y.double() - y_hat
            total_var = (y.double() - y.double().mean(0)).pow(2).sum()
            rows = n if tokens is None else tokens
            k_aux = min(d // 2, int(dead.sum()))
            av, ai = pre[:rows].masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
            e_hat = (av.relu()[..., None] * coder.W_dec.double()[ai]).sum(1)
            aux = (err[:rows] - e_hat).pow(2).sum() * (n / rows) / total_var
        torch.testing.assert_close(float((r.loss - r.fvu).detach()), float(aux), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_k_schedule_decays_from_k_start_to_k(tmp_path, llama_adapter, train_tokens, monkeypatch, activation):
    """With ``k_start = 16`` and ``k = 4`` over 10 steps and an anneal fraction of 0.4 (4 steps),
    the encoder keeps 16, 13, 10, 7 and then 4 features per token (BatchTopK: 4x as many
    candidates, and k x n kept over the batch)."""
    seen = []
    real = losses_mod.sparse_topk_encode

    def recording(x, W_enc, b_enc, k, **kw):
        out = real(x, W_enc, b_enc, k, **kw)
        seen.append(k)
        return out

    monkeypatch.setattr(losses_mod, "sparse_topk_encode", recording)
    cfg = make_cfg(total_tokens=BATCH * 10, layers=[0], activation=activation, k=4, k_start=16, k_anneal_fraction=0.4,
                   log_every=1)
    Trainer(cfg, llama_adapter, train_tokens, tmp_path / "run").fit(progress=False)
    expected = [16, 13, 10, 7] + [4] * 6
    assert seen == (expected if activation == "topk" else [4 * k for k in expected])
    if activation == "batchtopk":
        assert [round(r["layers"]["0"]["l0"]) for r in _log(tmp_path / "run")] == expected


def test_jumprelu_thresholds_start_where_k_features_fire(tmp_path, llama_adapter, train_tokens):
    """Each threshold starts at its feature's 1 - k/d_sae quantile on the first batch, so the
    first step's L0 (on that batch) is k: with 64 tokens and k/d_sae = 4/64, each feature fires
    on exactly 4 of them."""
    cfg = make_cfg(total_tokens=BATCH * 2, layers=[0], activation="jumprelu", k=4, log_every=1, l0_coefficient=0.0)
    Trainer(cfg, llama_adapter, train_tokens, tmp_path / "run").fit(progress=False)
    first = _log(tmp_path / "run")[0]
    assert first["step"] == 1
    assert first["layers"]["0"]["l0"] == pytest.approx(4.0, abs=1e-6)
