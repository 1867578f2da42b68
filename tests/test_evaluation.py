"""Tests for transcoders.evaluation.metrics and .report: every metric of evaluate_coders equals a
manual computation on tiny random models, and write_report writes the documented files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import D_MODEL, VOCAB, tiny_adapter

from transcoders.coders import CoderConfig, SparseCoder
from transcoders.data.activations import harvest
from transcoders.evaluation.metrics import evaluate_coders
from transcoders.evaluation.report import DENSITY_PLOT, METRICS, SUMMARY, write_report
from transcoders.evaluation.splice import coder_replacement, mean_ablation, splice_mlps, zero_ablation

pytestmark = pytest.mark.usefixtures("single_thread")

LAYER_KEYS = {"l0", "fvu", "mse", "dead_fraction", "dense_fraction", "ce_clean", "ce_spliced", "ce_zero_ablation",
              "ce_mean_ablation", "ce_loss_recovered", "kl"}
D_SAE = 48


def make_coder(layer: int, kind: str = "transcoder", activation: str = "topk", seed: int = 0, k: int = 6) -> SparseCoder:
    cfg = CoderConfig(kind=kind, activation=activation, d_in=D_MODEL, d_out=D_MODEL, d_sae=D_SAE,
                      k=k if activation == "topk" else None, layer=layer, model_name="tiny")
    coder = SparseCoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        coder.reset_parameters(g)
        coder.W_dec.mul_(0.05)
        coder.b_enc.copy_(torch.randn(D_SAE, generator=g) - 0.5)
        # a few features that can never fire, so dead_fraction is non-trivial
        coder.b_enc[:5] = -1e3
        coder.b_dec.copy_(0.01 * torch.randn(D_MODEL, generator=g))
    return coder


@pytest.fixture(scope="module")
def adapter(tiny_llama):
    return tiny_adapter(tiny_llama)


@pytest.fixture(scope="module")
def eval_ids() -> torch.Tensor:
    """``[5, 12]`` ids: with batch_size=2 the last batch is partial."""
    return torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(7))


def manual_ce(model, ids) -> torch.Tensor:
    """Mean next-token cross-entropy in nats from ``model(ids).logits``."""
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def manual_kl(model, ids, clean_logits) -> float:
    logp = F.log_softmax(model(ids).logits[:, :-1].float(), -1)
    clean = F.log_softmax(clean_logits[:, :-1].float(), -1)
    return (clean.exp() * (clean - logp)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def two_layer_result(adapter, eval_ids, single_thread):
    coders = {0: make_coder(0, seed=1), 2: make_coder(2, seed=2)}
    means = {0: 0.01 * torch.ones(D_MODEL), 2: -0.02 * torch.ones(D_MODEL)}
    return coders, means, evaluate_coders(adapter, coders, eval_ids, mlp_out_means=means, batch_size=2, progress=False)


def test_evaluate_coders_returns_documented_keys(two_layer_result, eval_ids):
    coders, _, out = two_layer_result
    assert set(out["layers"]) == {"0", "2"}
    for m in out["layers"].values():
        assert set(m) == LAYER_KEYS
        assert all(isinstance(v, float) for v in m.values())
    assert out["eval_tokens"] == eval_ids.numel()
    assert set(out["feature_frequency"]) == {"0", "2"}
    assert all(f.shape == (D_SAE,) for f in out["feature_frequency"].values())


@torch.no_grad()
def test_ce_metrics_equal_manual_cross_entropies(two_layer_result, adapter, eval_ids):
    coders, means, out = two_layer_result
    model = adapter.model
    clean_logits = model(eval_ids).logits
    clean = manual_ce(model, eval_ids).item()
    for layer, coder in coders.items():
        m = out["layers"][str(layer)]
        assert m["ce_clean"] == pytest.approx(clean, rel=1e-5)
        with splice_mlps(adapter, {layer: zero_ablation}):
            zero = manual_ce(model, eval_ids).item()
        with splice_mlps(adapter, {layer: mean_ablation(means[layer])}):
            mean = manual_ce(model, eval_ids).item()
        with splice_mlps(adapter, {layer: coder_replacement(coder)}):
            spliced = manual_ce(model, eval_ids).item()
            kl = manual_kl(model, eval_ids, clean_logits)
        assert m["ce_zero_ablation"] == pytest.approx(zero, rel=1e-5)
        assert m["ce_mean_ablation"] == pytest.approx(mean, rel=1e-5)
        assert m["ce_spliced"] == pytest.approx(spliced, rel=1e-5)
        assert m["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert m["kl"] >= 0
        # the spliced and ablated runs really differ from the clean one
        assert abs(m["ce_zero_ablation"] - m["ce_clean"]) > 1e-4
        assert m["ce_loss_recovered"] == pytest.approx(
            (m["ce_zero_ablation"] - m["ce_spliced"]) / (m["ce_zero_ablation"] - m["ce_clean"]), rel=1e-9)


@torch.no_grad()
def test_reconstruction_and_sparsity_metrics_equal_manual_computation(two_layer_result, adapter, eval_ids):
    coders, _, out = two_layer_result
    acts = harvest(adapter, eval_ids, list(coders))
    for layer, coder in coders.items():
        m = out["layers"][str(layer)]
        x, y = (t.flatten(0, 1).double() for t in acts[layer])
        y_hat = coder(x.float()).double()
        fvu = (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        assert m["fvu"] == pytest.approx(fvu.item(), rel=1e-4)
        assert m["mse"] == pytest.approx((y - y_hat).pow(2).mean().item(), rel=1e-4)
        f = coder.encode(x.float())
        assert m["l0"] == pytest.approx((f != 0).sum(-1).float().mean().item(), rel=1e-9)
        freq = (f != 0).double().mean(0)
        assert m["dead_fraction"] == pytest.approx((freq == 0).double().mean().item())
        assert m["dead_fraction"] >= 5 / D_SAE
        assert m["dense_fraction"] == pytest.approx((freq > 0.1).double().mean().item())
        torch.testing.assert_close(out["feature_frequency"][str(layer)], freq)


def test_evaluation_does_not_depend_on_batch_size(two_layer_result, adapter, eval_ids):
    coders, means, out = two_layer_result
    other = evaluate_coders(adapter, coders, eval_ids, mlp_out_means=means, batch_size=8, progress=False)
    for layer in out["layers"]:
        for key, value in out["layers"][layer].items():
            # loss recovered divides by CE_zero - CE_clean, small for a random model: looser
            rel = 1e-2 if key == "ce_loss_recovered" else 1e-5
            assert other["layers"][layer][key] == pytest.approx(value, rel=rel, abs=1e-7), key


@torch.no_grad()
def test_mean_ablation_falls_back_to_eval_token_means(adapter, eval_ids):
    coders = {1: make_coder(1, seed=3)}
    out = evaluate_coders(adapter, coders, eval_ids, batch_size=2, progress=False)
    y = harvest(adapter, eval_ids, [1])[1][1]
    mean = y.double().mean((0, 1)).float()
    with splice_mlps(adapter, {1: mean_ablation(mean)}):
        expected = manual_ce(adapter.model, eval_ids).item()
    assert out["layers"]["1"]["ce_mean_ablation"] == pytest.approx(expected, rel=1e-5)
    # and an explicit, different mean for the layer is used instead
    shifted = evaluate_coders(adapter, coders, eval_ids, mlp_out_means={1: mean + 1.0}, batch_size=2, progress=False)
    assert shifted["layers"]["1"]["ce_mean_ablation"] != pytest.approx(expected, rel=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("activation", ["topk", "relu"])
@pytest.mark.parametrize("kind", ["skip_transcoder", "sae"])
def test_fvu_uses_the_right_target_per_kind(adapter, eval_ids, kind, activation):
    coder = make_coder(1, kind=kind, activation=activation, seed=4)
    if coder.W_skip is not None:
        with torch.no_grad():
            coder.W_skip.copy_(0.01 * torch.randn(D_MODEL, D_MODEL, generator=torch.Generator().manual_seed(5)))
    out = evaluate_coders(adapter, {1: coder}, eval_ids, batch_size=4, progress=False)["layers"]["1"]
    x, y = (t.flatten(0, 1).double() for t in harvest(adapter, eval_ids, [1])[1])
    target = x if kind == "sae" else y
    y_hat = coder(x.float()).double()
    fvu = (target - y_hat).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
    assert out["fvu"] == pytest.approx(fvu.item(), rel=1e-4)
    assert out["l0"] == pytest.approx((coder.encode(x.float()) != 0).sum(-1).float().mean().item())


class ExactMLP(SparseCoder):
    """A coder whose forward is the layer's real MLP (called via ``.forward`` so hooks are
    skipped); encode/decode stay those of a normal coder."""

    def __init__(self, cfg, adapter, layer):
        super().__init__(cfg)
        self._block = adapter.layers()[layer]

    def forward(self, x):
        out = self._block.mlp.forward(x)
        norm = getattr(self._block, "post_feedforward_layernorm", None)
        return norm.forward(out) if norm is not None else out


@torch.no_grad()
def test_exact_coder_recovers_all_loss_with_zero_kl(tiny_model, eval_ids):
    adapter = tiny_adapter(tiny_model)
    coder = ExactMLP(make_coder(1).cfg, adapter, 1)
    out = evaluate_coders(adapter, {1: coder}, eval_ids, batch_size=3, progress=False)["layers"]["1"]
    assert out["ce_spliced"] == pytest.approx(out["ce_clean"], rel=1e-6, abs=1e-6)
    assert out["kl"] == pytest.approx(0.0, abs=1e-6)
    assert out["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert out["ce_clean"] == pytest.approx(manual_ce(tiny_model, eval_ids).item(), rel=1e-5)


class IdentitySAE(SparseCoder):
    """An SAE that reconstructs its input (the MLP input) exactly."""

    def forward(self, x):
        return x


@torch.no_grad()
def test_perfect_sae_spliced_in_leaves_loss_unchanged(adapter, eval_ids):
    sae = IdentitySAE(make_coder(1, kind="sae").cfg)
    out = evaluate_coders(adapter, {1: sae}, eval_ids, batch_size=5, progress=False)["layers"]["1"]
    assert out["ce_spliced"] == pytest.approx(out["ce_clean"], rel=1e-5)
    assert out["kl"] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- report


def test_write_report_writes_metrics_json_summary_and_png(tmp_path, two_layer_result):
    _, _, metrics = two_layer_result
    summary = write_report(tmp_path, metrics, extra={"model": "tiny", "note": 1}, header="tiny on test")
    assert summary == tmp_path / SUMMARY
    data = json.loads((tmp_path / METRICS).read_text())
    assert set(data) == {"layers", "eval_tokens", "model", "note"}
    assert data["eval_tokens"] == metrics["eval_tokens"]
    assert set(data["layers"]) == {"0", "2"}
    for layer, m in data["layers"].items():
        assert set(m) >= LAYER_KEYS - {"dense_fraction"}
        assert m == pytest.approx(metrics["layers"][layer])
    text = summary.read_text()
    assert "tiny on test" in text and DENSITY_PLOT in text
    assert sum(line.startswith("| 0 |") or line.startswith("| 2 |") for line in text.splitlines()) == 2
    png = (tmp_path / DENSITY_PLOT).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))


def test_write_report_without_frequencies_skips_plot(tmp_path, two_layer_result):
    _, _, metrics = two_layer_result
    plain = {k: v for k, v in metrics.items() if k != "feature_frequency"}
    write_report(tmp_path, plain)
    assert json.loads((tmp_path / METRICS).read_text())["layers"].keys() == {"0", "2"}
    assert not (tmp_path / DENSITY_PLOT).exists()
    assert (tmp_path / SUMMARY).is_file()


def test_skip_first_leaves_the_sink_out_of_fvu_and_keeps_its_real_mlp_output(tiny_llama, tiny_tokens):
    """With ``skip_first=1``, FVU/L0 ignore position 0 and every splice keeps the real MLP
    output there, so a coder that is garbage only at position 0 changes nothing."""
    from transcoders.evaluation.splice import keep_first, splice_mlps

    adapter = tiny_adapter(tiny_llama)
    coder = SparseCoder(CoderConfig(kind="transcoder", activation="topk", d_in=32, d_out=32, d_sae=64, k=4, layer=1))
    seen = {}

    def record(x):
        seen["x"] = x
        return torch.zeros_like(x)

    with torch.no_grad(), splice_mlps(adapter, {1: keep_first(record, adapter, 1, 1)}):
        out = tiny_llama(tiny_tokens).logits
    with torch.no_grad():
        ref = tiny_llama(tiny_tokens).logits
    torch.testing.assert_close(out[:, 0], ref[:, 0])  # position 0 saw the real MLP
    assert not torch.allclose(out[:, 1:], ref[:, 1:])
    full = evaluate_coders(adapter, {1: coder}, tiny_tokens, progress=False)
    skipped = evaluate_coders(adapter, {1: coder}, tiny_tokens, progress=False, skip_first=1)
    assert full["eval_tokens"] == tiny_tokens.numel()
    assert skipped["eval_tokens"] == tiny_tokens.numel() - tiny_tokens.shape[0]
    assert skipped["layers"]["1"]["fvu"] != full["layers"]["1"]["fvu"]


# ----------------------------------------------------------------------------- all at once

@torch.no_grad()
def _hand_run(model, ids, outputs: dict):
    """Logits with each layer's MLP output replaced by ``outputs[layer](mlp_input)``, by forward
    hooks on the Hugging Face modules themselves (not the splicing code under test)."""
    handles = [model.model.layers[layer].mlp.register_forward_hook(lambda _m, args, _out, fn=fn: fn(args[0]))
               for layer, fn in outputs.items()]
    try:
        return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def _ce(logits, ids) -> float:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).item()


def _kl(logits, clean_logits) -> float:
    logp = F.log_softmax(logits[:, :-1].float(), -1)
    clean = F.log_softmax(clean_logits[:, :-1].float(), -1)
    return (clean.exp() * (clean - logp)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def together_result(adapter, eval_ids, single_thread):
    coders = {0: make_coder(0, seed=1), 1: make_coder(1, seed=3), 2: make_coder(2, seed=2)}
    means = {0: 0.01 * torch.ones(D_MODEL), 1: 0.02 * torch.ones(D_MODEL), 2: -0.02 * torch.ones(D_MODEL)}
    out = evaluate_coders(adapter, coders, eval_ids, mlp_out_means=means, batch_size=2, progress=False, together=True)
    return coders, means, out


def test_all_at_once_equals_hand_computation(together_result, adapter, eval_ids):
    coders, means, out = together_result
    t = out["spliced_together"]
    model = adapter.model
    clean = model(eval_ids).logits
    tc = {layer: (lambda x, c=c: c.decode(c.encode(x), x)) for layer, c in coders.items()}
    spliced = _hand_run(model, eval_ids, tc)
    zero = _hand_run(model, eval_ids, {layer: torch.zeros_like for layer in coders})
    mean = _hand_run(model, eval_ids, {layer: (lambda x, m=m: m.expand_as(x)) for layer, m in means.items()})
    assert t["layers"] == [0, 1, 2]
    assert t["ce_clean"] == pytest.approx(_ce(clean, eval_ids), rel=1e-5)
    assert t["ce_spliced"] == pytest.approx(_ce(spliced, eval_ids), rel=1e-5)
    assert t["kl"] == pytest.approx(_kl(spliced, clean), rel=1e-4)
    assert t["ce_zero_ablation"] == pytest.approx(_ce(zero, eval_ids), rel=1e-5)
    assert t["ce_mean_ablation"] == pytest.approx(_ce(mean, eval_ids), rel=1e-5)
    assert t["ce_increase"] == pytest.approx(t["ce_spliced"] - t["ce_clean"], rel=1e-9)
    assert t["loss_recovered_vs_zero"] == pytest.approx(
        (t["ce_zero_ablation"] - t["ce_spliced"]) / (t["ce_zero_ablation"] - t["ce_clean"]), rel=1e-9)
    # all at once is not the sum of the single splices: the together run really splices them all
    assert abs(t["ce_spliced"] - max(m["ce_spliced"] for m in out["layers"].values())) > 1e-4
    for layer in coders:
        rest = _hand_run(model, eval_ids, {k: f for k, f in tc.items() if k != layer})
        loo = t["leave_one_out"][str(layer)]
        assert loo["ce_without"] == pytest.approx(_ce(rest, eval_ids), rel=1e-5)
        assert loo["kl_without"] == pytest.approx(_kl(rest, clean), rel=1e-4)
        assert loo["ce_added"] == pytest.approx(t["ce_spliced"] - loo["ce_without"], rel=1e-9)


def test_all_at_once_with_one_coder_is_the_single_layer_splice(adapter, eval_ids):
    coder = make_coder(1, seed=5)
    out = evaluate_coders(adapter, {1: coder}, eval_ids, mlp_out_means={1: torch.zeros(D_MODEL)}, batch_size=2,
                          progress=False, together=True)
    single, t = out["layers"]["1"], out["spliced_together"]
    for a, b in (("ce_spliced", "ce_spliced"), ("kl", "kl"), ("ce_zero_ablation", "ce_zero_ablation"),
                 ("ce_mean_ablation", "ce_mean_ablation"), ("ce_loss_recovered", "loss_recovered_vs_zero")):
        assert t[b] == single[a], a
    assert t["leave_one_out"] == {}


def test_all_at_once_refuses_two_coders_for_one_layer(adapter, eval_ids):
    with pytest.raises(ValueError, match="one coder per layer"):
        evaluate_coders(adapter, {"1/a": make_coder(1), "1/b": make_coder(1, seed=9)}, eval_ids, progress=False,
                        together=True)


def test_report_shows_the_together_table(tmp_path, together_result):
    _, _, out = together_result
    write_report(tmp_path, out)
    text = (tmp_path / SUMMARY).read_text()
    assert "## All 3 coders spliced at once (layers 0-2)" in text
    assert f"{out['spliced_together']['ce_spliced']:.4f}" in text
    assert sum(line.startswith("| 1 |") for line in text.splitlines()) == 2  # per-layer row and leave-one-out row
    assert json.loads((tmp_path / METRICS).read_text())["spliced_together"]["layers"] == [0, 1, 2]


def test_splices_after_the_first_layer_reuse_the_clean_prefix(adapter, eval_ids):
    """Layers below a splice replay their clean outputs: layer 0's attention runs only in the
    clean pass and in the three runs that change layer 0 itself (metrics stay those of the
    manual runs above, which compute every layer)."""
    calls = []
    handle = adapter.model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        evaluate_coders(adapter, {0: make_coder(0), 2: make_coder(2, seed=2)}, eval_ids[:2], batch_size=2, progress=False,
                        mlp_out_means={0: torch.zeros(D_MODEL), 2: torch.zeros(D_MODEL)})
    finally:
        handle.remove()
    assert len(calls) == 1 + 3  # clean, then zero / mean / coder at layer 0; nothing for layer 2's runs
    assert "forward" not in vars(adapter.model.model.layers[0])  # the replay is undone
