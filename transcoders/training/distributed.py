"""Multi-process training with ``torchrun`` (torch.distributed: gloo on CPU, NCCL on GPU).

Two modes:
- **data parallel** (default when ``WORLD_SIZE > 1``): rank r harvests its own share of every
  global batch (contexts ``r::world``, its own shuffle seed, ``batch_size / world`` tokens),
  and the losses are normalised by *global* batch statistics, so after summing gradients
  across ranks every rank takes exactly the step a single process would take on the
  concatenated global batch (up to float summation order).
- **layer sharding** (``shard_layers``): every rank runs the same full stream and trains only
  its share of the coders (round-robin over layers/variants); nothing is synchronised during
  training, so each coder is bitwise the one a single process would train.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Reducer:
    """Sums across data-parallel ranks; a no-op in a single process or when sharding layers."""

    world: int = 1
    rank: int = 0
    active: bool = False  # True only for data-parallel training with world > 1
    device: torch.device = torch.device("cpu")  # NCCL reduces CUDA tensors only

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` in place (sum) across ranks; returns it."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def n(self, local: int) -> int:
        """Global token count of a batch whose local share has ``local`` tokens."""
        return local * self.world if self.active else local

    def total_var(self, y: torch.Tensor) -> torch.Tensor:
        """``sum_t ||y_t - mean(y)||^2`` over the global batch (the FVU denominator), no gradient."""
        if not self.active:
            return (y - y.mean(0)).pow(2).sum().detach()
        stats = torch.cat([y.detach().double().sum(0), y.detach().double().pow(2).sum().reshape(1),
                           torch.tensor([y.shape[0]], dtype=torch.float64, device=y.device)])
        self.sum_(stats)
        s, s2, n = stats[:-2], stats[-2], stats[-1]
        return (s2 - s.pow(2).sum() / n).to(y.dtype)

    def grads_(self, params) -> None:
        """Sum gradients across ranks (the per-rank losses are already globally normalised)."""
        if self.active:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def any_(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank (keeps ranks in lockstep)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def init_from_env(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``...); ``(rank, world)``.

    A plain ``python`` run (no ``WORLD_SIZE``) stays single-process and returns ``(0, 1)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_close)
    return dist.get_rank(), dist.get_world_size()


def _close() -> None:
    """Tear the process group down before the interpreter does: a rank that exits with a live gloo
    group while its peer still runs can abort in the group's destructor."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes shared files and prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
