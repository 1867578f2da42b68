"""Tests for transcoders.coders.kernels: the sparse TopK encoder and sparse decoder give the
same values and gradients as a dense autograd reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transcoders.coders.kernels import scatter_rows, sparse_decode, sparse_topk_encode

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-5, atol=1e-5)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _encoder(n, d_in, d_sae, dtype, seed):
    g = _gen(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64).to(dtype)
    W = torch.randn(d_sae, d_in, generator=g, dtype=torch.float64).to(dtype)
    b = (0.5 * torch.randn(d_sae, generator=g, dtype=torch.float64)).to(dtype)
    return x, W, b


def _dense_pre(x, W, b):
    """Reference pre-activations in float64 with autograd through W and b."""
    return x.double() @ W.double().T + b.double()


def _assert_is_topk(selected_idx: torch.Tensor, scores: torch.Tensor, tol: float = 1e-4) -> None:
    """``selected_idx`` [n, k] holds distinct features whose ``scores`` are >= every unselected one."""
    n, k = selected_idx.shape
    if k == 0:
        return
    assert all(len(set(row.tolist())) == k for row in selected_idx), "duplicate feature in a token's selection"
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, selected_idx, True)
    sel_min = scores.masked_fill(~mask, float("inf")).min(1).values
    rest_max = scores.masked_fill(mask, float("-inf")).max(1).values
    assert bool((sel_min >= rest_max - tol).all()), "selection is not the top k"


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    d_in=st.integers(1, 12),
    d_sae=st.integers(2, 40),
    k_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_sparse_topk_encode_matches_dense_reference_values_and_gradients(n, d_in, d_sae, k_frac, dtype, seed):
    k = max(1, min(d_sae, round(k_frac * d_sae)))
    x, W, b = _encoder(n, d_in, d_sae, dtype, seed)
    W.requires_grad_(True)
    b.requires_grad_(True)
    values, indices, aux_values, aux_indices = sparse_topk_encode(x, W, b, k, matmul_dtype=torch.float32)
    assert values.shape == indices.shape == (n, k)
    assert aux_values.shape == aux_indices.shape == (n, 0)
    assert indices.dtype == torch.int64

    W_ref = W.detach().double().requires_grad_(True)
    b_ref = b.detach().double().requires_grad_(True)
    pre = _dense_pre(x, W_ref, b_ref)
    _assert_is_topk(indices, pre.detach())
    ref_values = pre.gather(1, indices)
    torch.testing.assert_close(values.double(), ref_values.detach(), **TOL[dtype])

    # A non-linear loss of the values (ReLU then squares, as the trainer's pipeline does).
    g = _gen(seed + 1)
    w1 = torch.randn(n, k, generator=g, dtype=torch.float64)
    loss = (torch.relu(values.double()) * w1).sum() + values.double().pow(2).sum()
    loss_ref = (torch.relu(ref_values) * w1).sum() + ref_values.pow(2).sum()
    loss.backward()
    loss_ref.backward()
    assert W.grad is not None and W.grad.dtype == W.dtype and W.grad.shape == W.shape
    assert b.grad is not None and b.grad.dtype == b.dtype and b.grad.shape == b.shape
    torch.testing.assert_close(W.grad.double(), W_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.grad.double(), b_ref.grad, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    d_in=st.integers(1, 12),
    d_sae=st.integers(2, 40),
    k_frac=st.floats(0.0, 1.0),
    dead_frac=st.floats(0.0, 1.0),
    aux_frac=st.floats(0.0, 1.0),
    rows_frac=st.one_of(st.none(), st.floats(0.0, 1.0)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_sparse_topk_encode_auxk_matches_dense_reference(n, d_in, d_sae, k_frac, dead_frac, aux_frac, rows_frac, dtype, seed):
    k = max(1, min(d_sae, round(k_frac * d_sae)))
    x, W, b = _encoder(n, d_in, d_sae, dtype, seed)
    W.requires_grad_(True)
    b.requires_grad_(True)
    dead = torch.rand(d_sae, generator=_gen(seed + 2)) < dead_frac
    if not dead.any():
        dead[seed % d_sae] = True
    n_dead = int(dead.sum())
    k_aux = max(1, min(n_dead, round(aux_frac * n_dead)))

    m = n if rows_frac is None else max(1, round(rows_frac * n))  # AuxK on the first m tokens only

    values, indices, aux_values, aux_indices = sparse_topk_encode(
        x, W, b, k, dead=dead, k_aux=k_aux, matmul_dtype=torch.float32, aux_rows=None if rows_frac is None else m)
    assert aux_values.shape == aux_indices.shape == (m, k_aux)

    W_ref = W.detach().double().requires_grad_(True)
    b_ref = b.detach().double().requires_grad_(True)
    pre = _dense_pre(x, W_ref, b_ref)
    # main selection: top k over all features (dead ones included)
    _assert_is_topk(indices, pre.detach())
    # aux selection: only dead features, and the top k_aux of them
    assert bool(dead[aux_indices].all()), "aux selection contains a live feature"
    _assert_is_topk(aux_indices, pre.detach()[:m].masked_fill(~dead, float("-inf")))
    ref_values, ref_aux = pre.gather(1, indices), pre[:m].gather(1, aux_indices)
    torch.testing.assert_close(values.double(), ref_values.detach(), **TOL[dtype])
    torch.testing.assert_close(aux_values.double(), ref_aux.detach(), **TOL[dtype])

    # gradients flow through both value tensors (features may appear in both)
    g = _gen(seed + 3)
    w1 = torch.randn(n, k, generator=g, dtype=torch.float64)
    w2 = torch.randn(m, k_aux, generator=g, dtype=torch.float64)
    loss = (values.double() * w1).sum() + (aux_values.double() * w2).sum() + 0.5 * aux_values.double().pow(2).sum()
    loss_ref = (ref_values * w1).sum() + (ref_aux * w2).sum() + 0.5 * ref_aux.pow(2).sum()
    loss.backward()
    loss_ref.backward()
    torch.testing.assert_close(W.grad.double(), W_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.grad.double(), b_ref.grad, rtol=1e-4, atol=1e-4)


def test_sparse_topk_encode_aux_gradient_reaches_only_dead_features():
    x, W, b = _encoder(6, 8, 20, torch.float32, 7)
    W.requires_grad_(True)
    b.requires_grad_(True)
    dead = torch.zeros(20, dtype=torch.bool)
    dead[[1, 5, 9, 13]] = True
    _, _, aux_values, aux_indices = sparse_topk_encode(x, W, b, 3, dead=dead, k_aux=2)
    aux_values.sum().backward()
    touched = (W.grad.abs().sum(1) > 0) | (b.grad != 0)
    assert touched.any()
    assert set(touched.nonzero().flatten().tolist()) <= {1, 5, 9, 13}
    # each selected (token, feature) adds 1 to b's gradient
    expected_b = torch.bincount(aux_indices.flatten(), minlength=20).float()
    torch.testing.assert_close(b.grad, expected_b)


def test_sparse_topk_encode_without_dead_ignores_k_aux():
    x, W, b = _encoder(4, 5, 10, torch.float32, 1)
    _, _, aux_values, aux_indices = sparse_topk_encode(x, W, b, 3, dead=None, k_aux=4)
    assert aux_values.shape == aux_indices.shape == (4, 0)


def test_sparse_topk_encode_bf16_matmul_is_close_to_float32():
    x, W, b = _encoder(16, 24, 48, torch.float32, 3)
    v32, i32, _, _ = sparse_topk_encode(x, W, b, 6, matmul_dtype=torch.float32)
    v16, i16, _, _ = sparse_topk_encode(x, W, b, 6, matmul_dtype=torch.bfloat16)
    assert v16.dtype == torch.float32
    ref = _dense_pre(x, W, b)
    # values are the bf16 pre-activations of the chosen features (bf16 rounding only)
    torch.testing.assert_close(v16.double(), ref.gather(1, i16), rtol=3e-2, atol=3e-2)
    _assert_is_topk(i16, ref, tol=0.2)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    k=st.integers(1, 6),
    d_sae=st.integers(1, 30),
    d_out=st.integers(1, 12),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_sparse_decode_matches_dense_reference_values_and_gradients(n, k, d_sae, d_out, dtype, seed):
    """Also with repeated indices within a token, which must add up."""
    g = _gen(seed)
    values = torch.randn(n, k, generator=g, dtype=dtype).requires_grad_(True)
    indices = torch.randint(0, d_sae, (n, k), generator=g)
    W = torch.randn(d_sae, d_out, generator=g, dtype=dtype).requires_grad_(True)
    out = sparse_decode(values, indices, W)
    assert out.shape == (n, d_out) and out.dtype == dtype

    v_ref = values.detach().clone().requires_grad_(True)
    W_ref = W.detach().clone().requires_grad_(True)
    ref = (v_ref[..., None] * W_ref[indices]).sum(1)
    torch.testing.assert_close(out, ref, **TOL[dtype])

    target = torch.randn(n, d_out, generator=g, dtype=dtype)
    (out - target).pow(2).sum().backward()
    (ref - target).pow(2).sum().backward()
    torch.testing.assert_close(values.grad, v_ref.grad, **TOL[dtype])
    torch.testing.assert_close(W.grad, W_ref.grad, **TOL[dtype])


def test_sparse_decode_gradient_only_for_requested_inputs():
    g = _gen(0)
    values = torch.randn(3, 2, generator=g)
    indices = torch.randint(0, 5, (3, 2), generator=g)
    W = torch.randn(5, 4, generator=g).requires_grad_(True)
    sparse_decode(values, indices, W).sum().backward()
    assert values.grad is None
    touched = set((W.grad.abs().sum(1) > 0).nonzero().flatten().tolist())
    assert touched <= set(indices.flatten().tolist())


def test_sparse_encode_then_decode_chain_matches_dense_autograd():
    """The trainer's composition: encode -> ReLU -> decode, gradients to W_enc, b_enc and W_dec."""
    x, W_enc, b_enc = _encoder(10, 8, 24, torch.float64, 11)
    W_dec = torch.randn(24, 8, generator=_gen(12), dtype=torch.float64)
    target = torch.randn(10, 8, generator=_gen(13), dtype=torch.float64)
    params = [p.clone().requires_grad_(True) for p in (W_enc, b_enc, W_dec)]
    ref_params = [p.clone().requires_grad_(True) for p in (W_enc, b_enc, W_dec)]

    values, indices, _, _ = sparse_topk_encode(x, params[0], params[1], 4)
    out = sparse_decode(torch.relu(values).double(), indices, params[2])
    (out - target).pow(2).sum().backward()

    pre = x @ ref_params[0].T + ref_params[1]
    f = torch.zeros_like(pre).scatter(1, indices, torch.relu(pre.gather(1, indices)))
    (f @ ref_params[2] - target).pow(2).sum().backward()
    for p, q, name in zip(params, ref_params, ("W_enc", "b_enc", "W_dec")):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), kk=st.integers(1, 6), n_rows=st.integers(1, 30), d=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_scatter_rows_matches_dense_reference_with_repeated_rows(n, kk, n_rows, d, dtype, seed):
    # repeats within a token happen when an AuxK pick is also a TopK pick: both must add up
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, n_rows, (n * kk,), generator=g)
    tokens = torch.arange(n).repeat_interleave(kk)
    weights, rhs = torch.randn(n * kk, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)
    dense = torch.zeros(n_rows, n, dtype=dtype)
    for r, t, w in zip(rows.tolist(), tokens.tolist(), weights.tolist()):
        dense[r, t] += w
    out = scatter_rows(rows, tokens, weights, rhs, n_rows)
    assert out.shape == (n_rows, d) and out.dtype == dtype
    torch.testing.assert_close(out, dense @ rhs, **TOL[dtype])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 6), d_sae=st.integers(1, 30), d_out=st.integers(1, 12),
       keep=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_masked_sparse_decode_equals_decoding_only_the_kept_entries(n, k, d_sae, d_out, keep, seed):
    """Masked-out entries are absent: no output, no gradient (also for tokens with none kept)."""
    g = _gen(seed)
    values = torch.randn(n, k, generator=g, dtype=torch.float64).requires_grad_(True)
    indices = torch.randint(0, d_sae, (n, k), generator=g)
    mask = torch.rand(n, k, generator=g) < keep
    W = torch.randn(d_sae, d_out, generator=g, dtype=torch.float64).requires_grad_(True)
    out = sparse_decode(values, indices, W, mask)

    v_ref = values.detach().clone().requires_grad_(True)
    W_ref = W.detach().clone().requires_grad_(True)
    ref = ((v_ref * mask)[..., None] * W_ref[indices]).sum(1)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    target = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    (out - target).pow(2).sum().backward()
    (ref - target).pow(2).sum().backward()
    torch.testing.assert_close(values.grad, v_ref.grad, **TOL[torch.float64])
    torch.testing.assert_close(W.grad, W_ref.grad, **TOL[torch.float64])
    assert (values.grad[~mask] == 0).all()
