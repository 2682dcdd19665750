"""ParallelConfig validation and launcher-environment parsing: pure, no process groups."""

import pytest

from megatron_bd3.parallel import ParallelConfig
from megatron_bd3.parallel.runtime import read_launch_env


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tensor_model_parallel_size=0), "tensor_model_parallel_size must be a positive"),
        (dict(pipeline_model_parallel_size=-2), "pipeline_model_parallel_size must be a positive"),
        (dict(context_parallel_size=1.5), "context_parallel_size must be a positive"),
        (dict(tensor_model_parallel_size=True), "tensor_model_parallel_size must be a positive"),
        (
            dict(virtual_pipeline_model_parallel_size=2),
            "virtual_pipeline_model_parallel_size 2 needs pipeline_model_parallel_size > 1, got 1",
        ),
        (
            dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=1),
            "virtual_pipeline_model_parallel_size must be None (no interleaving) or an integer >= 2",
        ),
        (
            dict(sequence_parallel=True),
            "sequence_parallel=True needs tensor_model_parallel_size > 1",
        ),
        (dict(seed=-1), "seed must be a non-negative integer, got -1"),
        (dict(distributed_backend="mpi"), "distributed_backend must be one of ('gloo', 'nccl')"),
        (dict(timeout_minutes=0), "timeout_minutes must be > 0, got 0"),
    ],
)
def test_invalid_config_is_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError) as excinfo:
        ParallelConfig(**kwargs)
    assert message in str(excinfo.value)


def test_valid_configs_are_accepted():
    ParallelConfig()
    ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    ParallelConfig(context_parallel_size=2, distributed_backend="gloo", timeout_minutes=0.5)


def test_data_parallel_size_is_what_the_model_parallel_layout_leaves():
    cfg = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    for world, dp in ((4, 1), (8, 2), (16, 4)):
        assert cfg.data_parallel_size(world) == dp
    assert ParallelConfig(context_parallel_size=3).data_parallel_size(6) == 2


def test_indivisible_world_names_every_size_and_their_product():
    cfg = ParallelConfig(
        tensor_model_parallel_size=2, pipeline_model_parallel_size=3, context_parallel_size=1
    )
    with pytest.raises(ValueError) as excinfo:
        cfg.data_parallel_size(8)
    assert str(excinfo.value) == (
        "world size 8 is not divisible by tensor_model_parallel_size (2) x "
        "pipeline_model_parallel_size (3) x context_parallel_size (1) = 6"
    )


def test_backend_choice():
    assert ParallelConfig().backend(cuda_available=False) == "gloo"
    assert ParallelConfig().backend(cuda_available=True) == "nccl"
    assert ParallelConfig(distributed_backend="gloo").backend(cuda_available=True) == "gloo"
    with pytest.raises(ValueError, match="'nccl' needs CUDA"):
        ParallelConfig(distributed_backend="nccl").backend(cuda_available=False)


def test_launch_env_from_torchrun_variables():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
        # torchrun's variables win over the scheduler's
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (3, 4, 1)
    assert (launch.master_addr, launch.master_port, launch.source) == ("10.0.0.1", 29500, "torch")


def test_launch_env_falls_back_to_slurm_and_open_mpi():
    slurm = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.source) == (5, 8, 1, "slurm")
    assert slurm.master_addr is None and slurm.master_port is None
    ompi = read_launch_env(
        {
            "OMPI_COMM_WORLD_RANK": "2",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "MASTER_PORT": "1234",
        }
    )
    assert (ompi.rank, ompi.world_size, ompi.local_rank, ompi.source) == (2, 4, 0, "ompi")
    assert ompi.master_port == 1234


def test_no_launcher_variables_means_one_process():
    launch = read_launch_env({})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.source) == (0, 1, 0, "none")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
        ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "RANK=4 is not in [0, WORLD_SIZE=4)"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "RANK and WORLD_SIZE are set but LOCAL_RANK is not"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "environment variable RANK='x' is not an integer"),
        ({"SLURM_NTASKS": "2"}, "SLURM_NTASKS is set but SLURM_PROCID is not"),
    ],
)
def test_inconsistent_launcher_variables_are_rejected(env, message):
    with pytest.raises(ValueError) as excinfo:
        read_launch_env(env)
    assert message in str(excinfo.value)
