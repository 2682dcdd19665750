"""Parallel layouts on 2 and 4 gloo ranks; each launch runs several layouts one after another.

The checks live in workers/layout_worker.py (layout against a hand-computed tp-cp-ep-dp-pp
order, group all-reduces, per-TP-rank RNG streams, sequence parallel, 1F1B and interleaved
pipeline schedules against plain autograd, double teardown and re-initialisation).
"""

from pathlib import Path

import pytest

from tests.dist_launcher import run_distributed

WORKER = Path(__file__).parent / "workers" / "layout_worker.py"


def _assert_all_phases_passed(output: str, phases: list[str], nproc: int) -> None:
    for phase in phases:
        for rank in range(nproc):
            assert f"PHASE {phase} OK rank {rank}" in output, (
                f"{phase} rank {rank}:\n{output[-4000:]}"
            )


@pytest.mark.distributed
def test_two_ranks_tp2_then_pp2_then_pp2_with_vpp2_then_cp2():
    phases = ["tp2", "pp2", "pp2vpp2", "cp2"]
    _assert_all_phases_passed(run_distributed(WORKER, 2, *phases, timeout=180), phases, 2)


@pytest.mark.distributed
def test_four_ranks_tp2_pp2_then_tp2_dp2():
    phases = ["tp2pp2", "tp2dp2"]
    _assert_all_phases_passed(run_distributed(WORKER, 4, *phases, timeout=240), phases, 4)
