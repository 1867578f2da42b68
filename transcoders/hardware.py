"""What the hardware does fast: whether bfloat16 matmuls pay off on a device.

On CPUs with native bfloat16 (AVX512-BF16, AMX) a bf16 matmul runs 2x as fast as fp32; on CPUs
without it (AVX2 only) torch's bf16 matmul is emulated and runs at well under 1% of fp32 speed
(0.3 against 171 GFLOP/s, measured on a 2-core AMD EPYC with AVX2). The ``auto`` precision
settings pick bf16 only where it is fast.
"""

from __future__ import annotations

import functools
import time

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
    a = torch.randn(192, 192)

    def best(dtype: torch.dtype) -> float:
        x = a.to(dtype)
        x @ x  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.bfloat16) <= 1.5 * best(torch.float32)
