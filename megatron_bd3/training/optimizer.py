"""Which optimizer runs a job, refused up front when the combination cannot work.

Two backends:
- `deepspeed` (CPU and GPU): ZeRO stage 0/1/2/3 and CPU optimizer offload from a DeepSpeed JSON
  (deepspeed/*.json), AdamW with the YAML's hyper-parameters, explicit clipping.
- `megatron` (GPU only): megatron-core's DistributedOptimizer over megatron DDP chunks.

`check_combination` is a pure function of the run config, the DeepSpeed JSON and the machine, so
every refusal is tested without starting processes. Each message says what would work.
`resolve_environment` runs it and returns what the rest of the set-up needs (RunEnvironment).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_bd3.paths import resolve_path
from megatron_bd3.training.config import ConfigError, RunConfig
from megatron_bd3.training.deepspeed_engine import (
    load_deepspeed_json,
    offloads_optimizer,
    offloads_params,
    zero_stage,
)

SHIPPED_JSON = "deepspeed/zero{0,1,2,3}.json, zero2_offload.json, zero3_offload.json"


@dataclass(frozen=True)
class Machine:
    """What the run executes on (filled from torch at start-up, or by tests)."""

    device_type: str  # "cpu" | "cuda"
    bf16_supported: bool


def detect_machine() -> Machine:
    if torch.cuda.is_available():
        return Machine("cuda", torch.cuda.is_bf16_supported())
    try:
        a = torch.ones(4, 4, dtype=torch.bfloat16)
        _ = (a @ a).sum().item()
        bf16 = True
    except (RuntimeError, TypeError):
        bf16 = False
    return Machine("cpu", bf16)


def resolve_device(config: RunConfig, machine: Machine) -> str:
    wanted = config.training.device
    if wanted == "auto":
        return machine.device_type
    if wanted == "cuda" and machine.device_type != "cuda":
        raise ConfigError(
            "training.device=cuda but no CUDA device is available; use training.device=auto or cpu"
        )
    return wanted


def resolve_precision(config: RunConfig, machine: Machine) -> str:
    """'bf16' or 'fp32'. auto: bf16 on GPU (paper: bf16 mixed), fp32 on CPU."""
    device = resolve_device(config, machine)
    precision = config.training.precision
    if precision == "auto":
        return "bf16" if device == "cuda" and machine.bf16_supported else "fp32"
    if precision == "bf16" and not machine.bf16_supported:
        raise ConfigError(
            f"training.precision=bf16 is not supported on this {device} (bf16 matmul failed); "
            f"use training.precision=fp32 (or auto)"
        )
    return precision


def resolve_torch_adam(config: RunConfig, machine: Machine) -> bool:
    """torch.optim.AdamW inside DeepSpeed by default, on CPU and GPU: nothing is JIT-built (it
    runs torch's fused kernel, CUDA or CPU, see resolve_deepspeed_config). optimizer.torch_adam=false
    selects DeepSpeed's own FusedAdam, which JIT-builds a CUDA extension with nvcc at start-up
    (measured on an H100 image whose TORCH_CUDA_ARCH_LIST names "9.0a": DeepSpeed 0.19.8 fails
    to parse it, so that build cannot even start there)."""
    del machine  # the default no longer depends on the device
    if config.optimizer.torch_adam is not None:
        return config.optimizer.torch_adam
    return True


def check_combination(
    config: RunConfig,
    machine: Machine,
    ds_json: dict[str, Any] | None,
    world_size: int | None = None,
) -> None:
    """Refuse every combination that cannot work, naming what would work instead."""
    device = resolve_device(config, machine)
    resolve_precision(config, machine)
    o, p = config.optimizer, config.parallel
    pp = p.pipeline_model_parallel_size
    ds_name = config.deepspeed.config

    if world_size is not None:
        model_parallel = p.tensor_model_parallel_size * pp
        if world_size % model_parallel != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by TP x PP = "
                f"{p.tensor_model_parallel_size} x {pp} = {model_parallel}; launch a multiple of "
                f"{model_parallel} processes or change parallel.*"
            )
        dp = world_size // model_parallel
        t = config.training
        if t.global_batch_size % (t.micro_batch_size * dp) != 0:
            raise ConfigError(
                f"training.global_batch_size {t.global_batch_size} is not a multiple of "
                f"training.micro_batch_size {t.micro_batch_size} x data-parallel size {dp} = "
                f"{t.micro_batch_size * dp}"
            )

    if o.backend == "megatron":
        if device != "cuda":
            raise ConfigError(
                "optimizer.backend=megatron needs CUDA (megatron-core's optimizer hard-codes "
                "device='cuda' and torch.cuda tensor types); on CPU use "
                f"optimizer.backend=deepspeed with one of {SHIPPED_JSON}"
            )
        if o.cpu_offload:
            raise ConfigError(
                "optimizer.cpu_offload needs optimizer.backend=deepspeed "
                "(deepspeed.config=deepspeed/zero2_offload.json)"
            )
        if ds_json is not None:
            raise ConfigError(
                "deepspeed.config is only used with optimizer.backend=deepspeed; set "
                "deepspeed.config=null with optimizer.backend=megatron"
            )
        return

    # ---- deepspeed backend
    if ds_json is None:
        raise ConfigError(
            f"optimizer.backend=deepspeed needs deepspeed.config (one of {SHIPPED_JSON})"
        )
    stage = zero_stage(ds_json)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{ds_name}: zero_optimization.stage must be 0-3, got {stage}")
    offload = offloads_optimizer(ds_json)
    if pp > 1 and stage >= 2:
        raise ConfigError(
            f"{ds_name}: ZeRO stage {stage} with parallel.pipeline_model_parallel_size {pp} "
            f"cannot work (megatron's pipeline schedule runs the backward passes itself: "
            f"ZeRO-2's gradient hooks reduce twice and ZeRO-3 deadlocks); use "
            f"deepspeed/zero1.json (or zero0.json) with PP > 1, or PP = 1 with ZeRO-2/3"
        )
    if offload and stage == 0:
        raise ConfigError(
            f"{ds_name}: offload_optimizer needs ZeRO stage 1, 2 or 3; use "
            f"deepspeed/zero2_offload.json"
        )
    if offload and pp > 1:
        raise ConfigError(
            f"{ds_name}: CPU optimizer offload is supported with PP = 1 only (got "
            f"parallel.pipeline_model_parallel_size {pp}); use deepspeed/zero1.json"
        )
    if offloads_params(ds_json) and stage != 3:
        raise ConfigError(
            f"{ds_name}: offload_param needs ZeRO stage 3; use deepspeed/zero3_offload.json"
        )
    if o.cpu_offload is True and not offload:
        raise ConfigError(
            f"optimizer.cpu_offload=true but {ds_name} has no zero_optimization.offload_optimizer; "
            f"use deepspeed.config=deepspeed/zero2_offload.json (or zero3_offload.json)"
        )
    if o.cpu_offload is False and offload:
        raise ConfigError(
            f"optimizer.cpu_offload=false but {ds_name} offloads the optimizer; pick "
            f"deepspeed/zero2.json or drop optimizer.cpu_offload"
        )
    if p.sequence_parallel and stage >= 2:
        raise ConfigError(
            f"parallel.sequence_parallel with ZeRO stage {stage} cannot work: layer-norm "
            f"gradients must be summed over tensor parallel before DeepSpeed partitions them; "
            f"use deepspeed/zero1.json with sequence parallel"
        )
    if offload and not resolve_torch_adam(config, machine) and device == "cpu":
        raise ConfigError(
            "CPU offload on a CPU-only machine needs optimizer.torch_adam=true (DeepSpeedCPUAdam "
            "is a JIT build); leave optimizer.torch_adam unset"
        )


@dataclass(frozen=True)
class RunEnvironment:
    """What a run executes with, resolved and checked once at start-up."""

    machine: Machine
    device_type: str  # "cpu" | "cuda"
    precision: str  # "fp32" | "bf16"
    ds_path: Path | None  # the DeepSpeed JSON (deepspeed backend)
    ds_json: dict[str, Any] | None

    @property
    def zero_stage(self) -> int | None:
        return None if self.ds_json is None else zero_stage(self.ds_json)


def resolve_environment(
    config: RunConfig, world_size: int, machine: Machine | None = None
) -> RunEnvironment:
    """Device, precision and DeepSpeed JSON of a run; refuses impossible combinations before
    any process group exists."""
    machine = machine or detect_machine()
    ds_path = ds_json = None
    if config.optimizer.backend == "deepspeed" and config.deepspeed.config:
        ds_path = resolve_path(config.deepspeed.config, "deepspeed.config")
        ds_json = load_deepspeed_json(ds_path)
    check_combination(config, machine, ds_json, world_size)
    return RunEnvironment(
        machine=machine,
        device_type=resolve_device(config, machine),
        precision=resolve_precision(config, machine),
        ds_path=ds_path,
        ds_json=ds_json,
    )
