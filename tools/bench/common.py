"""Small measurement helpers shared by the benchmark entry points (tools/bench/__main__.py and
train_step_bench.py): machine/version description, peak RSS, a measured matmul rate, medians.

CPU time (`time.process_time`, all threads of the process) is recorded next to wall time
everywhere: the development machines are shared, and wall time then includes waiting for a core
while CPU time counts only this process's own work (at the price of counting spin-waiting
threads too).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    """1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def versions() -> dict[str, str]:
    """Versions of the stack a benchmark ran on."""
    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        from megatron.core import __version__ as megatron_version

        info["megatron-core"] = megatron_version
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["deepspeed"] = version("deepspeed")
    except Exception:  # noqa: BLE001 - optional, only reported
        pass
    return info


def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without it bf16 matmuls
    take an emulated path: on a Zen 3 (AVX2) a 256 x 256 by 1024 x 256 bf16 ``F.linear`` ran at
    17 GFLOP/s against 107 in fp32, so bf16 inference there is slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def machine() -> dict[str, Any]:
    """CPU (with the vector ISA torch dispatches to and native bf16 support), cores, memory,
    GPU (if any) and the load average now."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_gib = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_1min": round(load_average(), 2),
    }


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_flops(size: int = 2048, repeats: int = 7) -> dict[str, float]:
    """Measured fp32 matmul rate with the current torch thread count: median and best of
    `repeats` size³ products, in FLOP/s (2·size³ per product). The stand-in for the machine's
    peak, since a CPU's nominal peak is not what torch reaches."""
    generator = torch.Generator().manual_seed(0)  # leaves the training RNG streams alone
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        walls.append(time.perf_counter() - start)
    flops = 2.0 * size**3
    return {"median": flops / statistics.median(walls), "best": flops / min(walls)}


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")
