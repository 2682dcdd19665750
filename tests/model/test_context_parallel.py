"""Context parallelism of BD3Model (model/context_parallel.py) against one rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_bd3.model import BD3Config
from megatron_bd3.model.context_parallel import ContextParallelLayout
from tests.dist_launcher import run_distributed
from tests.model.helpers import tiny_overrides

WORKERS = Path(__file__).parent / "workers"


@pytest.mark.distributed
@pytest.mark.parametrize("tp, nproc", [(1, 2), (2, 4)])
def test_context_parallel_matches_single_rank(tp, nproc):
    """CP = 2 (and CP = 2 x TP = 2 with sequence parallel): loss, every gradient and the logits
    of each rank's positions equal CP = 1, on the block, dense SDPA and flex (forward) kernels;
    the exchanged bytes equal the formula."""
    output = run_distributed(WORKERS / "context_parallel.py", nproc, str(tp))
    for rank in range(nproc):
        for phase in ("block", "dense_sdpa", "flex"):
            assert f"CP OK tp{tp}_cp2_{phase} rank={rank}" in output


def test_layout_is_zig_zag_on_block_edges():
    """Every position on exactly one rank; rank r holds chunks r and 2c-1-r; the noisy-query
    work (positions summed) is the same on every rank."""
    L, B, cp = 64, 4, 4
    chunk = L // (2 * cp)
    held = []
    for rank in range(cp):
        layout = ContextParallelLayout(L, B, cp, rank)
        expected = list(range(rank * chunk, (rank + 1) * chunk)) + list(
            range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)
        )
        assert layout.positions.tolist() == expected
        assert all(s % B == 0 and n % B == 0 for s, n in layout.spans)
        held.append(layout.positions)
    assert sorted(torch.cat(held).tolist()) == list(range(L))
    assert len({int(p.sum()) for p in held}) == 1
    gathered = torch.cat(held)
    assert torch.equal(gathered[ContextParallelLayout(L, B, cp, 0).global_order], torch.arange(L))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(seq_length=16, block_size=8), "multiple of 2 x context_parallel_size x block_size"),
        (dict(seq_length=16, block_size=16, single_stream_mdlm=True), "two-stream input"),
    ],
)
def test_refuses_layouts_it_cannot_cut(overrides, message):
    with pytest.raises(ValueError, match=message):
        BD3Config(**tiny_overrides(context_parallel_size=2, **overrides))
