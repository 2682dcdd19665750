"""megatron-core 0.16.1 on machines without CUDA: the one place that adapts it.

megatron-core runs on CPU with gloo except for a handful of calls that hard-require CUDA
(docs: cpu-runtime.md). Rather than fork megatron files, each affected megatron module gets a
*view* of `torch` bound to its module-global name `torch`: the view forwards every attribute to
the real torch module except the few CUDA entry points that module needs on CPU. Code outside
those modules (and torch itself) is untouched, and with CUDA present nothing is patched at all.

The patches, each named after the megatron call that needs it (megatron/core/<file>:<line>):

1. `torch.cuda.current_device()` -> `torch.device("cpu")`, so `torch.empty(...,
   device=torch.cuda.current_device())` allocates on CPU, in
   tensor_parallel/mappings.py 91/141/148/181 (gather/reduce-scatter buffers, sequence parallel),
   tensor_parallel/layers.py 552 (sequence-parallel backward) and 261/873/1197 (GPU init),
   tensor_parallel/utils.py 70/91 (distribute_saved_activations),
   utils.py 631 (GlobalMemoryBuffer, used by sequence parallel and DotProductAttention),
   models/common/embeddings/rotary_pos_embedding.py 162 (RoPE inv_freq),
   pipeline_parallel/p2p_communication.py 313/321 (receive buffers) and 190-202 (shape
   exchange, only with variable_seq_lengths),
   dist_checkpointing/strategies/state_dict_saver.py 252 (the all-reduced save-failure flag).
2. `torch.cuda.synchronize()` -> no-op in pipeline_parallel/p2p_communication.py 242/398
   (there is no device stream to wait for; gloo ops are synchronous once waited on) and in
   dist_checkpointing/strategies/filesystem_async.py 230 (after staging tensors for a save).
3. `device="cuda"` literals -> CPU in `torch.zeros` of pipeline_parallel/schedules.py
   596/983/2138 (the token counter of every schedule, PP=1 included).
4. The model-parallel RNG tracker (tensor_parallel/random.py): its "CUDA" generator becomes the
   CPU default generator, which is the generator CPU dropout draws from. `_get_cuda_rng_state`
   (55, used by fork at 250/273 and by activation recompute at 447) and `_set_cuda_rng_state`
   (72, via `_lazy_call`, which never runs without CUDA) are replaced, and the module's
   `torch.cuda.get_rng_state`/`manual_seed` (235/237/238 in `add`, 422 in
   `model_parallel_cuda_manual_seed`) seed and read the CPU generator. This keeps megatron's
   real per-TP-rank dropout streams (seed + 2718 + tp_rank) instead of disabling them.
5. The tracker's fork warns "CPU RNG state changed within GPU RNG context" (random.py 265) on
   every dropout inside a fork, which is expected once both generators are the same; a logging
   filter drops exactly that message.

Not patched, on purpose: transformer/utils.py 35/40 (default causal masks; pass explicit masks),
transformer/attention.py 430 (static-batching inference KV cache), schedules.py 418
(`torch.autocast("cuda")`, only with `enable_autocast`), and megatron's optimizer (CUDA-only;
use DeepSpeed on CPU). See `cpu_safe_config_overrides` for the config side.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_ACTIVE = False
_RNG_WARNING = "CPU RNG state changed within GPU RNG context"


class _TorchView:
    """`torch` (or `torch.cuda`) as one megatron module sees it: the real module, except for the
    attributes given as overrides. Attribute lookups fall through to the real module."""

    def __init__(self, base: ModuleType, name: str, **overrides: Any) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_name", name)
        for key, value in overrides.items():
            object.__setattr__(self, key, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def __repr__(self) -> str:
        return f"<megatron_bd3 CPU view of {self._name}>"


def _cpu_current_device() -> torch.device:
    """Stands in for `torch.cuda.current_device()`: every `device=` it feeds lands on CPU."""
    return _CPU


def _no_synchronize(device: Any = None) -> None:
    """Stands in for `torch.cuda.synchronize()`: nothing asynchronous to wait for on CPU."""


def _cuda_literal_to_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a tensor factory so that a `device="cuda"` argument allocates on CPU instead."""

    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = _CPU
        return factory(*args, **kwargs)

    return wrapper


def _cpu_get_rng_state(
    device: Any = "cuda", clone: bool = False, graph_safe: bool = False
) -> torch.Tensor:
    """Replaces random.py `_get_cuda_rng_state`: the tracker's generator is the CPU one."""
    if graph_safe:
        raise RuntimeError("CUDA-graph-safe RNG tracking (use_cudagraphable_rng) needs CUDA")
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """Replaces random.py `_set_cuda_rng_state` (which defers to `_lazy_call`, a no-op on CPU)."""
    if graph_safe:
        raise RuntimeError("CUDA-graph-safe RNG tracking (use_cudagraphable_rng) needs CUDA")
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    """Stands in for `torch.cuda.manual_seed` inside random.py: seeds the CPU generator."""
    torch.default_generator.manual_seed(int(seed))


def _cpu_get_rng_state_any(device: Any = "cuda") -> torch.Tensor:
    """Stands in for `torch.cuda.get_rng_state` inside random.py."""
    return torch.get_rng_state()


class _DropRngForkWarning(logging.Filter):
    """Drops random.py's fork warning, expected once the tracker drives the CPU generator."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _RNG_WARNING not in record.getMessage()


def _cuda_view(**overrides: Any) -> _TorchView:
    return _TorchView(torch, "torch", cuda=_TorchView(torch.cuda, "torch.cuda", **overrides))


# megatron module -> the `torch` it should see. Module docstring has the full story per patch.
def _planned_views() -> dict[str, _TorchView]:
    current_device_only = {"current_device": _cpu_current_device}
    return {
        # mappings.py 91/141/148/181: all-gather/reduce-scatter outputs (gather_output, SP)
        "megatron.core.tensor_parallel.mappings": _cuda_view(**current_device_only),
        # layers.py 552: SP reduce-scatter buffer in the linear backward; 261/873/1197: init
        # with use_cpu_initialization=False
        "megatron.core.tensor_parallel.layers": _cuda_view(**current_device_only),
        # tensor_parallel/utils.py 70/91: recompute with distribute_saved_activations
        "megatron.core.tensor_parallel.utils": _cuda_view(**current_device_only),
        # utils.py 631: GlobalMemoryBuffer.get_tensor (SP linear, DotProductAttention)
        "megatron.core.utils": _cuda_view(**current_device_only),
        # rotary_pos_embedding.py 162: RoPE moves inv_freq to the "GPU" on first forward
        "megatron.core.models.common.embeddings.rotary_pos_embedding": _cuda_view(
            **current_device_only
        ),
        # p2p_communication.py 313/321: receive buffers; 242/398: torch.cuda.synchronize()
        "megatron.core.pipeline_parallel.p2p_communication": _cuda_view(
            current_device=_cpu_current_device, synchronize=_no_synchronize
        ),
        # schedules.py 596/983/2138: torch.zeros([], dtype=torch.int, device="cuda")
        "megatron.core.pipeline_parallel.schedules": _TorchView(
            torch, "torch", zeros=_cuda_literal_to_cpu(torch.zeros)
        ),
        # dist_checkpointing/strategies/filesystem_async.py 230: torch.cuda.synchronize() after
        # staging tensors "from the GPU" in every save
        "megatron.core.dist_checkpointing.strategies.filesystem_async": _cuda_view(
            synchronize=_no_synchronize
        ),
        # dist_checkpointing/strategies/state_dict_saver.py 252: the all-reduced save-failure
        # flag is allocated on torch.cuda.current_device()
        "megatron.core.dist_checkpointing.strategies.state_dict_saver": _cuda_view(
            **current_device_only
        ),
        # random.py 235/237/238 (CudaRNGStatesTracker.add), 422 (model_parallel_cuda_manual_seed)
        "megatron.core.tensor_parallel.random": _cuda_view(
            current_device=_cpu_current_device,
            get_rng_state=_cpu_get_rng_state_any,
            manual_seed=_cpu_manual_seed,
        ),
    }


PATCHED_MODULES: tuple[str, ...] = tuple(_planned_views())


def compat_needed(cuda_available: bool) -> bool:
    """The guard: the compatibility layer is for machines where CUDA is not usable."""
    return not cuda_available


def apply_cpu_compat() -> bool:
    """Make megatron-core's CUDA-only calls work on CPU. Idempotent; a no-op when CUDA exists.

    Returns True when the layer is active after the call.
    """
    global _ACTIVE
    if _ACTIVE:
        return True
    if not compat_needed(torch.cuda.is_available()):
        return False

    views = _planned_views()
    for module_name, view in views.items():
        module = importlib.import_module(module_name)
        if not isinstance(module.torch, ModuleType):
            raise RuntimeError(f"{module_name}.torch is already replaced ({module.torch!r})")
        module.torch = view

    # random.py 55/72: the tracker's state get/set used by fork (250/255/273/277) and recompute
    # (447/457); the originals read CUDA generators or queue on `_lazy_call`, never run on CPU.
    random_module = importlib.import_module("megatron.core.tensor_parallel.random")
    random_module._get_cuda_rng_state = _cpu_get_rng_state
    random_module._set_cuda_rng_state = _cpu_set_rng_state
    # random.py 265: fork warns whenever the CPU generator moved inside it, which is now always.
    logging.getLogger(random_module.__name__).addFilter(_DropRngForkWarning())

    _ACTIVE = True
    logger.info("megatron-core CPU compatibility layer applied to %d modules", len(views))
    return True


def cpu_compat_active() -> bool:
    """True once `apply_cpu_compat` has patched megatron-core in this process."""
    return _ACTIVE


def cpu_safe_config_overrides() -> dict[str, Any]:
    """TransformerConfig/ModelParallelConfig fields megatron-core needs on CPU.

    Empty when CUDA is available. On CPU:
    - use_cpu_initialization: init the full weight on CPU and split it (layers.py 261/873/1197
      would otherwise init on the device, and the result would then depend on the TP size);
    - batch_p2p_comm False: gloo has no batched isend/irecv (p2p_communication.py 398);
    - pipeline_dtype float32: the dtype of p2p receive buffers (p2p_communication.py 313/321);
    - fusions off: they are CUDA kernels or torch.compile'd CUDA paths.
    """
    if not compat_needed(torch.cuda.is_available()):
        return {}
    return {
        "use_cpu_initialization": True,
        "batch_p2p_comm": False,
        "pipeline_dtype": torch.float32,
        "gradient_accumulation_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "apply_rope_fusion": False,
        "cross_entropy_loss_fusion": False,
    }
