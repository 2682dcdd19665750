"""megatron-core's (distributed) optimizer as an alternative to DeepSpeed -- GPU only.

megatron-core's optimizer hard-codes `device='cuda'` and `torch.cuda.FloatTensor` checks
(optimizer/optimizer.py, distrib_optimizer.py), so `check_combination` refuses it on CPU and the
CPU test suite never reaches this module. It follows Megatron-LM's own wiring: each chunk wrapped
in megatron DDP (contiguous fp32 grad buffers), `finalize_model_grads` as the model config's
finalize hook, `optimizer.step()` returning (ok, grad norm, zeros).
"""

from __future__ import annotations

from typing import Any

import torch


class MegatronStepper:
    """Same interface as `DeepSpeedStepper`: forward_models, eval_models, zero_grad, step(lr)."""

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

    zero_stage = None

    def zero_grad(self) -> None:
        for chunk in self._wrapped:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, lr: float) -> float | None:
        self.set_lr(lr)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            return float("nan")
        return None if grad_norm is None else float(grad_norm)


def build_megatron_optimizer(
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
