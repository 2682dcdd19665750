"""forward_step / loss_func for megatron-core's get_forward_backward_func(), shared by the
trainer and the pipeline tests.

Batch dict (one micro-batch, batch-first, identical on every TP/PP peer — the trainer draws the
noise with megatron_bd3.diffusion.noise_batch before the step):
    "x_0":         [b, L] long, clean tokens
    "x_t":         [b, L] long, noisy tokens ([MASK] where masked)
    "masked":      [b, L] bool, True where x_t is [MASK]
    "loss_weight": [b, L] float, NELBO weight per token (1/t of its block)
    "loss_mask":   [b, L] optional 0/1, tokens counted in the loss and its denominator
                   (absent/None: every token counts)
    "dropout_key": optional keyed_dropout.DropoutKey of the micro-batch, held for the model's
                   forward (needed by dropout_rng 'keyed' with dropout on)
    "document_ids": [b, L] optional long, per-token document ids (present exactly when the
                   model has config.document_mask; docs/method.md §1.4)

Schedule call: pass `seq_length=config.stream_length` (2L: stages exchange two-stream hidden
states) and `micro_batch_size=b` to the forward_backward_func.

Loss contract (megatron-core 0.16 schedules, `forward_step_calc_loss`): loss_func returns the
3-tuple (loss_sum, num_tokens, {"lm loss": [loss_sum, num_tokens]}):
    * calculate_per_token_loss=False (default): the schedule divides loss_sum by num_tokens and by
      the number of micro-batches, i.e. per-micro-batch token-mean NELBO averaged over
      micro-batches — the reference's normalisation (loss over all L tokens of the micro-batch,
      then averaged over accumulation steps).
    * calculate_per_token_loss=True: loss_sum is back-propagated as is; the caller divides the
      gradients by the total token count (megatron's finalize_model_grads does).
"lm loss" is this rank's [sum, count] (not reduced over data-parallel ranks): sum it over
micro-batches and DP ranks and divide to get the token-weighted NELBO.

Context parallelism (CP = c, model/context_parallel.py): the batch is the whole [b, L] on every
CP rank; the model returns the terms of this rank's L/c positions. loss_func counts the whole
micro-batch's tokens N (known on every rank: the full loss_mask, or b·L) and returns
c · (this rank's sum) with N, so that the gradients averaged over the data-parallel x CP group
(megatron DDP's dp-cp group, DeepSpeed's data-parallel group under CP) are those of
(sum over all ranks) / N, the CP = 1 loss. Its report is [this rank's sum, N / c]: summed over the
CP ranks it is the micro-batch's [sum, count].
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor

from megatron_bd3.model.bd3_model import BD3LossInputs
from megatron_bd3.model.keyed_dropout import dropout_key_scope

BATCH_KEYS = ("x_0", "x_t", "masked", "loss_weight", "loss_mask", "document_ids")


def loss_func(
    loss_mask: Tensor | None, output_tensor: Tensor, context_parallel_size: int = 1
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Reduce the [b, L] per-token NELBO terms of one micro-batch.

    Returns (loss_sum, num_tokens, {"lm loss": tensor([loss_sum, num_tokens])}); num_tokens is
    the number of counted tokens (loss_mask.sum(), or b·L without a loss mask), the denominator
    of the reference's per-token NELBO. Under context parallelism (output_tensor holds this
    rank's [b, L/c] terms, loss_mask all [b, L]) see the module docstring.
    """
    token_loss = output_tensor.float()
    loss_sum = token_loss.sum()
    cp = context_parallel_size
    if loss_mask is None:
        count = token_loss.numel() * cp
        num_tokens = torch.tensor(count, dtype=torch.int, device=token_loss.device)
    else:
        num_tokens = loss_mask.sum().detach().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.to(loss_sum.dtype) / cp])
    if cp > 1:
        loss_sum = loss_sum * cp
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(
    data_iterator: Iterator[dict[str, Any]] | None, model: torch.nn.Module
) -> tuple[Tensor, partial]:
    """One micro-batch through `model` (a BD3Model chunk, possibly wrapped).

    Every stage consumes one batch from its iterator; middle stages may pass None as the
    iterator (they need no data). Returns (output_tensor, partial(loss_func, loss_mask)).
    """
    from megatron.core import parallel_state

    cp = parallel_state.get_context_parallel_world_size()
    batch = next(data_iterator) if data_iterator is not None else None
    if batch is None:
        return model(None, None, None), partial(loss_func, None, context_parallel_size=cp)
    missing = [key for key in BATCH_KEYS[:4] if key not in batch]
    if missing:
        raise KeyError(f"BD3 batch is missing {missing}; expected keys {BATCH_KEYS}")
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    loss_mask = batch.get("loss_mask")
    loss_inputs = BD3LossInputs(
        masked=batch["masked"], loss_weight=batch["loss_weight"], loss_mask=loss_mask
    )
    with dropout_key_scope(batch.get("dropout_key")):
        output_tensor = model(
            batch["x_t"], batch["x_0"], loss_inputs, document_ids=batch.get("document_ids")
        )
    return output_tensor, partial(loss_func, loss_mask, context_parallel_size=cp)
