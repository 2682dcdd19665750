"""DeepSpeed as the data-parallel optimizer around megatron-core model chunks.

What this module owns:
- `MegatronMPU`: the "mpu" object DeepSpeed expects (utils/groups.py, runtime/engine.py,
  runtime/utils.py, zero/stage_1_and_2.py and stage3.py call `get_{model,tensor_model,
  pipeline_model,data}_parallel_{group,rank,world_size}` and `get_data_parallel_group_ranks`)
  answered from megatron's parallel_state. Passing `parallel_state` itself fails
  (`get_model_parallel_world_size` is missing). The model-parallel group is megatron's TP x PP
  group, the tensor-model-parallel rank is the TP rank, so DeepSpeed's grad-norm counts each
  TP-replicated parameter once per pipeline stage and sums over TP x PP.
- `skip_shm_comm_build()`: DeepSpeed's TorchBackend JIT-compiles `deepspeed_shm_comm` (~60 s) at
  `init_distributed` on the CPU accelerator, only for inference all-reduce. We replace
  `build_shm_op` in the module `deepspeed.comm.torch` (looked up in sys.modules: `import
  deepspeed.comm.torch as m` binds the *torch package*, because deepspeed.comm re-exports it).
- `resolve_deepspeed_config()`: the DeepSpeed JSON (ZeRO stage, offload) completed with the
  run's hyper-parameters from the YAML, which is the single source for them: optimizer (AdamW,
  `torch_adam` on CPU so nothing is JIT-built), explicit `gradient_clipping` (DeepSpeed's default
  is a silent 1.0), batch sizes, bf16/fp32.
- `initialize_engine()`: `deepspeed.initialize` over the model chunks, and which step protocol
  the layout needs (`uses_engine_forward`). The stepper that runs it around megatron-core's
  `forward_backward_func` is `DeepSpeedStepper` in megatron_bd3.training.parallelize, the one
  place that wires a run's parallelism.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- mpu


class MegatronMPU:
    """DeepSpeed's model-parallel-unit interface over megatron-core's parallel_state.

    Deliberately lacks `initialize_sequence_parallel` and the `get_sequence_parallel_*` family:
    DeepSpeed reads their presence as "Ulysses sequence parallelism" and would then ignore the
    model-parallel group in its gradient-norm computation.
    """

    def __init__(self) -> None:
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError(
                "initialize megatron parallel state before building the DeepSpeed mpu"
            )
        self._ps = parallel_state

    # model parallel = TP x PP (one model replica)
    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.get_model_parallel_group())

    def get_model_parallel_src_rank(self) -> int:
        return self._ps.get_model_parallel_src_rank()

    # tensor parallel
    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    # pipeline parallel
    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps.get_pipeline_model_parallel_rank()

    # data parallel, with the context-parallel ranks: they hold the same weights and each has
    # the gradient of its positions' loss, so DeepSpeed averages (and ZeRO partitions) over
    # DP x CP, as megatron DDP does (its dp-cp group); see megatron_bd3/model/step.py.
    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())


# ------------------------------------------------------------------------------ shm JIT skip


def skip_shm_comm_build() -> None:
    """Stop DeepSpeed from JIT-building `deepspeed_shm_comm` on CPU (inference-only kernel).

    No-op with CUDA. Idempotent. Must run before `deepspeed.initialize`/`init_distributed`.
    """
    if torch.cuda.is_available():
        return
    import deepspeed.comm.torch  # noqa: F401  (loads the module into sys.modules)

    module = sys.modules["deepspeed.comm.torch"]
    if getattr(module.build_shm_op, "_megatron_bd3_skip", False):
        return

    def build_shm_op():  # noqa: D401 - same signature as DeepSpeed's
        return None

    build_shm_op._megatron_bd3_skip = True  # type: ignore[attr-defined]
    module.build_shm_op = build_shm_op


# --------------------------------------------------------------------------- configuration


# Keys the trainer derives from the YAML; the JSON may state them (the shipped files do, to be
# explicit) but the YAML value wins, with a warning when they differ.
_DERIVED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "bf16",
    "fp16",
    "scheduler",
)


def load_deepspeed_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"DeepSpeed config {path} does not exist (deepspeed.config); the shipped ones are "
            f"deepspeed/zero{{0,1,2,3}}.json and zero{{2,3}}_offload.json"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a JSON object")
    return data


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"deepspeed.overrides: '{part}' in '{dotted}' is not an object")
    node[parts[-1]] = value


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in (None, "none")


def offloads_params(ds_config: dict[str, Any]) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_param") or {}
    return offload.get("device", "none") not in (None, "none")


def resolve_deepspeed_config(
    raw: dict[str, Any],
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    data_parallel_size: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    clip_grad: float,
    precision: str,
    torch_adam: bool,
    overrides: dict[str, Any] | None = None,
    source: str = "deepspeed config",
    device: str = "cpu",
) -> dict[str, Any]:
    """The JSON completed with the run's values (what is passed to `deepspeed.initialize`).

    The micro-batches of one optimizer step run inside megatron's forward_backward_func, so
    DeepSpeed itself sees gradient_accumulation_steps = 1 and train_batch_size =
    micro_batch_size x data_parallel_size; the true global batch is reported in the log.
    """
    config = copy.deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        _set_dotted(config, dotted, value)
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * data_parallel_size,
        "gradient_clipping": float(clip_grad),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": float(lr),
                "betas": [float(betas[0]), float(betas[1])],
                "eps": float(eps),
                "weight_decay": float(weight_decay),
                "torch_adam": bool(torch_adam),
            },
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
    }
    json_opt = config.get("optimizer", {})
    if json_opt and str(json_opt.get("type", "AdamW")).lower() != "adamw":
        raise ValueError(
            f"{source}: optimizer.type {json_opt.get('type')!r} is not supported; megatron_bd3 "
            f"trains with AdamW (set lr/betas/eps/weight_decay in the YAML optimizer section)"
        )
    for key in ("gradient_clipping",):
        if key in config and float(config[key]) != derived[key]:
            logger.warning(
                "%s sets %s=%s; the YAML (optimizer.clip_grad) value %s is used",
                source,
                key,
                config[key],
                derived[key],
            )
    if config.get("fp16", {}).get("enabled"):
        raise ValueError(
            f"{source}: fp16 is not supported (use training.precision=bf16 on GPU, fp32 on CPU)"
        )
    if "scheduler" in config:
        raise ValueError(
            f"{source}: a DeepSpeed 'scheduler' is not used; the LR schedule is the YAML's "
            f"schedule section (warm-up then constant/cosine). Remove 'scheduler' from the JSON."
        )
    for key in _DERIVED_KEYS:
        config.pop(key, None)
    config.update(derived)
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    # The optimizer runs torch AdamW on offloaded fp32 states when torch_adam is on; DeepSpeed
    # otherwise insists on its JIT-built CPUAdam for offload.
    if offloads_optimizer(config) and torch_adam:
        config["zero_force_ds_cpu_optimizer"] = False
    # torch's AdamW runs its fused kernel (DeepSpeed passes unknown optimizer params through to
    # torch.optim.AdamW): on a GPU one launch for all parameters; on CPU, and for states offloaded
    # to CPU, one vectorised pass instead of a Python loop of ~12 ops per parameter (7.4M
    # parameters in 45 tensors on 2 Zen 3 cores: 5 ms per step against 27-39 ms; docs/bench).
    if torch_adam:
        config["optimizer"]["params"]["fused"] = True
    return config


# ------------------------------------------------------------------------------------ engine


def uses_engine_forward(stage: int, pipeline_parallel_size: int) -> bool:
    """Which step protocol a layout uses (both verified against a one-process reference).

    - PP = 1 and ZeRO 1/2/3: the engine itself is called for every micro-batch (its forward
      resets ZeRO's backward-hook bookkeeping) with `managed_gradient_accumulation: false`, so a
      plain `loss.backward()` per micro-batch only accumulates and `engine.step()` owns the
      boundary (reduce, clip, update). Calling `engine.module` directly under ZeRO-2/3 instead
      reduces stale or partial gradients ("already been reduced" / wrong sums).
    - ZeRO 0, or PP > 1 (which needs ZeRO <= 1): `engine.module` chunks go to megatron's
      pipeline schedule, which owns the backward calls (including non-scalar ones), then
      `engine.allreduce_gradients(); engine.step()` (cpu-runtime.md).
    """
    return stage >= 1 and pipeline_parallel_size == 1


def initialize_engine(
    model_chunks: list[torch.nn.Module],
    ds_config: dict[str, Any],
    *,
    pipeline_parallel_size: int = 1,
    param_groups: list[dict[str, Any]] | None = None,
):
    """One DeepSpeed engine around the model chunks (one per virtual pipeline stage).

    The chunks are held in a ModuleList when there are several, so one ZeRO optimizer covers
    all of them. Returns (engine, engine_forward: whether the engine itself runs the forward,
    see `uses_engine_forward`).
    """
    skip_shm_comm_build()
    import deepspeed

    # DeepSpeed insists on LOCAL_RANK; a plain single process (no launcher) has none.
    if "LOCAL_RANK" not in os.environ and dist.get_world_size() == 1:
        os.environ["LOCAL_RANK"] = "0"
    ds_config = copy.deepcopy(ds_config)
    stage = zero_stage(ds_config)
    engine_forward = uses_engine_forward(stage, pipeline_parallel_size)
    ds_config["managed_gradient_accumulation"] = not engine_forward
    module = model_chunks[0] if len(model_chunks) == 1 else torch.nn.ModuleList(model_chunks)
    params = (
        param_groups
        if param_groups is not None
        else [p for p in module.parameters() if p.requires_grad]
    )
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=params,
        config=ds_config,
        mpu=MegatronMPU(),
        dist_init_required=False,
    )
    return engine, engine_forward


class EngineForward:
    """A model chunk as megatron's schedule sees it, whose call goes through the engine.

    `get_model_config` must find the megatron config (the engine's own `.config` is DeepSpeed's
    dict), so `config` is taken from the wrapped module; every other attribute
    (`set_input_tensor`, `model_type`, ...) falls through to it.
    """

    def __init__(self, engine) -> None:
        self._engine = engine
        self.module = engine.module
        self.config = getattr(engine.module, "config", None)

    def __call__(self, *args, **kwargs):
        return self._engine(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.module, name)


def engine_chunks(engine) -> list[torch.nn.Module]:
    """The model chunks inside an engine."""
    module = engine.module
    return list(module) if isinstance(module, torch.nn.ModuleList) else [module]
