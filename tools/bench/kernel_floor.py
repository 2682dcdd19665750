"""The kernel floor of a piece of torch work: what its matmuls and attention calls cost alone.

    floor = kernel_floor(lambda: generate(network, 256, num_samples=16))
    floor.seconds, floor.flops, floor.rows()

The work is run once under a dispatch mode that records every matrix product (linear, mm,
addmm, bmm, matmul, oneDNN's packed linear) and every scaled-dot-product attention with its
shapes. Each distinct call is then timed alone, on the inputs of its first occurrence (kept), warm,
with the current thread count (median of a few repeats), and the floor is the sum over calls of
those times.

Why this is a floor: any implementation of the same computation runs these very kernels; timed
alone they have the cache to themselves and nothing else around them, so no end-to-end run of
the work can be faster than this sum on the same machine (short of fewer FLOPs or better
kernels than torch's). It makes a target checkable on the machine at hand: if the floor is
already slower than the target, no overhead cut can meet it. FLOPs: 2·M·K·N per product,
4·b·h·s_q·s_kv·hd per attention call (scores and values, every score computed).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_MATMULS = {"linear", "mm", "addmm", "bmm", "matmul", "baddbmm", "_linear_pointwise"}
_ATTENTION = "scaled_dot_product_attention"


def _spec(value):
    """A hashable description of one argument: tensors by shape and dtype, the rest as is."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_spec(v) for v in value)
    return value


def _flops(name: str, args: tuple) -> float:
    shapes = [a[1] for a in args if isinstance(a, tuple) and a and a[0] == "tensor"]
    if name == _ATTENTION:
        q, k = shapes[0], shapes[1]
        batch = 1
        for size in q[:-2]:
            batch *= size
        return 4.0 * batch * q[-2] * k[-2] * q[-1]
    if name in ("addmm", "baddbmm"):
        shapes = shapes[1:]  # the added input
    a, b = shapes[0], shapes[1]
    if name in ("linear", "_linear_pointwise"):  # weight [N, K]
        rows = 1
        for size in a[:-1]:
            rows *= size
        return 2.0 * rows * a[-1] * b[0]
    batch = 1
    for size in a[:-2]:
        batch *= size
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()
        self.ops: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _MATMULS or name == _ATTENTION:
            key = (name, _spec(args), _spec(tuple(sorted(kwargs.items()))))
            self.calls[key] += 1
            self.ops.setdefault(key, (func, args, kwargs))
        return func(*args, **kwargs)


@dataclass
class KernelFloor:
    matmul_seconds: float  # sum over matmul calls of each call's time alone
    attention_seconds: float
    matmul_flops: float
    attention_flops: float
    calls: int
    distinct: int
    table: list[tuple[str, str, int, float, float]]  # name, shapes, count, s each, FLOP each

    @property
    def seconds(self) -> float:
        """The floor: every recorded call, each timed alone."""
        return self.matmul_seconds + self.attention_seconds

    @property
    def flops(self) -> float:
        return self.matmul_flops + self.attention_flops

    def rows(self, limit: int = 8) -> list[str]:
        """The heaviest distinct calls, one line each."""
        ranked = sorted(self.table, key=lambda r: -r[2] * r[3])[:limit]
        return [f"{count:6d} x {name:28s} {shapes:60s} {each * 1e6:8.1f} us "
                f"{flop / each / 1e9 if each else 0:6.1f} GFLOP/s"
                for name, shapes, count, each, flop in ranked]


def kernel_floor(work: Callable[[], object], repeats: int = 7) -> KernelFloor:
    """Run ``work`` once recording its matmul and attention calls, then time each distinct call
    alone (median of ``repeats`` after a warm-up) and add them up."""
    recorder = _Recorder()
    with torch.inference_mode():
        with recorder:
            work()
        table = []
        for key, count in recorder.calls.items():
            name, args, _ = key
            func, inputs, options = recorder.ops[key]
            func(*inputs, **options)
            walls = []
            for _ in range(repeats):
                start = time.perf_counter()
                func(*inputs, **options)
                walls.append(time.perf_counter() - start)
            shapes = " ".join(str(list(a[1])) for a in args
                              if isinstance(a, tuple) and a and a[0] == "tensor")
            table.append((name, shapes, count, statistics.median(walls), _flops(name, args)))
    return KernelFloor(
        matmul_seconds=sum(c * t for n, _, c, t, _ in table if n != _ATTENTION),
        attention_seconds=sum(c * t for n, _, c, t, _ in table if n == _ATTENTION),
        matmul_flops=sum(c * f for n, _, c, _, f in table if n != _ATTENTION),
        attention_flops=sum(c * f for n, _, c, _, f in table if n == _ATTENTION),
        calls=sum(recorder.calls.values()),
        distinct=len(table), table=table,
    )
