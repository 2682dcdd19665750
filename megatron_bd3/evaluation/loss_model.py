"""Per-sequence NELBO terms of noised micro-batches, from either kind of model.

Both return, for each micro-batch, the report of megatron_bd3.training.validation.eval_loss:
"sequence_loss" [b] (sum of the counted per-token terms) and "sequence_tokens" [b] (the counted
tokens), on the ranks whose reports count (`reports_loss`); other ranks get an empty list. Under
context parallelism each CP rank reports its positions' part; the caller's sum over ranks adds
them up.

- MegatronLossModel: the trainer's model chunks in the evaluation's TP/PP layout, run through
  megatron's forward-only schedule (eval_step) exactly like validation.
- StandaloneLossModel: the torch-only network's two-stream pass, SUBS and the NELBO terms from
  megatron_bd3.diffusion (data parallel only).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from megatron_bd3.training.validation import count_mask_for, eval_forward_step, eval_loss


class MegatronLossModel:
    """BD3Model chunks of this rank (any TP/PP/VPP layout)."""

    def __init__(self, chunks: list[torch.nn.Module], model_config, *, reports_loss: bool):
        self.chunks = chunks
        self.config = model_config
        self.reports_loss = reports_loss

    def reports(self, microbatches: list[dict[str, Any]], ignore_bos: bool) -> list[dict]:
        from megatron_bd3.training.step import eval_step

        reports = eval_step(
            self.chunks,
            partial(eval_forward_step, ignore_bos, self.config.block_size),
            microbatches,
            seq_length=self.config.stream_length,
            micro_batch_size=microbatches[0]["x_0"].shape[0],
        )
        return list(reports) if self.reports_loss else []


class StandaloneLossModel:
    """The standalone network (one replica per rank)."""

    reports_loss = True

    def __init__(self, network) -> None:
        self.network = network.eval()
        self.block_size = network.config.block_size
        self.mask_token_id = network.config.mask_token_id

    def nelbo(self, batch: dict[str, Any]):
        """The NELBO of one noised micro-batch (megatron_bd3.diffusion.NELBOOutput: the trainer's
        per-token mean, the [b, L] terms, the [b, N_b] block means), with autograd as called."""
        from megatron_bd3.diffusion import nelbo_from_token_nll, token_nll_from_logits

        logits = self.network.forward_train(batch["x_t"], batch["x_0"])  # [b, L, V]
        token_nll = token_nll_from_logits(logits, batch["x_0"], self.mask_token_id)
        return nelbo_from_token_nll(token_nll, batch["masked"], loss_weight=batch["loss_weight"],
                                    block_size=self.block_size)

    @torch.no_grad()
    def reports(self, microbatches: list[dict[str, Any]], ignore_bos: bool) -> list[dict]:
        out = []
        for batch in microbatches:
            token_loss = self.nelbo(batch).token_loss  # [b, L]
            count_mask = batch.get("count_mask")
            if count_mask is None:
                count_mask = count_mask_for(batch["x_0"], ignore_bos)
            out.append(eval_loss(count_mask, self.block_size, token_loss)[2])
        return out


def megatron_loss_model(source, info, *, device_type: str, precision: str):
    """The checkpoint's weights in this process's TP/PP layout (`info`, the parallel state):
    (MegatronLossModel, its BD3Config). The run's own network (build_model_config of the
    recorded run config), recompute off, weights (EMA or raw) loaded from the layout-independent
    copy whatever layout the run trained in."""
    import copy

    from megatron_bd3.checkpoint import CheckpointError, load_model_weights
    from megatron_bd3.evaluation.source import EvalInputError
    from megatron_bd3.training.config import ParallelSection
    from megatron_bd3.training.model_config import build_model_config
    from megatron_bd3.training.parallelize import build_model_chunks

    config = copy.deepcopy(source.run_config)
    config.model.recompute = None
    parallel = ParallelSection(tensor_model_parallel_size=info.tp_size,
                               pipeline_model_parallel_size=info.pp_size,
                               context_parallel_size=info.cp_size,
                               context_parallel_comm=config.parallel.context_parallel_comm)
    try:
        model_config = build_model_config(config, vocab_size=source.vocab_size,
                                          mask_token_id=source.mask_token_id,
                                          precision=precision, parallel=parallel)
    except ValueError as error:
        raise EvalInputError(f"{source.path}: the layout TP {info.tp_size} x PP {info.pp_size} "
                             f"x CP {info.cp_size} does not fit the model: {error}") from None
    chunks = build_model_chunks(model_config, device_type=device_type)
    try:
        load_model_weights(source.path, chunks, use_ema=source.use_ema,
                           record={"model": source.marker["model"]})
    except CheckpointError as error:
        raise EvalInputError(str(error)) from None
    for chunk in chunks:
        chunk.eval()
    return MegatronLossModel(chunks, model_config, reports_loss=info.reports_loss), model_config
