"""Session-wide test settings: CPU DeepSpeed, offline wandb, no network; the single-rank megatron
parallel state for in-process tests (`single_rank`)."""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def single_rank():
    """Megatron parallel state of one rank (world size 1, gloo, in-memory store, no port),
    initialised once per test module and torn down after it, so other areas' tests in the same
    session start from a clean slate."""
    from megatron_bd3.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    info = initialize_parallel(ParallelConfig(seed=1234), environ={})
    try:
        yield info
    finally:
        destroy_parallel()
