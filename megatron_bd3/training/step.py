"""One training step: megatron-core's forward_backward_func over the micro-batches, then the
optimizer step. PP = 1 and PP > 1, gradient accumulation and VPP all take this one path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def microbatch_iterators(microbatches: Sequence[Any], num_chunks: int):
    """The data iterator(s) for forward_backward_func.

    With virtual pipeline stages every model chunk pulls one item per micro-batch from its own
    iterator, so each chunk gets an iterator over the same list (first/last chunks use the data,
    middle ones ignore it).
    """
    if num_chunks == 1:
        return iter(microbatches)
    return [iter(microbatches) for _ in range(num_chunks)]


def forward_backward(
    models: list,
    forward_step_func: Callable,
    microbatches: Sequence[Any],
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> list[Any]:
    """Run megatron's schedule for this layout; returns what the last stage's loss_func reported
    per micro-batch (empty on other stages).

    `seq_length` is the length of the activations sent between pipeline stages: 2L for the BD3
    two-stream input, L for AR/MDLM-style single-stream models.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_backward_func = get_forward_backward_func()
    return forward_backward_func(
        forward_step_func=forward_step_func,
        data_iterator=microbatch_iterators(microbatches, len(models)),
        model=models if len(models) > 1 else models[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def train_step(
    stepper,
    forward_step_func: Callable,
    microbatches: Sequence[Any],
    *,
    lr: float,
    seq_length: int,
    micro_batch_size: int,
) -> tuple[list[Any], float | None]:
    """Zero grads, forward/backward every micro-batch, then one optimizer step of the stepper
    (megatron_bd3.training.parallelize.Stepper: it finalises and reduces the gradients).

    Returns (per-micro-batch loss reports from the last stage, grad norm before clipping).
    """
    for chunk in stepper.chunks:
        chunk.train()
    stepper.zero_grad()
    reports = forward_backward(
        stepper.forward_models,
        forward_step_func,
        microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
    )
    grad_norm = stepper.step(lr)
    return reports, grad_norm


@torch.no_grad()
def eval_step(
    models: list,
    forward_step_func: Callable,
    microbatches: Sequence[Any],
    *,
    seq_length: int,
    micro_batch_size: int,
) -> list[Any]:
    for chunk in models:
        chunk.eval()
    return forward_backward(
        models,
        forward_step_func,
        microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=True,
    )
