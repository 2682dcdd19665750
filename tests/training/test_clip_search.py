"""Clip search: argmin of the mean per-batch unbiased variance; a 2-rank gather equals 1 process."""

from pathlib import Path

import pytest
import torch

from megatron_bd3.training.clip_search import ClipSearchAccumulator, select_clip_range
from tests.dist_launcher import run_distributed

WORKER = Path(__file__).parent / "workers" / "clip_search_gather.py"


def test_variances_and_argmin_match_a_brute_force_table():
    g = torch.Generator().manual_seed(0)
    candidates = [(1e-3, 1.0), (0.0, 0.5), (0.3, 0.8), (0.5, 1.0)]
    scales = [3.0, 1.0, 0.5, 2.0]  # candidate 2 has the smallest spread
    acc = ClipSearchAccumulator(candidates)
    brute = []
    for c, scale in enumerate(scales):
        per_batch = []
        for _ in range(4):
            block_loss = torch.randn(6, 8, generator=g) * scale + 5.0
            acc.add(c, block_loss)
            flat = block_loss.flatten().tolist()
            mean = sum(flat) / len(flat)
            per_batch.append(sum((v - mean) ** 2 for v in flat) / (len(flat) - 1))
        brute.append(sum(per_batch) / len(per_batch))
    got = acc.variances()
    assert got == pytest.approx(brute, rel=1e-9)
    assert select_clip_range(candidates, got) == (0.3, 0.8)
    assert select_clip_range(["a", "b"], [1.0, 1.0]) == "a"


def test_mismatched_batch_counts_are_refused():
    acc = ClipSearchAccumulator(["a", "b"])
    acc.add(0, torch.ones(2, 2))
    with pytest.raises(ValueError, match="same number of batches"):
        acc.variances()


@pytest.mark.distributed
def test_gather_over_two_ranks_equals_the_single_process_computation():
    out = run_distributed(WORKER, 2, timeout=120)
    lines = [line for line in out.splitlines() if line.startswith("CLIP")]
    assert len(lines) == 2, out[-2000:]
    for line in lines:
        assert "match=True" in line, line
