"""What the hardware does fast (whether bfloat16 matmuls pay off on a device), and how much
memory this process holds.

On CPUs with native bfloat16 (AVX512-BF16, AMX) a bf16 matmul runs 2x as fast as fp32; on CPUs
without it (AVX2 only) torch's bf16 matmul is emulated and runs at well under 1% of fp32 speed
(0.3 against 171 GFLOP/s, measured on a 2-core AMD EPYC with AVX2). The ``auto`` precision
settings pick bf16 only where it is fast.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch


@functools.cache
def bf16_is_fast(device_type: str = "cpu") -> bool:
    """Whether bfloat16 matmuls on ``device_type`` are at least about as fast as float32.

    CUDA: the GPU supports bf16. CPU: a 192 x 192 matmul is timed in both dtypes (a few
    milliseconds; the answer is cached for the process).
    """
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type != "cpu":
        return False
    # One thread, a 256 x 256 matmul and the best of several runs: a loaded machine (other
    # processes, OpenMP threads waking) inflated the old 2-thread 192 x 192 probe's float32 time
    # enough to call emulated bf16 fast once. Emulated bf16 is two orders of magnitude slower, so
    # its timing stops at the first run that is clearly slow.
    a = torch.randn(256, 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def timed(x: torch.Tensor) -> float:
            t = time.perf_counter()
            x @ x
            return time.perf_counter() - t

        x32 = a.float()
        timed(x32)  # warm-up
        fp32 = min(timed(x32) for _ in range(5))
        x16 = a.bfloat16()
        timed(x16)
        bf16 = float("inf")
        for _ in range(3):
            bf16 = min(bf16, timed(x16))
            if bf16 > 10 * fp32:
                break
        return bf16 <= 1.5 * fp32
    finally:
        torch.set_num_threads(threads)


def resident_bytes() -> int | None:
    """This process's resident memory now, in bytes (Linux ``/proc/self/statm``); None where it
    cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")
