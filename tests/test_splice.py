"""Tests for transcoders.evaluation.splice on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch
from conftest import D_MODEL, N_LAYERS, tiny_adapter

from transcoders.coders import CoderConfig, SparseCoder
from transcoders.evaluation.splice import coder_replacement, mean_ablation, splice_mlps, zero_ablation
from transcoders.models import AdapterError

pytestmark = pytest.mark.usefixtures("single_thread")


def _ids(seed=0, batch=2, pos=9):
    return torch.randint(0, 100, (batch, pos), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


@torch.no_grad()
def _loss(model, ids):
    return model(ids, labels=ids).loss


def _own_mlp(adapter, layer):
    """A replacement computing the layer's real MLP output from its input.

    It calls the modules' ``forward`` directly: calling the hooked modules through ``__call__``
    from inside the splice hook would re-enter the hook.
    """
    block = adapter.layers()[layer]

    def fn(x):
        out = block.mlp.forward(x)
        if hasattr(block, "post_feedforward_layernorm"):
            out = block.post_feedforward_layernorm.forward(out)
        return out

    return fn


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_splice_identity_replacement_leaves_logits_and_loss_unchanged(tiny_model):
    adapter = tiny_adapter(tiny_model)
    ids = _ids()
    logits, loss = _logits(tiny_model, ids), _loss(tiny_model, ids)
    calls = []

    def counting(layer):
        own = _own_mlp(adapter, layer)
        return lambda x: (calls.append(layer), own(x))[1]

    with splice_mlps(adapter, {layer: counting(layer) for layer in range(N_LAYERS)}):
        spliced_logits, spliced_loss = _logits(tiny_model, ids), _loss(tiny_model, ids)
    assert sorted(set(calls)) == list(range(N_LAYERS))  # every replacement really ran
    torch.testing.assert_close(spliced_logits, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(spliced_loss, loss, rtol=0, atol=1e-6)


def test_splice_replacement_receives_mlp_input(tiny_model):
    adapter = tiny_adapter(tiny_model)
    ids = _ids(1)
    layer = 1
    seen = {}
    handle = adapter.mlp_in_module(layer).register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0].clone()))
    try:
        _logits(tiny_model, ids)
    finally:
        handle.remove()
    got = []
    with splice_mlps(adapter, {layer: lambda x: (got.append(x.clone()), _own_mlp(adapter, layer)(x))[1]}):
        _logits(tiny_model, ids)
    assert len(got) == 1
    assert got[0].shape == (2, 9, D_MODEL)
    torch.testing.assert_close(got[0], seen["x"], rtol=0, atol=0)


def test_zero_ablation_changes_logits(tiny_model):
    adapter = tiny_adapter(tiny_model)
    ids = _ids(2)
    logits = _logits(tiny_model, ids)
    with splice_mlps(adapter, {0: zero_ablation}):
        ablated = _logits(tiny_model, ids)
    assert not torch.allclose(ablated, logits, atol=1e-4)
    assert torch.equal(_logits(tiny_model, ids), logits)


def test_zero_ablation_writes_zeros_into_residual(tiny_model):
    adapter = tiny_adapter(tiny_model)
    outs = []
    with splice_mlps(adapter, {2: zero_ablation}):
        h = adapter.mlp_out_module(2).register_forward_hook(lambda _m, _a, o: outs.append(o.clone()))
        try:
            _logits(tiny_model, _ids(3))
        finally:
            h.remove()
    assert len(outs) == 1 and not outs[0].any()


def test_mean_ablation_writes_mean_at_every_position(tiny_model):
    adapter = tiny_adapter(tiny_model)
    ids = _ids(4)
    logits = _logits(tiny_model, ids)
    mean = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(5))
    outs = []
    with splice_mlps(adapter, {1: mean_ablation(mean)}):
        # Registered after the splice hook, so it sees the replaced output.
        h = adapter.mlp_out_module(1).register_forward_hook(lambda _m, _a, o: outs.append(o.clone()))
        try:
            ablated = _logits(tiny_model, ids)
        finally:
            h.remove()
    assert len(outs) == 1
    assert outs[0].shape == (2, 9, D_MODEL)
    assert torch.equal(outs[0], mean.expand(2, 9, D_MODEL))
    assert not torch.allclose(ablated, logits, atol=1e-4)
    assert _no_hooks(tiny_model)
    assert torch.equal(_logits(tiny_model, ids), logits)


def test_splice_hooks_removed_and_logits_restored_after_with(tiny_model):
    adapter = tiny_adapter(tiny_model)
    ids = _ids(6)
    logits = _logits(tiny_model, ids)
    assert _no_hooks(tiny_model)
    with splice_mlps(adapter, {0: zero_ablation, 2: zero_ablation}):
        assert not _no_hooks(tiny_model)
        _logits(tiny_model, ids)
    assert _no_hooks(tiny_model)
    assert torch.equal(_logits(tiny_model, ids), logits)


def test_splice_hooks_removed_when_body_raises(tiny_model):
    adapter = tiny_adapter(tiny_model)
    with pytest.raises(RuntimeError, match="boom"):
        with splice_mlps(adapter, {0: zero_ablation}):
            raise RuntimeError("boom")
    assert _no_hooks(tiny_model)


def test_splice_wrong_shape_replacement_raises_value_error(tiny_model):
    adapter = tiny_adapter(tiny_model)
    ids = _ids(7)
    logits = _logits(tiny_model, ids)
    with pytest.raises(ValueError, match="layer 1.*shape"):
        with splice_mlps(adapter, {1: lambda x: x[..., :-1]}):
            _logits(tiny_model, ids)
    assert _no_hooks(tiny_model)
    assert torch.equal(_logits(tiny_model, ids), logits)


def test_splice_out_of_range_layer_raises_and_leaves_no_hooks(tiny_model):
    adapter = tiny_adapter(tiny_model)
    with pytest.raises(AdapterError, match="out of range"):
        with splice_mlps(adapter, {0: zero_ablation, N_LAYERS: zero_ablation}):
            pass  # pragma: no cover
    assert _no_hooks(tiny_model)


def test_coder_replacement_splices_a_coder(tiny_model):
    adapter = tiny_adapter(tiny_model)
    ids = _ids(8)
    torch.manual_seed(0)
    coder = SparseCoder(CoderConfig(d_in=D_MODEL, d_out=D_MODEL, d_sae=64, k=4), dtype=torch.float64)
    outs, ins = [], []
    with splice_mlps(adapter, {1: coder_replacement(coder)}):
        h_in = adapter.mlp_in_module(1).register_forward_pre_hook(lambda _m, a: ins.append(a[0].clone()))
        h_out = adapter.mlp_out_module(1).register_forward_hook(lambda _m, _a, o: outs.append(o.clone()))
        try:
            _logits(tiny_model, ids)
        finally:
            h_in.remove()
            h_out.remove()
    assert outs[0].dtype == torch.float32  # cast back to the model's dtype
    with torch.no_grad():
        expected = coder(ins[0].double()).float()
    torch.testing.assert_close(outs[0], expected, rtol=0, atol=1e-6)


def test_mean_ablation_output_is_on_the_input_device():
    # A mean computed (or loaded) on the CPU must still work when the model runs elsewhere.
    # "meta" stands in for a second device: the output should follow x, as zero_ablation's does.
    x = torch.ones(2, 3, D_MODEL, device="meta")
    assert zero_ablation(x).device == x.device
    out = mean_ablation(torch.zeros(D_MODEL))(x)
    assert out.shape == x.shape
    assert out.device == x.device
