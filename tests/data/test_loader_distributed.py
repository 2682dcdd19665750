"""The loader under a real 2-process torchrun (gloo): exactly once, equal step counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist_launcher import run_distributed

WORKER = Path(__file__).parent / "workers" / "loader_ranks.py"


@pytest.mark.distributed
def test_two_ranks_cover_the_epoch_exactly_once(shards_dir):
    output = run_distributed(WORKER, 2, str(shards_dir), timeout=120)
    assert "EXACTLY_ONCE_OK ranks=2" in output
