"""Facts about the machine that change what is fast: is bf16 matmul faster than fp32 here?

On CPUs with AMX (Sapphire Rapids and later) a bf16 matmul runs ~5x faster than fp32; on CPUs
without native bf16 (many AMD EPYC and older Intel parts) it is emulated and can be 100x slower.
`precision: auto` measures instead of guessing: two small matmuls, a few milliseconds.
"""

from __future__ import annotations

import functools
import logging
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger("protege")


@functools.lru_cache(maxsize=None)
def bf16_is_fast(device_type: str = "cpu") -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(256, 256, dtype=dtype)
        a @ a  # warm up
        t = time.perf_counter()
        for _ in range(4):
            a @ a
        times[dtype] = time.perf_counter() - t
    fast = times[torch.bfloat16] < 0.7 * times[torch.float32]
    log.info("precision auto: bf16 matmul %.2gx the speed of fp32 on this CPU -> %s",
             times[torch.float32] / max(times[torch.bfloat16], 1e-9), "bf16" if fast else "fp32")
    return fast


def use_bf16(precision: str, device_type: str) -> bool:
    """Resolve train.precision ("fp32" | "bf16" | "auto") to whether to autocast to bf16."""
    if precision == "auto":
        return bf16_is_fast(device_type)
    return precision == "bf16"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for benchmark and report headers."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU flags that decide matmul speed (AVX2, FMA, AVX-512, bf16, AMX), comma-separated."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    return ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "none"
