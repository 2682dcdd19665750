"""Distributed runtime and the megatron-core CPU compatibility layer.

    cpu_compat   apply_cpu_compat(): the only place megatron-core is adapted to machines
                 without CUDA; cpu_safe_config_overrides() for the megatron config
    runtime      ParallelConfig, initialize_parallel / destroy_parallel / parallel_runtime
    kernels      detect_fused_kernels(): apex / Transformer Engine detection

Importing this package does not import megatron-core (that happens on first use).
"""

from megatron_bd3.parallel.cpu_compat import (
    apply_cpu_compat,
    cpu_compat_active,
    cpu_safe_config_overrides,
)
from megatron_bd3.parallel.kernels import (
    ApexConflictError,
    check_apex,
    detect_fused_kernels,
    log_kernel_choice,
)
from megatron_bd3.parallel.runtime import (
    ParallelConfig,
    ParallelInfo,
    all_reduce_host,
    current_device,
    destroy_parallel,
    initialize_parallel,
    parallel_info,
    parallel_runtime,
    seed_all_rngs,
)

__all__ = [
    "ApexConflictError",
    "ParallelConfig",
    "ParallelInfo",
    "all_reduce_host",
    "apply_cpu_compat",
    "check_apex",
    "cpu_compat_active",
    "cpu_safe_config_overrides",
    "current_device",
    "destroy_parallel",
    "detect_fused_kernels",
    "initialize_parallel",
    "log_kernel_choice",
    "parallel_info",
    "parallel_runtime",
    "seed_all_rngs",
]
