"""Single-rank megatron parallel state for the in-process model tests.

Initialised once per test module (world size 1, gloo, in-memory store, no port) and torn down
after it, so other areas' tests in the same session start from a clean slate.
"""

from __future__ import annotations

import pytest

from megatron_bd3.parallel import ParallelConfig, destroy_parallel, initialize_parallel


@pytest.fixture(scope="module")
def single_rank():
    info = initialize_parallel(ParallelConfig(seed=1234), environ={})
    try:
        yield info
    finally:
        destroy_parallel()
