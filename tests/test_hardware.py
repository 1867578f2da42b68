"""``auto`` precision: bf16 only where the device runs it fast, and the run records the choice."""

from __future__ import annotations

import time

import pytest
import torch

import transcoders.hardware as hardware
from transcoders.training.config import TrainConfig


@pytest.mark.parametrize("fast", [True, False])
def test_auto_precision_follows_the_device(monkeypatch, fast):
    monkeypatch.setattr(hardware, "bf16_is_fast", lambda _device="cpu": fast)
    cfg = TrainConfig().resolved("cpu")
    assert (cfg.precision, cfg.harvest_dtype) == (("bf16", "bfloat16") if fast else ("fp32", "float32"))
    assert TrainConfig(precision="fp32").resolved("cpu").harvest_dtype == "float32"  # auto harvest follows precision
    explicit = TrainConfig(precision="bf16", harvest_dtype="float32")
    assert explicit.resolved("cpu") == explicit  # explicit settings are kept whatever the device


def test_bf16_is_fast_agrees_with_a_timing_of_a_larger_matmul():
    hardware.bf16_is_fast.cache_clear()
    verdict = hardware.bf16_is_fast("cpu")
    a = torch.randn(384, 384)

    def best(dtype):
        x = a.to(dtype)
        x @ x
        return min(_timed(lambda: x @ x) for _ in range(3))

    ratio = best(torch.bfloat16) / best(torch.float32)
    if ratio > 4 or ratio < 0.75:  # a clear case either way (noise may blur ratios in between)
        assert verdict is (ratio < 1), ratio


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
