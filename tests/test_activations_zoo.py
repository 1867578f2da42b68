"""Tests for the BatchTopK and JumpReLU activations: training on a tiny Llama (FVU goes down,
BatchTopK keeps k * n activations per batch and is saved as JumpReLU with its fitted threshold,
the L0 penalty lowers L0), the JumpReLU straight-through estimators against hand-computed
gradients, the JumpReLU SparseCoder, and exact resume of a BatchTopK run."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import D_MODEL, VOCAB
from conftest import read_log as _log

import transcoders.training.losses as losses_mod
from transcoders.coders.coder import SparseCoder
from transcoders.coders.config import CoderConfig
from transcoders.coders.io import load_coder, save_coder
from transcoders.coders.run_folder import CoderKey
from transcoders.evaluation.metrics import evaluate_coders
from transcoders.training.checkpoint import load_checkpoint
from transcoders.training.config import TrainConfig
from transcoders.training.losses import _JumpReLU, _Step
from transcoders.training.trainer import Trainer, TrainingInterrupted

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH = 64
STEPS = 30
BTK_STEPS = 150
K = 4
BASE = dict(
    model="tiny-llama", layers=[1], batch_size=BATCH, total_tokens=BATCH * STEPS, ctx_len=16, block_contexts=4,
    model_batch=4, d_sae=64, k=K, warmup_steps=2, checkpoint_every=5, precision="fp32",
    harvest_dtype="float32", device="cpu", lr=1e-2, log_every=1,
)


def make_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**BASE, **kw})


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSCODERS_CACHE", str(tmp_path / "cache"))




# ---------------------------------------------------------------- BatchTopK


@pytest.fixture(scope="module")
def batchtopk_run(tmp_path_factory, llama_adapter, train_tokens, single_thread):
    """A BatchTopK run whose decoder inputs (the kept activations) are recorded. 150 steps, so
    that the threshold EMA (decay 0.95, started at the first batch's much smaller threshold) has
    caught up enough for the saved JumpReLU coder to have an L0 near k."""
    run_dir = tmp_path_factory.mktemp("batchtopk")
    trainer = Trainer(make_cfg(activation="batchtopk", total_tokens=BATCH * BTK_STEPS), llama_adapter, train_tokens, run_dir)
    coder = trainer.states[CoderKey(1)].coder
    recorded = []
    real = coder.decode_sparse

    def recording(values, indices, x=None, mask=None):
        assert torch.equal(mask, values != 0)  # only the kept activations are decoded
        recorded.append(values.detach().clone())
        return real(values, indices, x, mask)

    coder.decode_sparse = recording  # batchtopk_loss decodes the masked activations through this
    coders = trainer.fit(progress=False)
    return trainer, coders, recorded, run_dir


def test_batchtopk_training_reduces_fvu(batchtopk_run):
    _, _, _, run_dir = batchtopk_run
    log = _log(run_dir)
    assert [r["step"] for r in log] == list(range(1, BTK_STEPS + 1))
    first, last = log[0]["layers"]["1"], log[-1]["layers"]["1"]
    assert last["fvu"] < 0.9 * first["fvu"], (first, last)


def test_batchtopk_keeps_k_per_token_on_average_but_not_per_token(batchtopk_run):
    _, _, recorded, run_dir = batchtopk_run
    assert len(recorded) == BTK_STEPS
    per_token = []
    for values in recorded:
        assert values.shape == (BATCH, 4 * K)  # candidates: each token's top 4k
        assert (values >= 0).all()
        active = (values != 0).sum(1)
        assert int(active.sum()) == K * BATCH  # exactly k * n activations kept in the batch
        per_token.append(active)
    per_token = torch.cat(per_token)
    assert (per_token != K).any(), "BatchTopK should let tokens use more or fewer than k features"
    assert per_token.max() > K and per_token.min() < K
    assert per_token.max() <= 4 * K
    # the logged L0 is the batch mean: exactly k
    assert all(r["layers"]["1"]["l0"] == K for r in _log(run_dir))


def test_batchtopk_threshold_ema_follows_smallest_kept_activation(batchtopk_run):
    trainer, _, recorded, _ = batchtopk_run
    ema = None
    for step, values in enumerate(recorded):
        kth = float(values[values > 0].min())
        ema = kth if step == 0 else 0.95 * ema + 0.05 * kth
    assert trainer.states[CoderKey(1)].threshold_ema == pytest.approx(ema, rel=1e-12)
    assert trainer.states[CoderKey(1)].threshold_ema > 0


def test_batchtopk_is_saved_as_jumprelu_with_the_fitted_threshold(batchtopk_run):
    trainer, coders, _, run_dir = batchtopk_run
    st = trainer.states[CoderKey(1)]
    saved = load_coder(run_dir / "layers.1.mlp")
    assert saved.cfg.activation == "jumprelu"
    assert saved.cfg.d_sae == 64
    assert saved.threshold is not None and saved.threshold.shape == (64,)
    assert st.threshold_ema > 0
    assert torch.equal(saved.threshold, torch.full((64,), st.threshold_ema, dtype=torch.float32))
    assert torch.equal(saved.threshold, coders[CoderKey(1)].threshold)
    # the training coder keeps its own (unused) threshold
    assert st.coder.cfg.activation == "batchtopk"
    assert TrainConfig.model_validate(saved.cfg.training).activation == "batchtopk"


def test_saved_batchtopk_coder_evaluates_with_l0_near_k(batchtopk_run, llama_adapter):
    _, _, _, run_dir = batchtopk_run
    saved = load_coder(run_dir / "layers.1.mlp")
    eval_ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(99))
    metrics = evaluate_coders(llama_adapter, {"1": saved}, eval_ids, batch_size=4, progress=False)
    m = metrics["layers"]["1"]
    assert K / 4 <= m["l0"] <= 4 * K, m
    assert m["fvu"] < 1.0, m


def _batchtopk_coder(bias=None) -> SparseCoder:
    coder = SparseCoder(CoderConfig(activation="batchtopk", d_in=8, d_out=8, d_sae=16, k=2))
    coder.reset_parameters(torch.Generator().manual_seed(0))
    if bias is not None:
        with torch.no_grad():
            coder.b_enc.copy_(bias)
    return coder


def _batchtopk_step(coder, x):
    cfg = TrainConfig(activation="batchtopk", d_sae=16, k=2, precision="fp32", device="cpu", auxk_coefficient=0)
    kept = []
    real = coder.decode_sparse
    coder.decode_sparse = lambda values, indices, x=None, mask=None: (
        kept.append((values.detach(), indices)), real(values, indices, x, mask)
    )[1]
    result = losses_mod.batchtopk_loss(cfg, coder, x, x, torch.zeros(16, dtype=torch.bool), 0)
    return result, *kept[0]


def test_batchtopk_loss_keeps_the_k_times_n_largest_activations_of_the_batch():
    coder = _batchtopk_coder(bias=torch.linspace(0.5, 2.0, 16))  # every pre-activation positive
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    result, values, indices = _batchtopk_step(coder, x)
    pre = coder.pre_acts(x).detach()
    top = pre.flatten().topk(2 * 10).values
    kept = values[values > 0]
    assert kept.numel() == 20 and result.l0.item() == 2.0
    assert torch.equal(kept.sort().values, top.sort().values)  # the batch's 20 largest, wherever they are
    assert result.threshold == float(top.min())
    per_token = (values > 0).sum(1)
    assert int(per_token.sum()) == 20
    assert torch.equal(result.counts, torch.bincount(indices[values > 0], minlength=16))


def test_batchtopk_loss_keeps_only_positive_activations_when_too_few_are_positive():
    bias = torch.full((16,), -100.0)
    bias[0], bias[1] = 100.0, 0.0  # feature 0 always fires, feature 1 on about half the tokens
    coder = _batchtopk_coder(bias)
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    result, values, _ = _batchtopk_step(coder, x)
    positive = int((coder.pre_acts(x) > 0).sum())
    assert 10 < positive < 20  # fewer than k * n
    assert int((values > 0).sum()) == positive
    assert result.l0.item() == pytest.approx(positive / 10)
    assert result.counts[0] == 10 and result.counts[2:].sum() == 0


def test_batchtopk_threshold_is_the_smallest_kept_activation_when_too_few_are_positive():
    bias = torch.full((16,), -100.0)
    bias[0], bias[1] = 100.0, 0.0
    coder = _batchtopk_coder(bias)
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    result, values, _ = _batchtopk_step(coder, x)
    assert result.threshold == float(values[values > 0].min())
    assert result.threshold > 0


# ---------------------------------------------------------------- JumpReLU training


def _jumprelu_run(tmp_path, adapter, tokens, l0_coefficient: float):
    trainer = Trainer(make_cfg(activation="jumprelu", l0_coefficient=l0_coefficient), adapter, tokens, tmp_path)
    minima = []
    trainer.fit(progress=False, on_step=lambda t, _m: minima.append(float(t.states[CoderKey(1)].coder.threshold.detach().min())))
    return trainer, _log(tmp_path), minima


def test_jumprelu_training_reduces_fvu_keeps_thresholds_positive_and_l0_penalty_lowers_l0(
        tmp_path, llama_adapter, train_tokens):
    _, weak_log, weak_min = _jumprelu_run(tmp_path / "weak", llama_adapter, train_tokens, 1e-3)
    strong, strong_log, strong_min = _jumprelu_run(tmp_path / "strong", llama_adapter, train_tokens, 0.1)

    for log in (weak_log, strong_log):
        first, last = log[0]["layers"]["1"], log[-1]["layers"]["1"]
        assert last["fvu"] < 0.9 * first["fvu"], (first, last)
    assert len(weak_min) == len(strong_min) == STEPS
    assert min(weak_min + strong_min) >= 1e-4
    # same seed and data: identical first step, then the stronger L0 penalty gives fewer active features
    assert weak_log[0]["layers"]["1"]["l0"] == strong_log[0]["layers"]["1"]["l0"]
    weak_l0, strong_l0 = weak_log[-1]["layers"]["1"]["l0"], strong_log[-1]["layers"]["1"]["l0"]
    assert strong_l0 < weak_l0, (strong_l0, weak_l0)

    saved = load_coder(tmp_path / "strong" / "layers.1.mlp")
    assert saved.cfg.activation == "jumprelu"
    assert torch.equal(saved.threshold, strong.states[CoderKey(1)].coder.threshold.detach())  # thresholds are not rescaled
    assert (saved.threshold >= 1e-4).all()


def test_jumprelu_thresholds_are_clamped_to_1e_4(tmp_path, llama_adapter, train_tokens):
    trainer = Trainer(make_cfg(activation="jumprelu", total_tokens=BATCH * 2), llama_adapter, train_tokens, tmp_path)
    with torch.no_grad():
        trainer.states[CoderKey(1)].coder.threshold[:8] = -1.0
    trainer.fit(progress=False)
    assert (trainer.states[CoderKey(1)].coder.threshold >= 1e-4).all()


# ---------------------------------------------------------------- straight-through estimators


@pytest.fixture()
def ste_inputs():
    eps = 0.5
    pre = torch.tensor([[0.10, 0.60, -0.30, 1.00],
                        [0.45, 0.30, 0.20, 0.95],
                        [0.70, 0.52, 0.00, 2.00]], dtype=torch.float64)
    theta = torch.tensor([0.30, 0.50, 0.10, 1.00], dtype=torch.float64)
    grad = torch.tensor([[1.0, -2.0, 3.0, 0.5],
                         [2.0, 1.5, -1.0, 4.0],
                         [-3.0, 0.25, 2.0, 1.0]], dtype=torch.float64)
    return pre, theta, eps, grad


def test_jumprelu_ste_forward_and_gradients_match_hand_computation(ste_inputs):
    pre, theta, eps, grad = ste_inputs
    p = pre.clone().requires_grad_()
    t = theta.clone().requires_grad_()
    out = _JumpReLU.apply(p, t, eps)
    expected = torch.tensor([[0.00, 0.60, 0.00, 0.00],   # 1.00 == theta: not above, so 0
                             [0.45, 0.00, 0.20, 0.00],
                             [0.70, 0.52, 0.00, 2.00]], dtype=torch.float64)
    assert torch.equal(out.detach(), expected)
    out.backward(grad)
    assert torch.equal(p.grad, grad * (pre > theta))
    # window |pre - theta| < eps/2 = 0.25, by hand:
    window = torch.tensor([[1, 1, 0, 1],
                           [1, 1, 1, 1],
                           [0, 1, 1, 0]], dtype=torch.float64)
    assert torch.equal(window, ((pre - theta).abs() < eps / 2).double())
    hand = torch.tensor([
        -(0.30 / eps) * (1.0 + 2.0),
        -(0.50 / eps) * (-2.0 + 1.5 + 0.25),
        -(0.10 / eps) * (-1.0 + 2.0),
        -(1.00 / eps) * (0.5 + 4.0),
    ], dtype=torch.float64)
    torch.testing.assert_close(t.grad, hand, rtol=1e-12, atol=1e-12)


def test_step_ste_forward_and_gradients_match_hand_computation(ste_inputs):
    pre, theta, eps, grad = ste_inputs
    p = pre.clone().requires_grad_()
    t = theta.clone().requires_grad_()
    out = _Step.apply(p, t, eps)
    assert out.dtype == pre.dtype
    assert torch.equal(out.detach(), (pre > theta).double())
    assert torch.equal(out.detach(), torch.tensor([[0, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.float64))
    out.backward(grad)
    assert p.grad is None or torch.equal(p.grad, torch.zeros_like(pre))
    hand = torch.tensor([
        -(1 / eps) * (1.0 + 2.0),
        -(1 / eps) * (-2.0 + 1.5 + 0.25),
        -(1 / eps) * (-1.0 + 2.0),
        -(1 / eps) * (0.5 + 4.0),
    ], dtype=torch.float64)
    torch.testing.assert_close(t.grad, hand, rtol=1e-12, atol=1e-12)


def test_jumprelu_ste_theta_gradient_matches_formula_on_random_batch():
    gen = torch.Generator().manual_seed(0)
    eps = 0.3
    pre = torch.randn(50, 7, generator=gen, dtype=torch.float64)
    theta = torch.rand(7, generator=gen, dtype=torch.float64)
    grad = torch.randn(50, 7, generator=gen, dtype=torch.float64)
    t1, t2 = theta.clone().requires_grad_(), theta.clone().requires_grad_()
    _JumpReLU.apply(pre, t1, eps).backward(grad)
    _Step.apply(pre, t2, eps).backward(grad)
    window = ((pre - theta).abs() < eps / 2).double()
    assert window.sum() > 0
    torch.testing.assert_close(t1.grad, (-(theta / eps) * window * grad).sum(0))
    torch.testing.assert_close(t2.grad, (-(1 / eps) * window * grad).sum(0))


# ---------------------------------------------------------------- JumpReLU SparseCoder


@pytest.mark.parametrize("kind", ["transcoder", "skip_transcoder", "sae"])
def test_jumprelu_coder_encode_forward_and_round_trip(tmp_path, kind):
    cfg = CoderConfig(kind=kind, activation="jumprelu", d_in=8, d_out=8, d_sae=16, k=None, layer=0)
    coder = SparseCoder(cfg)
    coder.reset_parameters(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 8, generator=gen)
    with torch.no_grad():
        coder.threshold.copy_(torch.rand(16, generator=gen) * 0.5)
        coder.b_enc.copy_(torch.randn(16, generator=gen) * 0.1)
        if coder.W_skip is not None:
            coder.W_skip.copy_(torch.randn(8, 8, generator=gen) * 0.1)
        pre = coder.pre_acts(x)
        coder.threshold[3] = pre[0, 3]  # a pre-activation exactly at its threshold is zeroed
        f = coder.encode(x)
        assert torch.equal(f, torch.where(pre > coder.threshold, pre, torch.zeros_like(pre)))
        assert f[0, 3] == 0
        assert (f > 0).any() and (f == 0).any()
        assert torch.equal(coder(x), coder.decode(f, x))
        assert coder(x.view(2, 5, 8)).shape == (2, 5, 8)
        torch.testing.assert_close(coder(x.view(2, 5, 8)).view(10, 8), coder(x))

    save_coder(coder, tmp_path / "c")
    loaded = load_coder(tmp_path / "c")
    assert loaded.cfg == cfg
    assert torch.equal(loaded.threshold, coder.threshold)
    with torch.no_grad():
        assert torch.equal(loaded(x), coder(x))


def test_threshold_is_created_only_for_threshold_activations():
    for activation, has in [("jumprelu", True), ("batchtopk", True), ("topk", False), ("relu", False)]:
        coder = SparseCoder(CoderConfig(activation=activation, d_in=4, d_out=4, d_sae=8, k=2))
        assert (coder.threshold is not None) == has, activation


# ---------------------------------------------------------------- exact resume


def _interrupt_at(step: int):
    def on_step(trainer, metrics):
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return on_step


def test_batchtopk_resume_after_sigterm_is_bitwise_identical(tmp_path, llama_adapter, train_tokens):
    cfg = make_cfg(activation="batchtopk", total_tokens=BATCH * 12, dead_tokens=BATCH)  # AuxK active too
    a = Trainer(cfg, llama_adapter, train_tokens, tmp_path / "a")
    a.fit(progress=False)

    run_b = tmp_path / "b"
    with pytest.raises(TrainingInterrupted, match="SIGTERM"):
        Trainer(cfg, llama_adapter, train_tokens, run_b).fit(progress=False, on_step=_interrupt_at(7))
    _, state = load_checkpoint(run_b)
    assert state["step"] == 7
    assert state["coders"]["1"]["threshold_ema"] > 0

    b = Trainer(cfg, llama_adapter, train_tokens, run_b)
    b.fit(progress=False, resume=True)
    sa, sb = a.states[CoderKey(1)], b.states[CoderKey(1)]
    assert b.step == a.step == 12
    assert sa.threshold_ema == sb.threshold_ema > 0
    for (name, p), (_, q) in zip(sa.coder.named_parameters(), sb.coder.named_parameters()):
        assert torch.equal(p, q), name
    for attr in ("tokens_since_fired", "fire_count", "in_sum", "out_sum"):
        assert torch.equal(getattr(sa, attr), getattr(sb, attr)), attr
    for name in ("coder.safetensors", "stats.safetensors", "cfg.json"):
        assert (tmp_path / "a" / "layers.1.mlp" / name).read_bytes() == (run_b / "layers.1.mlp" / name).read_bytes(), name
    assert load_coder(run_b / "layers.1.mlp").threshold[0].item() == pytest.approx(sa.threshold_ema, rel=1e-6)
    assert D_MODEL == load_coder(run_b / "layers.1.mlp").cfg.d_in
