"""The sparse coder: transcoder, skip transcoder or SAE, with ReLU or TopK activations.

    f      = act(x @ W_enc.T + b_enc)               x: [n, d_in],  f: [n, d_sae]
    y_hat  = f @ W_dec + b_dec (+ x @ W_skip)        y_hat: [n, d_out]

A transcoder (Dunefsky, Chlenski & Nanda 2024, arXiv 2406.11944) is trained so that ``y_hat``
predicts the MLP's output from its input; a skip transcoder adds the affine ``W_skip`` path
(Paulo, Shabalin & Belrose 2025); an SAE predicts its own input. TopK keeps the k largest
pre-activations of each token (Gao et al. 2024); BatchTopK keeps the ``k * n`` largest of a batch
of n tokens and runs as JumpReLU at inference (Bussmann et al. 2024); JumpReLU zeroes
pre-activations below a learned per-feature ``threshold`` (Rajamanoharan et al. 2024); ReLU is
trained with an L1 penalty weighted by decoder row norms (Dunefsky et al. 2024, following
Anthropic's April 2024 update).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CoderConfig
from .kernels import sparse_decode

JUMPRELU_INIT_THRESHOLD = 0.5  # in pre-activation units of normalised data (pre-acts start ~N(0, 1))


class SparseCoder(nn.Module):
    """A sparse coder with weights ``W_enc [d_sae, d_in]``, ``b_enc [d_sae]``,
    ``W_dec [d_sae, d_out]``, ``b_dec [d_out]`` and, for skip transcoders, ``W_skip [d_in, d_out]``.

    Both matrices hold one row per feature (the layout of sparsify and circuit-tracer, and the
    fast one for CPU matmuls): ``W_enc[i]`` is feature i's input direction and ``W_dec[i]`` its
    output direction, so ``W_dec[i] @ W_enc[j]`` is the virtual weight from feature i to j.
    """

    def __init__(self, cfg: CoderConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, **kw))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out, **kw)) if cfg.kind == "skip_transcoder" else None
        # JumpReLU threshold [d_sae]; BatchTopK fits one at the end of training and is saved as JumpReLU.
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, **kw)) if cfg.activation in ("jumprelu", "batchtopk") else None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows; the encoder starts along the decoder rows (when
        ``d_in == d_out``), which puts every feature in a live region at step 0. For TopK the
        encoder rows start at norm 0.1, so the k initial activations add little noise to the
        reconstruction (FVU starts near 1, not near 1.5)."""
        with torch.no_grad():
            w = torch.randn(self.cfg.d_sae, self.cfg.d_out, generator=generator)
            w /= w.norm(dim=1, keepdim=True)
            if self.cfg.activation == "relu":
                w *= 0.1  # small outputs at init keep the L1-weighted loss balanced
            self.W_dec.copy_(w)
            if self.cfg.d_in == self.cfg.d_out:
                enc = w / w.norm(dim=1, keepdim=True)
            else:
                enc = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator)
                enc /= enc.norm(dim=1, keepdim=True)
            if self.cfg.activation in ("topk", "batchtopk"):
                enc *= 0.1
            self.W_enc.copy_(enc)
            self.b_enc.zero_()
            self.b_dec.zero_()
            if self.W_skip is not None:
                self.W_skip.zero_()
            if self.threshold is not None:
                self.threshold.fill_(JUMPRELU_INIT_THRESHOLD if self.cfg.activation == "jumprelu" else 0.0)

    # ------------------------------------------------------------------ encoding
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_enc.T + b_enc``: ``[..., d_in] -> [..., d_sae]``."""
        return F.linear(x, self.W_enc, self.b_enc)

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """TopK encoding in sparse form.

        Returns:
            ``(values [n, k], indices [n, k], pre_acts [n, d_sae])``; values are ReLU'd, so a
            token may have fewer than k non-zero features.
        """
        pre = self.pre_acts(x)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return F.relu(values), indices, pre

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations ``f``: ``[..., d_in] -> [..., d_sae]``.

        BatchTopK coders (while training) encode per token as TopK here; saved ones are JumpReLU.
        """
        if self.cfg.activation == "relu":
            return F.relu(self.pre_acts(x))
        if self.cfg.activation == "jumprelu":
            pre = self.pre_acts(x)
            return pre * (pre > self.threshold)
        values, indices, pre = self.encode_topk(x)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    # ------------------------------------------------------------------ decoding
    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """``f @ W_dec + b_dec (+ x @ W_skip)``: ``[..., d_sae] -> [..., d_out]``."""
        out = f @ self.W_dec + self.b_dec
        return out if self.W_skip is None else out + x @ self.W_skip

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decode k active features per token: touches only k rows of ``W_dec`` per token.

        Args:
            values, indices: ``[n, k]``. x: ``[n, d_in]`` (skip transcoders only).
            mask: optional ``[n, k]`` bool, the entries to decode (see :func:`sparse_decode`).
        Returns:
            ``[n, d_out]``.
        """
        out = sparse_decode(values.to(self.W_dec.dtype), indices, self.W_dec, mask) + self.b_dec
        return out if self.W_skip is None else out + x @ self.W_skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct: ``[..., d_in] -> [..., d_out]`` (the MLP output, for a transcoder)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.cfg.activation in ("topk", "batchtopk"):
            values, indices, _ = self.encode_topk(x)
            y = self.decode_sparse(values, indices, x)
        else:
            y = self.decode(self.encode(x), x)
        return y.reshape(*shape[:-1], self.cfg.d_out)

    # ------------------------------------------------------------------ maintenance
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale ``W_dec`` rows to unit norm (TopK keeps scale in the activations)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def fold_scales(self, scale_in: float, scale_out: float) -> None:
        """Fold fixed data normalisation into the weights.

        A coder trained on ``x * scale_in -> y * scale_out`` becomes one on raw ``x -> y``
        with identical feature activations ``f``.
        """
        self.W_enc *= scale_in
        self.W_dec /= scale_out
        self.b_dec /= scale_out
        if self.W_skip is not None:
            self.W_skip *= scale_in / scale_out
