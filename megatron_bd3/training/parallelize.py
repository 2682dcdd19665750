"""How a run is parallelised, in one place: process groups, model chunks, optimizer wrapping,
gradient finalisation and norm.

    initialize_from_config(run_config)           process group + megatron TP/PP/VPP/DP groups
    build_model_chunks(model_config, ...)        this rank's BD3Model chunk(s): TP/SP inside the
                                                 layers, one chunk per virtual pipeline stage
    parallelize(run_config, model_config, chunks, ...) -> Stepper
                                                 data parallelism + optimizer: a DeepSpeed engine
                                                 (ZeRO 0-3, offload) or megatron DDP + megatron's
                                                 (distributed) optimizer

A `Stepper` is what the training loop, validation and checkpoints see of the result, whichever
backend it is: the chunks, the models to hand to megatron's forward_backward_func, one optimizer
step (finalising model-parallel gradients, reducing over data parallel, clipping, updating) and
its own checkpoint state.

The two backends differ in who finalises gradients. megatron DDP does it in
`finalize_model_grads` (set as the model config's hook, called by the schedule). Under DeepSpeed
nobody does, so `DeepSpeedStepper.step` runs `finalize_model_parallel_grads` first: layer-norm
gradients summed over TP under sequence parallel, tied embedding copies summed over the first and
last pipeline stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from megatron_bd3.training.deepspeed_engine import (
    EngineForward,
    MegatronMPU,
    engine_chunks,
    initialize_engine,
    resolve_deepspeed_config,
)

# DeepSpeed's checkpoint tag inside the stepper's directory.
DS_TAG = "state"
# megatron's distributed optimizer: one ShardedTensor per contiguous buffer shard (reshardable
# over DP only, like the DeepSpeed state); megatron-core 0.16's default "fully_sharded_model_space"
# builds flattened ShardedTensors its own dist_checkpointing refuses (measured on an H100).
MEGATRON_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
# Adam's moments as torch's AdamW names them in its state.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


class Stepper(Protocol):
    """The parallel training setup of one rank, as the trainer uses it."""

    backend: str  # "deepspeed" | "megatron"
    zero_stage: int | None  # DeepSpeed's ZeRO stage; None for megatron's optimizer
    reshardable: bool  # gives its optimizer state per parameter (full_optimizer_state)

    @property
    def chunks(self) -> list[torch.nn.Module]:
        """The BD3Model chunks themselves (no wrapper prefix in parameter names)."""

    @property
    def forward_models(self) -> list:
        """What to hand to forward_backward_func for training."""

    @property
    def eval_models(self) -> list:
        """What to hand to forward_backward_func for forward-only passes."""

    def zero_grad(self) -> None: ...

    def step(self, lr: float) -> float | None:
        """Finalise and reduce gradients, clip, update at `lr`; the global grad norm before
        clipping (None where the backend reports none)."""

    def save_state(self, directory: Path) -> None:
        """Optimizer and module state for an exact resume in this layout."""

    def load_state(self, directory: Path) -> None: ...

    def full_optimizer_state(
        self, params: dict[str, torch.nn.Parameter]
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Per parameter, its fp32 optimizer state whole over data parallel ({name: {key:
        tensor shaped like the parameter}}), and the replicated values ({"step": n}); for an
        elastic resume (checkpoint.reshard). Collective over data parallel."""

    def load_full_optimizer_state(
        self, params: dict[str, torch.nn.Parameter], states: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> None:
        """The inverse of full_optimizer_state, into this (other) layout."""

    def gathered_parameters(self) -> contextlib.AbstractContextManager:
        """Full parameters inside the block (ZeRO-3 gathers its partitions)."""

    def describe(self) -> str: ...


# ----------------------------------------------------------------------------- groups, chunks


def initialize_from_config(run_config):
    """The megatron parallel state of a run: reuses one that exists (a caller that set it up
    owns it), else creates it. Returns (ParallelInfo, whether this call created it)."""
    from megatron_bd3.parallel import ParallelConfig, initialize_parallel, parallel_info

    info = parallel_info()
    if info is not None:
        return info, False
    p = run_config.parallel
    info = initialize_parallel(
        ParallelConfig(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
            sequence_parallel=p.sequence_parallel,
            context_parallel_size=p.context_parallel_size,
            seed=run_config.training.seed,
        )
    )
    return info, True


def build_model_chunks(model_config, *, device_type: str) -> list[torch.nn.Module]:
    """This rank's model chunk(s). Tensor and sequence parallelism live inside megatron's layers
    (from the config's sizes); pipeline stages decide pre/post-processing; with virtual pipeline
    stages there is one chunk per stage."""
    from megatron_bd3.model import build_bd3_model

    vpp = model_config.virtual_pipeline_model_parallel_size
    if vpp:
        chunks = [build_bd3_model(model_config, vp_stage=i) for i in range(vpp)]
    else:
        chunks = [build_bd3_model(model_config)]
    if device_type == "cuda":
        chunks = [c.cuda() for c in chunks]
    return chunks


# ------------------------------------------------------------------------ gradients and norm


def finalize_model_parallel_grads(chunks: list[torch.nn.Module], model_config: Any) -> None:
    """Reductions megatron's DDP would do besides data parallel, on plain `.grad` tensors.

    - sequence parallel: parameters marked `sequence_parallel` (layer norms) see only their
      sequence shard, so their gradients are summed over the TP group;
    - pipeline parallel with tied input/output embeddings: the two copies' gradients are summed
      over the embedding group (first and last stage).
    Must run before DeepSpeed reduces over data parallel (ZeRO 0/1 paths).
    """
    from megatron.core import parallel_state

    if getattr(model_config, "sequence_parallel", False):
        group = parallel_state.get_tensor_model_parallel_group()
        grads = [
            p.grad
            for chunk in chunks
            for p in chunk.parameters()
            if p.grad is not None and getattr(p, "sequence_parallel", False)
        ]
        if grads and dist.get_world_size(group) > 1:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            for g, synced in zip(
                grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True
            ):
                g.copy_(synced)

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        group = parallel_state.get_embedding_group(check_initialized=False)
        if group is None or dist.get_world_size(group) <= 1:
            return
        if dist.get_rank() not in dist.get_process_group_ranks(group):
            return
        module = chunks[0] if parallel_state.is_pipeline_first_stage() else chunks[-1]
        if not getattr(module, "share_embeddings_and_output_weights", False):
            return
        weight = module.shared_embedding_or_output_weight()
        if weight is not None and weight.grad is not None:
            dist.all_reduce(weight.grad, group=group)


def grad_norm_model_parallel(params, mpu: MegatronMPU) -> float:
    """Global L2 norm of the (already data-parallel-reduced) gradients, TP/PP aware.

    TP-split parameters count on every TP rank, TP-replicated ones on TP rank 0 only, summed over
    the model-parallel (TP x PP) group -- DeepSpeed's rule, used where it reports no norm (ZeRO-0).
    One multi-tensor norm (fp32 per tensor, squares summed in fp64) and one host read: no copy of
    any gradient and no device synchronisation per parameter.
    """
    tp_rank = mpu.get_tensor_model_parallel_rank()
    grads = [
        p.grad.detach()
        for p in params
        if p.grad is not None and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))
    ]
    if grads:
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)  # one per tensor
        total = torch.stack(norms).to(torch.float64).square().sum()
    else:
        total = torch.zeros((), dtype=torch.float64)
    if dist.is_initialized() and mpu.get_model_parallel_world_size() > 1:
        device = next(iter(params)).device if params else torch.device("cpu")
        total = total.to(device)
        dist.all_reduce(total, group=mpu.get_model_parallel_group())
    return float(total.sqrt())


# --------------------------------------------------------------------------------- DeepSpeed


class DeepSpeedStepper:
    """The optimizer step around megatron's forward_backward_func, for one DeepSpeed engine.

    `step(lr)` sets the LR of every param group (the schedule is a pure function of the step),
    finalises model-parallel gradients, reduces over data parallel, clips, updates, and returns
    the global gradient norm before clipping.
    """

    backend = "deepspeed"

    def __init__(
        self,
        engine,
        *,
        engine_forward: bool,
        finalize_grads: Callable[[list[torch.nn.Module]], None] | None = None,
    ) -> None:
        self.engine = engine
        self.engine_forward = engine_forward
        self.mpu = engine.mpu
        self.zero_stage = int(engine.zero_optimization_stage())
        self._finalize_grads = finalize_grads
        # torch's AdamW: wrapped by ZeRO 1-3 / the bf16 optimizer (as `.optimizer`, over flat fp32
        # partitions that DeepSpeed's tensor-fragment API maps to parameters), or bare on the
        # parameters themselves (ZeRO-0 in fp32)
        self._adam = getattr(engine.optimizer, "optimizer", engine.optimizer)
        self._bare = self._adam is engine.optimizer
        # (`_hp_mapping` is None on a rank whose ZeRO partition holds none of the parameter)
        self.reshardable = self._bare or all(
            hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")
            for c in self.chunks for p in c.parameters() if p.requires_grad)

    @property
    def chunks(self) -> list[torch.nn.Module]:
        return engine_chunks(self.engine)

    @property
    def forward_models(self) -> list:
        return [EngineForward(self.engine)] if self.engine_forward else self.chunks

    @property
    def eval_models(self) -> list[torch.nn.Module]:
        return self.chunks

    def describe(self) -> str:
        return f"deepspeed ZeRO-{self.zero_stage}"

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def step(self, lr: float) -> float | None:
        self._set_lr(lr)
        if self._finalize_grads is not None:
            self._finalize_grads(self.chunks)
        norm = None
        if not self.engine_forward:
            # ZeRO-0 on one data-parallel rank: DeepSpeed would still flatten every gradient into
            # a bucket, "all-reduce" it over one rank and copy it back (a 2x gradient-size copy).
            if self.zero_stage != 0 or self.engine.seq_dp_world_size > 1:
                self.engine.allreduce_gradients()
            if self.zero_stage == 0:
                norm = grad_norm_model_parallel(
                    [p for c in self.chunks for p in c.parameters()], self.mpu
                )
        self.engine.step()
        if norm is None:
            reported = self.engine.get_global_grad_norm()
            if reported is not None:
                norm = float(reported.item() if isinstance(reported, torch.Tensor) else reported)
        return norm

    def save_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=DS_TAG, client_state={},
                                    save_latest=False)

    def load_state(self, directory: Path) -> None:
        from megatron_bd3.checkpoint import CheckpointError

        path, _ = self.engine.load_checkpoint(
            str(directory),
            tag=DS_TAG,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise CheckpointError(f"{directory}: DeepSpeed found no engine state under {DS_TAG}")

    def _adam_step(self) -> int:
        """Adam's step count (0 before the first step, when its state does not exist yet)."""
        steps = {float(state["step"]) for state in self._adam.state.values() if "step" in state}
        if len(steps) > 1:
            raise RuntimeError(f"Adam's step counts differ between parameter groups: {steps}")
        return int(steps.pop()) if steps else 0

    def full_optimizer_state(self, params):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        step = self._adam_step()
        moments = MOMENT_KEYS if step > 0 else ()
        states: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in params.items():
            if self._bare:
                state = self._adam.state[p] if moments else {}
                states[name] = {"fp32_param": p.detach().float().clone(),
                                **{key: state[key].detach().clone() for key in moments}}
            else:  # collective over the parameter's data-parallel group
                states[name] = {"fp32_param": safe_get_full_fp32_param(p),
                                **{key: safe_get_full_optimizer_state(p, key) for key in moments}}
        return states, {"step": step}

    def load_full_optimizer_state(self, params, states, common):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        step = int(common["step"])
        if step > 0:
            self._materialise_adam_state(step)
        for name, p in params.items():
            values = states[name]
            if self._bare:
                with torch.no_grad():
                    p.copy_(values["fp32_param"].to(p.dtype))
                for key in MOMENT_KEYS if step > 0 else ():
                    self._adam.state[p][key].copy_(values[key])
                continue
            safe_set_full_fp32_param(p, values["fp32_param"])
            for key in MOMENT_KEYS if step > 0 else ():
                safe_set_full_optimizer_state(p, values[key], key)
        # DeepSpeed's own counters, as its checkpoint would restore them (not used by the update)
        self.engine.global_steps = step
        self.engine.global_samples = step * self.engine.train_batch_size()

    @torch.no_grad()
    def _materialise_adam_state(self, step: int) -> None:
        """Have torch's AdamW create its state (it does so lazily, at the first step) with one
        step of zero gradients at lr 0, which changes no value, then set its step count.
        ZeRO 1/2 and the bf16 optimizer then map the new state to the parameters' fragments
        (what their first real step would do); ZeRO-3 hands its flat fp32 partitions to the
        optimizer only around a step, and does so here too."""
        wrapper = self.engine.optimizer
        if hasattr(wrapper, "_set_fp32_optimizer_param_groups"):  # ZeRO-3
            wrapper._set_fp32_optimizer_param_groups()
        try:
            self._zero_step(step)
        finally:
            if hasattr(wrapper, "_clear_fp32_optimizer_param_groups"):
                wrapper._clear_fp32_optimizer_param_groups()
        link = getattr(wrapper, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO 1/2, bf16
        if link is not None:
            link()

    def _zero_step(self, step: int) -> None:
        flat = [p for group in self._adam.param_groups for p in group["params"]]
        saved_lr = [group["lr"] for group in self._adam.param_groups]
        saved_grads = [p.grad for p in flat]
        for group in self._adam.param_groups:
            group["lr"] = 0.0
        for p in flat:
            p.grad = torch.zeros_like(p)
        self._adam.step()
        for p, grad in zip(flat, saved_grads, strict=True):
            p.grad = grad
        for group, lr in zip(self._adam.param_groups, saved_lr, strict=True):
            group["lr"] = lr
        for p in flat:
            self._adam.state[p]["step"].fill_(step)

    def gathered_parameters(self) -> contextlib.AbstractContextManager:
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        params = [p for c in self.chunks for p in c.parameters()]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def build_deepspeed_stepper(
    chunks: list[torch.nn.Module],
    ds_config: dict[str, Any],
    *,
    pipeline_parallel_size: int = 1,
    model_config: Any = None,
    param_groups: list[dict[str, Any]] | None = None,
) -> DeepSpeedStepper:
    """Wrap the chunks in one DeepSpeed engine. With `model_config` (a megatron config), every
    step first finalises model-parallel gradients for it (see the module docstring)."""
    engine, engine_forward = initialize_engine(
        chunks, ds_config, pipeline_parallel_size=pipeline_parallel_size,
        param_groups=param_groups,
    )
    finalize = None
    if model_config is not None:
        def finalize(step_chunks):
            finalize_model_parallel_grads(step_chunks, model_config)
    return DeepSpeedStepper(engine, engine_forward=engine_forward, finalize_grads=finalize)


# ---------------------------------------------------------------------------------- megatron


class MegatronStepper:
    """megatron DDP chunks + megatron-core's (distributed) optimizer -- GPU only.

    megatron-core's optimizer hard-codes `device='cuda'` and `torch.cuda.FloatTensor` checks
    (optimizer/optimizer.py, distrib_optimizer.py), so the combination check refuses it on CPU
    and the CPU test suite never reaches this class. It follows Megatron-LM's own wiring: each
    chunk wrapped in megatron DDP (contiguous fp32 grad buffers), `finalize_model_grads` as the
    model config's finalize hook, `optimizer.step()` returning (ok, grad norm, zeros).
    """

    backend = "megatron"
    zero_stage = None
    # its resume is refused altogether (checkpoint.manager.refuse_unresumable), so it gives no
    # layout-independent optimizer state either
    reshardable = False

    def __init__(self, wrapped: list[torch.nn.Module], optimizer) -> None:
        self._wrapped = wrapped  # megatron DDP around each chunk
        self.optimizer = optimizer

    @property
    def chunks(self) -> list[torch.nn.Module]:
        """The BD3Model chunks themselves, as DeepSpeedStepper.chunks: parameter names and
        sharded state dicts without DDP's `module.` prefix, so checkpoints, EMA and conversion
        are the same whichever optimizer trained."""
        return [w.module for w in self._wrapped]

    @property
    def forward_models(self) -> list[torch.nn.Module]:
        return self._wrapped

    @property
    def eval_models(self) -> list[torch.nn.Module]:
        return self._wrapped

    def describe(self) -> str:
        return "megatron optimizer"

    def zero_grad(self) -> None:
        for chunk in self._wrapped:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self, lr: float) -> float | None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            return float("nan")
        return None if grad_norm is None else float(grad_norm)

    def save_state(self, directory: Path) -> None:
        from megatron_bd3.checkpoint.manager import save_sharded, sharded_model_state

        sharded = self.optimizer.sharded_state_dict(
            sharded_model_state(self.chunks), metadata=MEGATRON_OPTIMIZER_METADATA)
        save_sharded({"optimizer": sharded}, directory)

    def load_state(self, directory: Path) -> None:
        from megatron_bd3.checkpoint import CheckpointError

        # refused before anything is built (checkpoint.manager.refuse_unresumable)
        raise CheckpointError(f"{directory}: megatron's optimizer state cannot be restored "
                              "exactly (see checkpoint.manager.refuse_unresumable)")

    def gathered_parameters(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def build_megatron_stepper(
    chunks: list[torch.nn.Module], run_config, model_config: Any, precision: str
) -> MegatronStepper:
    """Wrap chunks in megatron DDP and build megatron-core's (distributed) AdamW."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = run_config.optimizer
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=o.use_distributed_optimizer,
    )
    if precision == "bf16":
        # bf16 weights, norms included, as Megatron-LM's Float16Module makes them (its input and
        # output casts are not needed: the inputs are token ids and the loss is taken in fp32);
        # the optimizer keeps fp32 main weights. In place: the trainer's chunk list stays valid.
        for chunk in chunks:
            chunk.bfloat16()
    wrapped = [
        DistributedDataParallel(config=model_config, ddp_config=ddp_config, module=chunk)
        for chunk in chunks
    ]
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=run_config.schedule.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=precision == "bf16",
        params_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        use_distributed_optimizer=o.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, wrapped)
    model_config.finalize_model_grads_func = finalize_model_grads
    model_config.grad_scale_func = optimizer.scale_loss
    model_config.no_sync_func = [c.no_sync for c in wrapped]
    if len(wrapped) == 1:
        model_config.no_sync_func = model_config.no_sync_func[0]
    return MegatronStepper(wrapped, optimizer)


# ------------------------------------------------------------------------------- the one entry


def parallelize(
    run_config,
    model_config,
    chunks: list[torch.nn.Module],
    *,
    environment,
    num_microbatches: int,
    data_parallel_size: int,
) -> Stepper:
    """Data parallelism and the optimizer around this rank's chunks, as the run config says.

    `environment` is the resolved RunEnvironment (device, precision, DeepSpeed JSON; see
    megatron_bd3.training.optimizer.resolve_environment).
    """
    from megatron_bd3.training.optimizer import resolve_torch_adam

    if run_config.optimizer.backend == "megatron":
        return build_megatron_stepper(chunks, run_config, model_config, environment.precision)
    o, t = run_config.optimizer, run_config.training
    # DeepSpeed reduces gradients over MegatronMPU's data-parallel group, which holds the CP
    # ranks too (they must average their gradients), so its batch arithmetic counts them.
    data_parallel_size *= run_config.parallel.context_parallel_size
    ds_config = resolve_deepspeed_config(
        environment.ds_json,
        micro_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=num_microbatches,
        data_parallel_size=data_parallel_size,
        lr=o.lr,
        betas=(o.betas[0], o.betas[1]),
        eps=o.eps,
        weight_decay=o.weight_decay,
        clip_grad=o.clip_grad,
        precision=environment.precision,
        torch_adam=resolve_torch_adam(run_config, environment.machine),
        overrides=run_config.deepspeed.overrides,
        source=str(environment.ds_path),
        device=environment.device_type,
    )
    return build_deepspeed_stepper(
        chunks, ds_config,
        pipeline_parallel_size=model_config.pipeline_model_parallel_size,
        model_config=model_config,
    )


def iterate_named_parameters(chunks: list[torch.nn.Module]) -> Iterator[tuple[str, Any]]:
    """(name, parameter) over all chunks; names get `chunk<i>.` with several chunks (VPP)."""
    for index, chunk in enumerate(chunks):
        prefix = f"chunk{index}." if len(chunks) > 1 else ""
        for name, param in chunk.named_parameters():
            yield prefix + name, param
