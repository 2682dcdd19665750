"""Bring the distributed runtime up and down: process group, megatron parallel state, RNG seeds.

One entry point for training, tools and tests. It reads the launcher's environment (torchrun and
the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; SLURM and Open MPI
are read as fallbacks), picks gloo on CPU and nccl with CUDA, applies the CPU compatibility layer
when there is no CUDA, creates megatron-core's TP/PP/VPP/CP/DP groups and seeds every RNG the way
Megatron-LM does. Impossible layouts are rejected before any process group exists.

megatron-core is imported lazily, so `ParallelConfig` validation costs nothing to import.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist

from megatron_bd3.parallel.cpu_compat import apply_cpu_compat

_BACKENDS = ("gloo", "nccl")

# Megatron-LM's `_set_random_seed`: seeds differ across pipeline stages by 100 per stage and are
# equal across tensor- and data-parallel peers (TP peers then split via the RNG tracker).
PIPELINE_SEED_STRIDE = 100


@dataclass(frozen=True)
class ParallelConfig:
    """How the world is split. Sizes multiply to the model-parallel size; the data-parallel size
    is whatever is left of the world (`data_parallel_size(world_size)`)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    seed: int = 1234
    distributed_backend: str | None = None  # None: nccl with CUDA, gloo otherwise
    timeout_minutes: float = 30.0

    def __post_init__(self) -> None:
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            if isinstance(vpp, bool) or not isinstance(vpp, int) or vpp < 2:
                raise ValueError(
                    f"virtual_pipeline_model_parallel_size must be None (no interleaving) or an "
                    f"integer >= 2, got {vpp!r}"
                )
            if self.pipeline_model_parallel_size < 2:
                raise ValueError(
                    f"virtual_pipeline_model_parallel_size {vpp} needs "
                    f"pipeline_model_parallel_size > 1, got {self.pipeline_model_parallel_size} "
                    f"(interleaving splits each pipeline stage into virtual stages)"
                )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError(
                "sequence_parallel=True needs tensor_model_parallel_size > 1 (it shards the "
                "sequence over the tensor-parallel group), got tensor_model_parallel_size 1"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.distributed_backend is not None and self.distributed_backend not in _BACKENDS:
            raise ValueError(
                f"distributed_backend must be one of {_BACKENDS} or None (auto), "
                f"got {self.distributed_backend!r}"
            )
        if not self.timeout_minutes > 0:
            raise ValueError(f"timeout_minutes must be > 0, got {self.timeout_minutes!r}")

    @property
    def model_parallel_size(self) -> int:
        """Ranks one model replica spans: TP x PP x CP."""
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size for `world_size` ranks; raises if the layout is impossible."""
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        if world_size % self.model_parallel_size != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size}) x pipeline_model_parallel_size "
                f"({self.pipeline_model_parallel_size}) x context_parallel_size "
                f"({self.context_parallel_size}) = {self.model_parallel_size}"
            )
        return world_size // self.model_parallel_size

    def backend(self, cuda_available: bool) -> str:
        """The process-group backend to use; nccl without CUDA is an error."""
        backend = self.distributed_backend or ("nccl" if cuda_available else "gloo")
        if backend == "nccl" and not cuda_available:
            raise ValueError(
                "distributed_backend 'nccl' needs CUDA, and torch.cuda.is_available() is False; "
                "use 'gloo' or leave distributed_backend unset"
            )
        return backend


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    source: str  # "torch" (torchrun/deepspeed), "slurm", "ompi" or "none" (single process)


# (rank, world size, local rank) variable names per launcher, in order of preference.
_LAUNCHER_VARS = (
    ("torch", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("ompi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


def _int_var(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank, world size, local rank and rendezvous address from the launcher's variables.

    No variables at all means a single process (world size 1).
    """
    environ = os.environ if environ is None else environ
    for source, rank_var, world_var, local_var in _LAUNCHER_VARS:
        present = [v for v in (rank_var, world_var) if v in environ]
        if not present:
            continue
        if len(present) != 2:
            missing = rank_var if rank_var not in environ else world_var
            raise ValueError(f"{present[0]} is set but {missing} is not; set both or neither")
        rank, world_size = _int_var(environ, rank_var), _int_var(environ, world_var)
        local_rank = _int_var(environ, local_var) if local_var in environ else None
        if local_rank is None:
            if world_size == 1:
                local_rank = 0
            else:
                raise ValueError(f"{rank_var} and {world_var} are set but {local_var} is not")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"{rank_var}={rank} is not in [0, {world_var}={world_size})")
        if local_rank < 0:
            raise ValueError(f"{local_var}={local_rank} must be >= 0")
        port = _int_var(environ, "MASTER_PORT") if "MASTER_PORT" in environ else None
        return LaunchEnv(rank, world_size, local_rank, environ.get("MASTER_ADDR"), port, source)
    return LaunchEnv(0, 1, 0, None, None, "none")


@dataclass(frozen=True)
class ParallelInfo:
    """This rank's place in the parallel layout (what `initialize_parallel` returns)."""

    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int
    vpp_size: int | None
    device: torch.device
    backend: str
    seed: int  # the seed this rank used: cfg.seed + 100 * pp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def reports_loss(self) -> bool:
        """This rank's loss reports count once: last pipeline stage, TP rank 0."""
        return self.is_last_stage and self.tp_rank == 0


_INFO: ParallelInfo | None = None
_OWNS_PROCESS_GROUP = False
_GENERATION = 0  # process-group initialisations by this process, the same on every rank


def current_device() -> torch.device:
    """The device tensors of this rank live on: the rank's GPU with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_host(
    tensor: torch.Tensor,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """All-reduce a small host-side tensor (loss sums, token counts, statistics) in place.

    NCCL reduces only GPU tensors, gloo any: under NCCL the tensor travels through this rank's
    GPU and comes back, so callers keep their bookkeeping on the CPU under every backend.
    """
    if dist.get_backend(group) == "nccl" and tensor.device.type != "cuda":
        moved = tensor.to(current_device())
        dist.all_reduce(moved, op=op, group=group)
        tensor.copy_(moved.to(tensor.device))
    else:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def parallel_info() -> ParallelInfo | None:
    """The layout from the last `initialize_parallel`, or None when not initialized."""
    return _INFO


def _init_process_group(launch: LaunchEnv, backend: str, timeout: timedelta) -> None:
    global _GENERATION
    if launch.world_size == 1 and launch.master_port is None:
        # A single process with no launcher: a private in-memory store, no port to collide on.
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        return
    if launch.master_addr is None or launch.master_port is None:
        raise ValueError(
            f"{launch.world_size} ranks (from the {launch.source} launcher variables) need "
            f"MASTER_ADDR and MASTER_PORT to rendezvous; got MASTER_ADDR={launch.master_addr!r}, "
            f"MASTER_PORT={launch.master_port!r}"
        )
    if launch.source == "torch":
        # torchrun may host the store in its agent (TORCHELASTIC_USE_AGENT_STORE); env:// knows.
        url = "env://"
    else:
        url = f"tcp://{launch.master_addr}:{launch.master_port}"
    store, rank, world_size = next(
        dist.rendezvous(url, rank=launch.rank, world_size=launch.world_size, timeout=timeout)
    )
    # A fresh key prefix per initialisation: a second initialize_parallel in the same job (tests,
    # tools) would otherwise read the previous process group's stale gloo/nccl addresses.
    _GENERATION += 1
    store = dist.PrefixStore(f"megatron_bd3/{_GENERATION}/", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def seed_all_rngs(seed: int) -> None:
    """Seed python, numpy and torch, then megatron's model-parallel tracker (Megatron-LM order)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Data-parallel regions draw from the default generator (seed); tensor-parallel regions from
    # the tracker's stream seed + 2718 + tp_rank. On CPU the tracker runs on the CPU generator
    # through the compatibility layer.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize_parallel(
    cfg: ParallelConfig, environ: Mapping[str, str] | None = None
) -> ParallelInfo:
    """Create the process group and megatron-core's parallel groups; seed the RNGs.

    Validates the layout against the world size before any group is created. With CUDA, binds
    this process to GPU LOCAL_RANK and uses nccl; without it applies the CPU compatibility layer
    and uses gloo. Reuses a process group that already exists (then `destroy_parallel` leaves it).
    """
    global _INFO, _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state

    if _INFO is not None or parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron parallel state is already initialized; call destroy_parallel() first"
        )
    cuda_available = torch.cuda.is_available()
    backend = cfg.backend(cuda_available)
    launch = read_launch_env(environ)
    if dist.is_initialized():
        if dist.get_world_size() != launch.world_size and launch.source != "none":
            raise RuntimeError(
                f"an existing process group has world size {dist.get_world_size()} but the "
                f"{launch.source} launcher variables say {launch.world_size}"
            )
        launch = LaunchEnv(
            dist.get_rank(),
            dist.get_world_size(),
            launch.local_rank,
            launch.master_addr,
            launch.master_port,
            launch.source,
        )
    dp_size = cfg.data_parallel_size(launch.world_size)

    if cuda_available:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    else:
        apply_cpu_compat()

    timeout = timedelta(minutes=cfg.timeout_minutes)
    if not dist.is_initialized():
        _init_process_group(launch, backend, timeout)
        _OWNS_PROCESS_GROUP = True

    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
            context_parallel_size=cfg.context_parallel_size,
            distributed_timeout_minutes=max(1, round(cfg.timeout_minutes)),
        )
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        seed = cfg.seed + PIPELINE_SEED_STRIDE * pp_rank
        seed_all_rngs(seed)
        info = ParallelInfo(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=launch.local_rank,
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp_size=parallel_state.get_tensor_model_parallel_world_size(),
            pp_rank=pp_rank,
            pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
            cp_rank=parallel_state.get_context_parallel_rank(),
            cp_size=parallel_state.get_context_parallel_world_size(),
            vpp_size=cfg.virtual_pipeline_model_parallel_size,
            device=current_device(),
            backend=dist.get_backend(),
            seed=seed,
        )
    except BaseException:
        destroy_parallel()
        raise
    if info.dp_size != dp_size:
        destroy_parallel()
        raise RuntimeError(f"megatron made dp size {info.dp_size}, expected {dp_size}")
    _INFO = info
    return info


def destroy_parallel() -> None:
    """Tear down megatron's parallel state and the process group we created. Safe to repeat."""
    global _INFO, _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
    _INFO = None


@contextlib.contextmanager
def parallel_runtime(
    cfg: ParallelConfig, environ: Mapping[str, str] | None = None
) -> Iterator[ParallelInfo]:
    """`with parallel_runtime(cfg) as info:` initialise for a test or tool, always tear down."""
    info = initialize_parallel(cfg, environ)
    try:
        yield info
    finally:
        destroy_parallel()
