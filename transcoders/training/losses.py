"""Training objectives, one function per activation. All take normalised data
(``E||x||^2 = d_in``, ``E||y||^2 = d_out``) and return a :class:`StepResult`.

Reconstruction is measured as FVU, ``sum ||y - y_hat||^2 / sum ||y - mean(y)||^2`` over the batch,
which is scale-free, so coefficients mean the same thing at every layer. Under data-parallel
training the denominator and token counts are those of the global batch (``red``), so each
rank's loss is its share of the global loss and summed gradients are the global gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..coders.coder import SparseCoder
from ..coders.kernels import sparse_decode, sparse_topk_encode
from .config import TrainConfig
from .distributed import Reducer

_SINGLE = Reducer()


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar, differentiable
    fvu: torch.Tensor  # scalar
    l0: torch.Tensor  # scalar, mean active features per token
    counts: torch.Tensor  # [d_sae] int64, tokens on which each feature was active
    threshold: float | None = None  # BatchTopK: this batch's smallest kept activation


def _fvu(y: torch.Tensor, y_hat: torch.Tensor, red: Reducer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This shard's share of the global batch's FVU (sums to the FVU across ranks)."""
    err = y - y_hat
    total_var = red.total_var(y)
    return err.pow(2).sum() / total_var, err, total_var


def _auxk(coder: SparseCoder, err: torch.Tensor, total_var: torch.Tensor, aux_values, aux_indices) -> torch.Tensor:
    """AuxK (Gao et al. 2024): dead features reconstruct the residual error. The selection may
    cover only the batch's first ``m`` tokens (a random subset: batches are shuffled); their
    squared error is scaled by ``n / m`` so the loss keeps its full-batch expectation."""
    m = aux_values.shape[0]
    aux_values = F.relu(aux_values)  # dead features mostly sit below zero: decode only the positive ones
    err_hat = sparse_decode(aux_values, aux_indices, coder.W_dec, aux_values > 0)
    return (err[:m].detach() - err_hat).pow(2).sum() * (err.shape[0] / m) / total_var


def _aux_args(cfg: TrainConfig, coder: SparseCoder, dead: torch.Tensor) -> dict:
    """The AuxK part of :func:`sparse_topk_encode`'s arguments: ``k_aux = min(d_out / 2, dead)``
    (Gao et al. 2024) over ``cfg.auxk_tokens`` tokens of the batch."""
    k_aux = min(coder.cfg.d_out // 2, int(dead.sum())) if cfg.auxk_coefficient > 0 else 0
    return {"dead": dead if k_aux else None, "k_aux": k_aux, "aux_rows": cfg.auxk_tokens}


def _matmul_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def current_k(cfg: TrainConfig, k: int, step: int) -> int:
    """The TopK / BatchTopK k at ``step``: ``cfg.k_start`` at step 0, linearly down to the coder's
    ``k`` over the first ``cfg.k_anneal_fraction`` of the steps, then ``k`` (constant without
    ``k_start``). More features per token early gives more features gradient while the
    dictionary forms."""
    if cfg.k_start is None or cfg.k_start == k:
        return k
    frac = min(1.0, step / max(1.0, cfg.k_anneal_fraction * cfg.total_steps))
    return max(1, round(cfg.k_start + (k - cfg.k_start) * frac))


def topk_loss(cfg: TrainConfig, coder: SparseCoder, x, y, dead: torch.Tensor, step: int, red: Reducer = _SINGLE) -> StepResult:
    """TopK (Gao et al. 2024) with AuxK; encoder and decoder backward touch only active features."""
    aux = _aux_args(cfg, coder, dead)
    k = min(coder.cfg.d_sae, current_k(cfg, coder.cfg.k, step))
    values, indices, aux_values, aux_indices = sparse_topk_encode(
        x, coder.W_enc, coder.b_enc, k, matmul_dtype=_matmul_dtype(cfg), **aux)
    values = F.relu(values)
    fvu, err, total_var = _fvu(y, coder.decode_sparse(values, indices, x), red)
    loss = fvu + cfg.auxk_coefficient * _auxk(coder, err, total_var, aux_values, aux_indices) if aux["k_aux"] else fvu
    active = values > 0
    counts = torch.bincount(indices[active], minlength=coder.cfg.d_sae)
    return StepResult(loss, fvu, active.sum() / x.shape[0], counts)


def batchtopk_loss(
    cfg: TrainConfig, coder: SparseCoder, x, y, dead: torch.Tensor, step: int, red: Reducer = _SINGLE
) -> StepResult:
    """BatchTopK (Bussmann, Leask & Nanda 2024): keep the ``k * n`` largest activations of the
    whole batch, so tokens may use more or fewer than k features. Candidates are each token's
    top ``4k`` (a token can use at most 4k features), which keeps the work sparse."""
    k = current_k(cfg, coder.cfg.k, step)
    k_row = min(coder.cfg.d_sae, 4 * k)
    aux = _aux_args(cfg, coder, dead)
    values, indices, aux_values, aux_indices = sparse_topk_encode(
        x, coder.W_enc, coder.b_enc, k_row, matmul_dtype=_matmul_dtype(cfg), **aux)
    values = F.relu(values)
    n_keep = min(k_row, k) * x.shape[0]
    # Exactly k * n entries (a threshold test would keep every tie at the boundary, e.g. the
    # identical activations of repeated text).
    top = values.detach().flatten().topk(n_keep, sorted=False).indices
    keep = torch.zeros(values.numel(), dtype=torch.bool, device=values.device).index_fill_(0, top, True)
    keep = keep.view_as(values) & (values > 0)
    values = values * keep
    fvu, err, total_var = _fvu(y, coder.decode_sparse(values, indices, x, mask=keep), red)
    loss = fvu + cfg.auxk_coefficient * _auxk(coder, err, total_var, aux_values, aux_indices) if aux["k_aux"] else fvu
    counts = torch.bincount(indices[keep], minlength=coder.cfg.d_sae)
    threshold = float(values.detach()[keep].min()) if bool(keep.any()) else None
    return StepResult(loss, fvu, keep.sum() / x.shape[0], counts, threshold=threshold)


class _JumpReLU(torch.autograd.Function):
    """``pre * H(pre - theta)`` with the straight-through pseudo-derivative of Rajamanoharan et al.
    (2024) for theta: ``-(theta / eps) * K((pre - theta) / eps)``, K the unit rectangle."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        window = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        return grad * (pre > theta), (-(theta / eps) * window * grad).sum(0), None


class _Step(torch.autograd.Function):
    """``H(pre - theta)`` (counts toward L0); pseudo-derivative ``-(1 / eps) K((pre - theta) / eps)``
    for theta, none for pre."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        window = ((pre - theta).abs() < ctx.eps / 2).to(grad.dtype)
        return None, (-(1.0 / ctx.eps) * window * grad).sum(0), None


def jumprelu_loss(
    cfg: TrainConfig, coder: SparseCoder, x, y, _dead: torch.Tensor, step: int, red: Reducer = _SINGLE
) -> StepResult:
    """JumpReLU trained directly: FVU + lambda * L0, with straight-through estimates for the
    thresholds (Rajamanoharan et al. 2024, "Jumping Ahead"); lambda warms up like the L1."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        pre = coder.pre_acts(x)
    pre = pre.float()
    f = _JumpReLU.apply(pre, coder.threshold, cfg.jumprelu_bandwidth)
    l0 = _Step.apply(pre, coder.threshold, cfg.jumprelu_bandwidth).sum() / red.n(x.shape[0])
    fvu, _, _ = _fvu(y, coder.decode(f, x), red)
    lam = cfg.l0_coefficient * _warmup(cfg, step)
    counts = (f > 0).sum(0)
    return StepResult(fvu + lam * l0, fvu, l0.detach(), counts)


def relu_loss(cfg: TrainConfig, coder: SparseCoder, x, y, _dead: torch.Tensor, step: int, red: Reducer = _SINGLE) -> StepResult:
    """ReLU + L1 weighted by decoder row norms (Dunefsky et al. 2024; Anthropic, April 2024):
    FVU + lambda * mean_t sum_i f_i ||W_dec_i|| / sqrt(d_out)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        pre = coder.pre_acts(x)
    f = F.relu(pre.float())
    fvu, _, _ = _fvu(y, coder.decode(f, x), red)
    l1 = (f * coder.W_dec.norm(dim=1)).sum() / (red.n(x.shape[0]) * math.sqrt(coder.cfg.d_out))
    active = f > 0
    return StepResult(fvu + cfg.l1_coefficient * _warmup(cfg, step) * l1, fvu, active.sum() / x.shape[0], active.sum(0))


def _warmup(cfg: TrainConfig, step: int) -> float:
    return min(1.0, (step + 1) / max(1.0, cfg.l1_warmup_fraction * cfg.total_steps))


LOSSES = {"topk": topk_loss, "batchtopk": batchtopk_loss, "jumprelu": jumprelu_loss, "relu": relu_loss}
