"""initialize_parallel / destroy_parallel in this process: world size 1, no launcher variables."""

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_bd3.parallel import (
    ParallelConfig,
    cpu_compat_active,
    current_device,
    destroy_parallel,
    initialize_parallel,
    parallel_info,
    parallel_runtime,
)


@pytest.fixture(autouse=True)
def _torn_down():
    yield
    destroy_parallel()
    assert not dist.is_initialized()


def test_single_process_without_any_environment():
    from megatron.core import parallel_state

    info = initialize_parallel(ParallelConfig(seed=5), environ={})
    assert info == parallel_info()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert (info.tp_size, info.pp_size, info.dp_size, info.cp_size) == (1, 1, 1, 1)
    assert (info.tp_rank, info.pp_rank, info.dp_rank) == (0, 0, 0)
    assert info.device == current_device() == torch.device("cpu")
    assert info.backend == "gloo" and info.seed == 5
    assert info.is_first_stage and info.is_last_stage
    assert dist.is_initialized() and parallel_state.model_parallel_is_initialized()
    assert cpu_compat_active()
    with pytest.raises(AttributeError):
        info.rank = 1  # frozen


def test_seeds_python_numpy_and_torch_like_megatron_lm():
    initialize_parallel(ParallelConfig(seed=77), environ={})
    draws = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(77)
    np.random.seed(77)
    reference = (
        random.random(),
        np.random.rand(),
        torch.rand(2, generator=torch.Generator().manual_seed(77)),
    )
    assert draws[0] == reference[0] and draws[1] == reference[1]
    assert torch.equal(draws[2], reference[2])


def test_destroy_twice_and_initialize_again():
    initialize_parallel(ParallelConfig(seed=1), environ={})
    destroy_parallel()
    destroy_parallel()
    assert not dist.is_initialized() and parallel_info() is None
    info = initialize_parallel(ParallelConfig(seed=2), environ={})
    assert info.seed == 2


def test_second_initialize_without_destroy_is_an_error():
    initialize_parallel(ParallelConfig(), environ={})
    with pytest.raises(RuntimeError, match="already initialized; call destroy_parallel"):
        initialize_parallel(ParallelConfig(), environ={})


def test_context_manager_tears_down_even_on_error():
    with pytest.raises(KeyError):
        with parallel_runtime(ParallelConfig(), environ={}) as info:
            assert dist.is_initialized() and info.world_size == 1
            raise KeyError("boom")
    assert not dist.is_initialized() and parallel_info() is None


@pytest.mark.parametrize(
    "cfg, message",
    [
        (ParallelConfig(tensor_model_parallel_size=2), "world size 1 is not divisible"),
        (ParallelConfig(distributed_backend="nccl"), "'nccl' needs CUDA"),
    ],
)
def test_impossible_layout_fails_before_any_group_exists(cfg, message):
    with pytest.raises(ValueError, match=message):
        initialize_parallel(cfg, environ={})
    assert not dist.is_initialized()


def test_many_ranks_without_rendezvous_address_is_a_clear_error():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
    with pytest.raises(ValueError, match="need MASTER_ADDR and MASTER_PORT"):
        initialize_parallel(ParallelConfig(), environ=env)
    assert not dist.is_initialized()


def test_slurm_variables_rendezvous_over_tcp():
    from tests.dist_launcher import free_port

    for _ in range(2):  # a second rendezvous in the same process must not see stale keys
        env = {
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1",
            "SLURM_LOCALID": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
        info = initialize_parallel(ParallelConfig(seed=3), environ=env)
        assert (info.rank, info.world_size, info.backend) == (0, 1, "gloo")
        probe = torch.ones(2)
        dist.all_reduce(probe)
        assert torch.equal(probe, torch.ones(2))
        destroy_parallel()
