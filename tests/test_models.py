"""Tests for transcoders.models (adapters, loading) and transcoders.data.activations (offline, CPU)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from conftest import D_MODEL, EXPECTED, MAX_POS, N_LAYERS, build_tiny_model, tiny_adapter
from torch import nn

from transcoders.data.activations import ActivationStream, harvest
from transcoders.models import AdapterError, ModelLoadError, adapter_for, load_model
from transcoders.models.loading import resolve_gguf

pytestmark = pytest.mark.usefixtures("single_thread")


def _mlp_reference(adapter, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The MLP output computed directly from modules (Gemma 2 includes post_feedforward_layernorm)."""
    block = adapter.layers()[layer]
    out = block.mlp(x)
    if hasattr(block, "post_feedforward_layernorm"):
        out = block.post_feedforward_layernorm(out)
    return out


def _all_hooks_empty(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------- adapters


def test_adapter_for_picks_family_and_reports_dimensions(tiny_model):
    adapter = tiny_adapter(tiny_model)
    family, d_mlp = EXPECTED[tiny_model.family_id]
    assert adapter.family == family
    assert adapter.model is tiny_model
    assert adapter.n_layers == N_LAYERS
    assert adapter.d_model == D_MODEL
    assert adapter.d_mlp == d_mlp
    assert adapter.max_context == MAX_POS
    assert adapter.vocab_size == 100
    assert adapter.dtype == torch.float32
    assert adapter.device == torch.device("cpu")
    assert len(adapter.layers()) == N_LAYERS


def test_adapter_hookpoint_names_are_family_independent(tiny_model):
    adapter = tiny_adapter(tiny_model)
    assert [adapter.hookpoint(i) for i in range(N_LAYERS)] == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]


def test_adapter_modules_are_the_mlp_and_its_output(tiny_model):
    adapter = tiny_adapter(tiny_model)
    for i in range(N_LAYERS):
        block = adapter.layers()[i]
        assert adapter.mlp_in_module(i) is block.mlp
        expected_out = block.post_feedforward_layernorm if tiny_model.family_id == "gemma2" else block.mlp
        assert adapter.mlp_out_module(i) is expected_out


@pytest.mark.parametrize("bad", [-1, N_LAYERS, 100])
def test_check_layer_out_of_range_raises_adapter_error(tiny_model, bad):
    adapter = tiny_adapter(tiny_model)
    with pytest.raises(AdapterError, match="out of range"):
        adapter.check_layer(bad)
    with pytest.raises(AdapterError, match="out of range"):
        adapter.hookpoint(bad)
    with pytest.raises(AdapterError, match="out of range"):
        adapter.mlp_in_module(bad)
    assert adapter.check_layer(N_LAYERS - 1) == N_LAYERS - 1


def test_adapter_error_is_a_value_error():
    assert issubclass(AdapterError, ValueError)


def test_adapter_for_unsupported_model_type_raises():
    fake = nn.Linear(2, 2)
    fake.config = SimpleNamespace(model_type="bert")
    with pytest.raises(AdapterError, match="bert"):
        adapter_for(fake)
    fake.config = SimpleNamespace()  # no model_type at all
    with pytest.raises(AdapterError, match="not supported"):
        adapter_for(fake)


# ---------------------------------------------------------------- harvest


def test_harvest_mlp_input_reproduces_mlp_output(tiny_model):
    adapter = tiny_adapter(tiny_model)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    acts = harvest(adapter, ids, range(N_LAYERS))
    assert sorted(acts) == list(range(N_LAYERS))
    for layer, (x, y) in acts.items():
        assert x.shape == y.shape == (2, 7, D_MODEL)
        assert x.dtype == y.dtype == torch.float32
        with torch.no_grad():
            ref = _mlp_reference(adapter, layer, x.clone())
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
        # The MLP input is not the MLP output (the hooks did not capture the same tensor twice).
        assert not torch.allclose(x, y)


def test_harvest_layer_order_and_duplicates_do_not_matter(tiny_model):
    adapter = tiny_adapter(tiny_model)
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(1))
    a = harvest(adapter, ids, [2, 0, 2])
    b = harvest(adapter, ids, [0, 2])
    assert sorted(a) == [0, 2]
    for layer in (0, 2):
        assert torch.equal(a[layer][0], b[layer][0]) and torch.equal(a[layer][1], b[layer][1])


@pytest.mark.parametrize("last", [0, 1])
def test_harvest_stops_forward_after_last_requested_layer(tiny_model, last):
    adapter = tiny_adapter(tiny_model)
    ran: list[int] = []
    handles = [
        adapter.layers()[i].register_forward_pre_hook(lambda _m, _a, i=i: ran.append(i)) for i in range(N_LAYERS)
    ]
    try:
        harvest(adapter, torch.tensor([[1, 2, 3]]), [last])
    finally:
        for h in handles:
            h.remove()
    assert ran == list(range(last + 1))


def test_harvest_removes_its_hooks(tiny_model):
    adapter = tiny_adapter(tiny_model)
    assert _all_hooks_empty(tiny_model)
    harvest(adapter, torch.tensor([[1, 2, 3]]), range(N_LAYERS))
    assert _all_hooks_empty(tiny_model)
    for i in range(N_LAYERS):
        assert not adapter.mlp_in_module(i)._forward_pre_hooks
        assert not adapter.mlp_out_module(i)._forward_hooks


def test_harvest_removes_hooks_when_layer_invalid(tiny_model):
    adapter = tiny_adapter(tiny_model)
    with pytest.raises(AdapterError, match="out of range"):
        harvest(adapter, torch.tensor([[1, 2]]), [0, N_LAYERS])
    assert _all_hooks_empty(tiny_model)


def test_harvest_neox_parallel_residual_mlp_input_is_normed_layer_input():
    model = build_tiny_model("gpt_neox")
    assert model.config.use_parallel_residual
    adapter = tiny_adapter(model)
    layer = 1
    block = adapter.layers()[layer]
    seen: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        x, _ = harvest(adapter, torch.tensor([[5, 6, 7, 8]]), [layer])[layer]
    finally:
        handle.remove()
    assert len(seen) == 1
    with torch.no_grad():
        expected = block.post_attention_layernorm(seen[0])
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- loading


def test_load_model_missing_path_raises_with_path():
    with pytest.raises(ModelLoadError, match=r"\./no/such/model"):
        load_model("./no/such/model")


def test_load_model_unknown_hub_name_raises_offline():
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("hub not in offline mode: would reach the network")
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model")


def test_load_model_missing_safetensors_file_raises():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("no_such_weights.safetensors")


def test_load_model_empty_folder_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path.name)):
        load_model(str(tmp_path))


def test_load_model_local_folder_matches_original(tmp_path, tiny_tokenizer):
    original = build_tiny_model("llama")
    original.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.name == str(tmp_path)
    assert loaded.adapter.family == "llama"
    assert loaded.adapter.model is loaded.model
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.eos_token == "<eos>"
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)


def test_resolve_gguf_finds_file_in_folder(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_gguf(str(tmp_path)) == gguf
    assert resolve_gguf(str(gguf)) == gguf


def test_resolve_gguf_none_for_model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "stray.gguf").write_bytes(b"GGUF")
    assert resolve_gguf(str(tmp_path)) is None


def test_resolve_gguf_none_for_unknown_name(tmp_path):
    assert resolve_gguf(str(tmp_path)) is None  # empty folder
    assert resolve_gguf("definitely-not-an-installed-package-xyz") is None
    assert resolve_gguf("org/name") is None


# ---------------------------------------------------------------- ActivationStream

BLOCK_CONTEXTS, CTX_LEN, BATCH = 2, 8, 12


def _stream(model, tokens, *, seed=0, layers=(0, 2), model_batch=16, batch_size=BATCH):
    return ActivationStream(
        tiny_adapter(model), tokens, list(layers), batch_size, seed=seed, block_contexts=BLOCK_CONTEXTS,
        model_batch=model_batch,
    )


def _take(it, n):
    return list(itertools.islice(it, n))


def _assert_batch_equal(a, b):
    assert a.keys() == b.keys()
    for layer in a:
        assert torch.equal(a[layer][0], b[layer][0])
        assert torch.equal(a[layer][1], b[layer][1])


def test_stream_rejects_bad_tokens(tiny_llama):
    with pytest.raises(ValueError, match="n_ctx"):
        ActivationStream(tiny_adapter(tiny_llama), torch.zeros(0, 8, dtype=torch.long), [0], 4)
    with pytest.raises(ValueError, match="n_ctx"):
        ActivationStream(tiny_adapter(tiny_llama), torch.zeros(8, dtype=torch.long), [0], 4)


def test_stream_batches_have_batch_shape(tiny_model, tiny_tokens):
    stream = _stream(tiny_model, tiny_tokens[:5])
    for batch in _take(stream.batches(), 4):
        assert sorted(batch) == [0, 2]
        for x, y in batch.values():
            assert x.shape == y.shape == (BATCH, D_MODEL)


def test_stream_is_deterministic_for_a_seed(tiny_llama, tiny_tokens):
    a = _take(_stream(tiny_llama, tiny_tokens[:5], seed=7).batches(), 5)
    b = _take(_stream(tiny_llama, tiny_tokens[:5], seed=7).batches(), 5)
    for x, y in zip(a, b):
        _assert_batch_equal(x, y)
    c = _take(_stream(tiny_llama, tiny_tokens[:5], seed=8).batches(), 1)
    assert not torch.equal(a[0][0][0], c[0][0][0])


def test_stream_context_order_is_a_permutation_per_epoch(tiny_llama, tiny_tokens):
    stream = _stream(tiny_llama, tiny_tokens[:5], seed=3)
    for epoch in range(3):
        order = [stream.context_index(epoch * 5 + j) for j in range(5)]
        assert sorted(order) == list(range(5))


@pytest.fixture(scope="module")
def reference_batches(tiny_llama, tiny_tokens):
    """The first 12 batches of a 5-context stream (blocks of 16 tokens, batches of 12)."""
    return _take(_stream(tiny_llama, tiny_tokens[:5], seed=5).batches(0), 12)


@pytest.mark.parametrize("step", [0, 1, 2, 3, 4, 5, 7, 10])
def test_stream_resume_at_step_matches_uninterrupted_stream(tiny_llama, tiny_tokens, reference_batches, step):
    # block_tokens = 16, batch = 12: steps 1, 2, 4, 5, 7, 10 straddle a block boundary, and with
    # 5 contexts in blocks of 2, blocks also straddle epoch boundaries.
    resumed = _take(_stream(tiny_llama, tiny_tokens[:5], seed=5).batches(start_step=step), 2)
    _assert_batch_equal(resumed[0], reference_batches[step])
    _assert_batch_equal(resumed[1], reference_batches[step + 1])


def test_stream_model_batch_does_not_change_the_stream(tiny_llama, tiny_tokens):
    a = _take(_stream(tiny_llama, tiny_tokens[:5], seed=5, model_batch=1).batches(), 4)
    b = _take(_stream(tiny_llama, tiny_tokens[:5], seed=5, model_batch=16).batches(), 4)
    for x, y in zip(a, b):
        for layer in x:
            torch.testing.assert_close(x[layer][0], y[layer][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(x[layer][1], y[layer][1], rtol=1e-5, atol=1e-6)


def _match_rows(got: torch.Tensor, want: torch.Tensor, atol: float) -> torch.Tensor:
    """Index ``perm`` with ``got[i] ~= want[perm[i]]``; asserts it is a bijection."""
    dist = (got.double()[:, None, :] - want.double()[None, :, :]).abs().amax(dim=-1)
    best = dist.argmin(dim=1)
    assert dist.min(dim=1).values.max() <= atol
    assert sorted(best.tolist()) == list(range(want.shape[0])), "some token appears twice or never"
    return best


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stream_epoch_visits_every_token_exactly_once(family, tiny_tokens):
    model = build_tiny_model(family, dtype=torch.float64)
    tokens = tiny_tokens  # 6 contexts = 3 blocks of 2 contexts = one epoch of 48 tokens = 4 batches
    stream = _stream(model, tokens, seed=11, layers=(1,), model_batch=1)
    batches = _take(stream.batches(), tokens.numel() // BATCH)
    got_x = torch.cat([b[1][0] for b in batches])
    got_y = torch.cat([b[1][1] for b in batches])
    x, y = harvest(tiny_adapter(model), tokens, [1])[1]
    want_x, want_y = x.flatten(0, 1), y.flatten(0, 1)
    perm = _match_rows(got_x, want_x, atol=1e-10)
    # Pairs stay together: each shuffled input row comes with its own output row.
    torch.testing.assert_close(got_y, want_y[perm], rtol=0, atol=1e-10)
    # The shuffle mixes contexts: consecutive stream tokens are not consecutive positions.
    assert perm.tolist() != sorted(perm.tolist())
