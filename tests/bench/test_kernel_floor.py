"""The kernel-floor recorder of the benchmarks (tools/bench/kernel_floor.py): it must see every
matmul and attention call of the work, with FLOPs counted from the shapes by hand here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_bd3.standalone.model import ONEDNN_PACKING, Linear
from tools.bench.kernel_floor import kernel_floor


def test_records_counts_and_flops_of_each_call():
    x = torch.randn(2, 5, 8)
    weight, bias = torch.randn(12, 8), torch.randn(12)
    q, k = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 7, 6)
    a, b = torch.randn(5, 8), torch.randn(8, 9)
    packed = Linear(8, 6)  # the standalone network's layer: oneDNN's packed linear here

    def work():
        for _ in range(3):
            F.linear(x, weight, bias)  # 2 * (2*5) * 8 * 12 FLOPs each
        F.scaled_dot_product_attention(q, k, k)  # 4 * (2*3) * 4 * 7 * 6
        torch.mm(a, b)  # 2 * 5 * 8 * 9
        packed(x)  # 2 * 10 * 8 * 6

    floor = kernel_floor(work, repeats=2)
    expected = 3 * 2 * 10 * 8 * 12 + 4 * 6 * 4 * 7 * 6 + 2 * 5 * 8 * 9 + 2 * 10 * 8 * 6
    assert floor.flops == expected
    assert floor.calls == 6 and floor.distinct == 4
    packed_name = "_linear_pointwise" if ONEDNN_PACKING else "linear"
    counts = sorted((row[0], row[2]) for row in floor.table)
    assert counts == sorted([("linear", 3), ("mm", 1), ("scaled_dot_product_attention", 1),
                             (packed_name, 1)])
    assert floor.matmul_seconds > 0 and floor.attention_seconds > 0
    assert floor.seconds == floor.matmul_seconds + floor.attention_seconds
    assert len(floor.rows(limit=2)) == 2


def test_work_without_kernels_has_a_zero_floor():
    floor = kernel_floor(lambda: torch.ones(3).add_(1), repeats=1)
    assert floor.calls == 0 and floor.seconds == 0 and floor.flops == 0
