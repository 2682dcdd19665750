"""Tensor and pipeline parallelism of BD3Model against one rank (2-rank torchrun workers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist_launcher import run_distributed

WORKERS = Path(__file__).parent / "workers"


@pytest.mark.distributed
def test_tensor_parallel_matches_single_rank():
    """TP=2 and TP=2 + sequence parallel: logits, loss and gradients equal TP=1 (1e-5); and TP=2
    + sequence parallel with document masking: loss and gradients."""
    output = run_distributed(WORKERS / "tensor_parallel.py", 2)
    assert "TP OK tp2 " in output
    assert "TP OK tp2_sp " in output
    assert "TP OK tp2_sp_documents " in output


@pytest.mark.distributed
def test_pipeline_schedules_match_single_stage():
    """1F1B (PP=2) and interleaved (PP=2 × VPP=2) through megatron's forward_backward_func with
    our forward_step/loss_func: per-micro-batch losses and all gradients equal PP=1."""
    output = run_distributed(WORKERS / "pipeline_parallel.py", 2)
    for phase in ("pp2_1f1b", "pp2_vpp2_interleaved"):
        for rank in (0, 1):
            assert f"PP OK {phase} rank={rank} " in output
