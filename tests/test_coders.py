"""Tests for transcoders.coders: config validation, the SparseCoder maths, and the file format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from safetensors.torch import save_file

from transcoders.coders import CoderConfig, CoderFileError, SparseCoder, check_compatible, load_coder, save_coder
from transcoders.coders import io as coder_io

KINDS = ["transcoder", "skip_transcoder", "sae"]
ACTIVATIONS = ["relu", "topk"]
D_IN, D_SAE, K = 16, 40, 5

pytestmark = pytest.mark.usefixtures("single_thread")


def make_cfg(kind="transcoder", activation="topk", *, d_in=D_IN, d_out=None, d_sae=D_SAE, k=K, **kw) -> CoderConfig:
    d_out = d_in if d_out is None else d_out
    return CoderConfig(kind=kind, activation=activation, d_in=d_in, d_out=d_out, d_sae=d_sae, k=k, **kw)


def make_coder(kind="transcoder", activation="topk", *, dtype=torch.float32, seed=0, **kw) -> SparseCoder:
    """A coder with every parameter (biases and W_skip included) random and non-zero."""
    torch.manual_seed(seed)
    coder = SparseCoder(make_cfg(kind, activation, **kw), dtype=dtype)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return coder


def _enc_in_by_sae(coder: SparseCoder) -> torch.Tensor:
    """``W_enc`` as ``[d_in, d_sae]`` whichever layout the coder stores (D_IN != D_SAE here)."""
    w = coder.W_enc
    return w if tuple(w.shape) == (coder.cfg.d_in, coder.cfg.d_sae) else w.T


def _x(n=7, d=D_IN, *, dtype=torch.float32, seed=1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------- config


def test_config_topk_k_larger_than_d_sae_rejected():
    with pytest.raises(ValidationError, match="k <= d_sae"):
        make_cfg(k=D_SAE + 1)
    make_cfg(k=D_SAE)  # the boundary is allowed


def test_config_topk_without_k_rejected():
    with pytest.raises(ValidationError, match="topk"):
        make_cfg(k=None)
    assert make_cfg(activation="relu", k=None).k is None  # relu does not need k


def test_config_sae_with_different_widths_rejected():
    with pytest.raises(ValidationError, match="d_in must equal d_out"):
        make_cfg(kind="sae", d_in=8, d_out=9)
    make_cfg(kind="transcoder", d_in=8, d_out=9)  # a transcoder may change width


def test_config_unknown_field_rejected():
    with pytest.raises(ValidationError, match="extra|not permitted"):
        CoderConfig(d_in=4, d_out=4, d_sae=8, k=2, n_features=8)


@pytest.mark.parametrize("field", ["d_in", "d_out", "d_sae", "k"])
def test_config_non_positive_sizes_rejected(field):
    kw = {"d_in": 4, "d_out": 4, "d_sae": 8, "k": 2, field: 0}
    with pytest.raises(ValidationError):
        CoderConfig(**kw)


def test_config_unknown_kind_or_activation_rejected():
    with pytest.raises(ValidationError):
        make_cfg(kind="crosscoder")
    with pytest.raises(ValidationError):
        make_cfg(activation="gelu")


# ---------------------------------------------------------------- SparseCoder


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_coder_parameter_and_output_shapes(kind, activation):
    d_out = D_IN if kind == "sae" else 12
    coder = make_coder(kind, activation, d_out=d_out)
    assert tuple(_enc_in_by_sae(coder).shape) == (D_IN, D_SAE)
    assert coder.b_enc.shape == (D_SAE,)
    assert coder.W_dec.shape == (D_SAE, d_out)
    assert coder.b_dec.shape == (d_out,)
    if kind == "skip_transcoder":
        assert coder.W_skip.shape == (D_IN, d_out)
    else:
        assert coder.W_skip is None
    x = _x(6)
    assert coder.pre_acts(x).shape == (6, D_SAE)
    assert coder.encode(x).shape == (6, D_SAE)
    assert coder(x).shape == (6, d_out)
    assert coder(x.view(2, 3, D_IN)).shape == (2, 3, d_out)


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_coder_init_has_unit_decoder_rows_and_zero_biases(kind):
    coder = SparseCoder(make_cfg(kind, "topk"))
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(D_SAE))
    assert not coder.b_enc.any() and not coder.b_dec.any()
    if kind == "skip_transcoder":
        assert not coder.W_skip.any()


@pytest.mark.parametrize("kind", KINDS)
def test_topk_encode_has_at_most_k_nonzeros_per_token(kind):
    coder = make_coder(kind, "topk")
    f = coder.encode(_x(50))
    assert f.shape == (50, D_SAE)
    assert ((f != 0).sum(dim=-1) <= K).all()
    assert (f >= 0).all()
    # With random weights some tokens should use all k features (sanity: not trivially zero).
    assert ((f != 0).sum(dim=-1) == K).any()


def test_topk_encode_keeps_the_k_largest_preactivations():
    coder = make_coder("transcoder", "topk")
    x = _x(20)
    pre = coder.pre_acts(x)
    f = coder.encode(x)
    kth = pre.topk(K, dim=-1).values[:, -1:]
    expected = torch.where(pre >= kth, pre.clamp_min(0), torch.zeros_like(pre))
    torch.testing.assert_close(f, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_relu_encode_is_relu_of_preactivations(kind):
    coder = make_coder(kind, "relu")
    x = _x(9)
    torch.testing.assert_close(coder.encode(x), torch.relu(x @ _enc_in_by_sae(coder) + coder.b_enc))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_decode_of_encode(kind, activation):
    coder = make_coder(kind, activation)
    for shape in [(11, D_IN), (2, 5, D_IN)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(coder(x), coder.decode(coder.encode(x), x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_topk_forward_gradients_match_dense_path(kind):
    """The sparse decode's custom backward gives the same gradients as the dense matmul path."""
    coder = make_coder(kind, "topk", dtype=torch.float64)
    x = _x(10, dtype=torch.float64)
    target = torch.randn(10, D_IN, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ((coder(x) - target) ** 2).sum().backward()
    sparse_grads = {n: p.grad.clone() for n, p in coder.named_parameters()}
    coder.zero_grad()
    ((coder.decode(coder.encode(x), x) - target) ** 2).sum().backward()
    for n, p in coder.named_parameters():
        torch.testing.assert_close(sparse_grads[n], p.grad, rtol=1e-9, atol=1e-9, msg=n)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_sparse_matches_dense_decode(kind):
    coder = make_coder(kind, "topk")
    x = _x(8)
    values, indices, _ = coder.encode_topk(x)
    torch.testing.assert_close(coder.decode_sparse(values, indices, x), coder.decode(coder.encode(x), x), rtol=1e-5, atol=1e-5)


def test_normalize_decoder_makes_rows_unit_norm():
    coder = make_coder("transcoder", "topk")
    coder.normalize_decoder()
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(D_SAE))


def test_reset_parameters_is_seedable():
    a, b = SparseCoder(make_cfg()), SparseCoder(make_cfg())
    a.reset_parameters(torch.Generator().manual_seed(3))
    b.reset_parameters(torch.Generator().manual_seed(3))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(KINDS),
    activation=st.sampled_from(ACTIVATIONS),
    scale_in=st.floats(0.1, 10.0),
    scale_out=st.floats(0.1, 10.0),
)
def test_fold_scales_gives_raw_space_coder_with_same_features(kind, activation, scale_in, scale_out):
    original = make_coder(kind, activation, dtype=torch.float64)
    folded = make_coder(kind, activation, dtype=torch.float64)
    folded.fold_scales(scale_in, scale_out)
    x = _x(13, dtype=torch.float64)
    torch.testing.assert_close(folded(x), original(x * scale_in) / scale_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(folded.encode(x), original.encode(x * scale_in), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- io


def _assert_same_coder(a: SparseCoder, b: SparseCoder) -> None:
    assert a.cfg == b.cfg
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_save_then_load_is_identity(tmp_path, kind, activation):
    coder = make_coder(
        kind, activation, model_name="tiny", layer=2, hookpoint_in="layers.2.mlp", hookpoint_out="layers.2.mlp",
        training={"lr": 1e-3, "steps": 10, "tags": ["a", "b"], "nested": {"x": None}},
    )
    assert save_coder(coder, tmp_path / "c") == tmp_path / "c"
    loaded = load_coder(tmp_path / "c")
    _assert_same_coder(coder, loaded)
    x = _x(4)
    assert torch.equal(loaded(x), coder(x))
    assert json.loads((tmp_path / "c" / "cfg.json").read_text())["kind"] == kind


def test_save_overwrites_previous_coder(tmp_path):
    save_coder(make_coder(seed=0), tmp_path)
    new = make_coder(seed=1)
    save_coder(new, tmp_path)
    _assert_same_coder(new, load_coder(str(tmp_path)))


def test_save_leaves_no_temporary_files(tmp_path):
    save_coder(make_coder("skip_transcoder"), tmp_path / "c")
    save_coder(make_coder("skip_transcoder", seed=2), tmp_path / "c")
    assert sorted(os.listdir(tmp_path / "c")) == ["cfg.json", "coder.safetensors"]


def test_failed_atomic_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "cfg.json"
    coder_io.atomic_write_bytes(target, b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(coder_io.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        coder_io.atomic_write_bytes(target, b"new")
    with pytest.raises(OSError, match="disk full"):
        coder_io.atomic_save_tensors({"w": torch.ones(2)}, tmp_path / "coder.safetensors")
    assert os.listdir(tmp_path) == ["cfg.json"]
    assert target.read_bytes() == b"old"


@pytest.fixture
def saved(tmp_path) -> Path:
    folder = tmp_path / "coder"
    save_coder(make_coder("skip_transcoder", "topk"), folder)
    return folder


def test_load_missing_folder_raises(tmp_path):
    with pytest.raises(CoderFileError, match="cfg.json"):
        load_coder(tmp_path / "nothing_here")


def test_load_missing_config_raises_naming_it(saved):
    (saved / "cfg.json").unlink()
    with pytest.raises(CoderFileError, match="cfg.json") as err:
        load_coder(saved)
    assert str(saved / "cfg.json") in str(err.value)


def test_load_missing_weights_raises_naming_them(saved):
    (saved / "coder.safetensors").unlink()
    with pytest.raises(CoderFileError) as err:
        load_coder(saved)
    assert str(saved / "coder.safetensors") in str(err.value)


def test_load_truncated_weights_raises_naming_them(saved):
    path = saved / "coder.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CoderFileError) as err:
        load_coder(saved)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 7, b"not a safetensors file at all" * 10, os.urandom(1000)])
def test_load_garbage_weights_raises_naming_them(saved, garbage):
    path = saved / "coder.safetensors"
    path.write_bytes(garbage)
    with pytest.raises(CoderFileError) as err:
        load_coder(saved)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"d_in": 4}', '{"d_in": 4, "d_out": 4, "d_sae": 8, "k": 2, "bogus": 1}'])
def test_load_invalid_config_raises_naming_it(saved, text):
    (saved / "cfg.json").write_text(text)
    with pytest.raises(CoderFileError) as err:
        load_coder(saved)
    assert str(saved / "cfg.json") in str(err.value)


def test_load_non_utf8_config_raises_naming_it(saved):
    (saved / "cfg.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CoderFileError) as err:
        load_coder(saved)
    assert str(saved / "cfg.json") in str(err.value)


def test_load_wrong_tensor_shape_raises_naming_file(saved):
    path = saved / "coder.safetensors"
    coder = make_coder("skip_transcoder", "topk")
    tensors = {name: p.detach().clone() for name, p in coder.named_parameters()}
    tensors["W_dec"] = torch.zeros(D_SAE, D_IN + 1)
    save_file(tensors, str(path))
    with pytest.raises(CoderFileError, match="does not match") as err:
        load_coder(saved)
    assert str(path) in str(err.value)


def test_load_missing_or_extra_tensor_raises(saved):
    path = saved / "coder.safetensors"
    coder = make_coder("skip_transcoder", "topk")
    tensors = {name: p.detach().clone() for name, p in coder.named_parameters()}
    del tensors["W_skip"]
    save_file(tensors, str(path))
    with pytest.raises(CoderFileError, match="W_skip"):
        load_coder(saved)
    tensors["W_skip"] = torch.zeros(D_IN, D_IN)
    tensors["extra"] = torch.zeros(1)
    save_file(tensors, str(path))
    with pytest.raises(CoderFileError, match="extra"):
        load_coder(saved)


def test_check_compatible_rejects_wrong_width():
    coder = make_coder(layer=1, model_name="tiny")
    check_compatible(coder, d_model=D_IN, n_layers=3)  # fine
    with pytest.raises(CoderFileError, match="d_model"):
        check_compatible(coder, d_model=D_IN * 2, n_layers=3)


def test_check_compatible_rejects_wrong_output_width():
    coder = make_coder(d_out=D_IN + 1, layer=0)
    with pytest.raises(CoderFileError, match="d_model"):
        check_compatible(coder, d_model=D_IN, n_layers=3)


@pytest.mark.parametrize("layer", [-1, 3, 10])
def test_check_compatible_rejects_layer_out_of_range(layer):
    coder = make_coder(layer=layer)
    with pytest.raises(CoderFileError, match="layers"):
        check_compatible(coder, d_model=D_IN, n_layers=3)


def test_check_compatible_accepts_unknown_layer():
    check_compatible(make_coder(layer=None), d_model=D_IN, n_layers=3)


def test_save_fsyncs_both_files_before_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else str(fd))
        return real_fsync(fd)

    monkeypatch.setattr(coder_io.os, "fsync", spy)
    save_coder(make_coder(), tmp_path)
    names = [Path(p).name for p in synced]
    assert any(n.startswith(".cfg.json.") for n in names)
    assert any(n.startswith(".coder.safetensors.") for n in names)
