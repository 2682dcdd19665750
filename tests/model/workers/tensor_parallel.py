"""Worker (2 ranks): TP=2 (with and without sequence parallel) against TP=1.

Phase 1 (TP=1, both ranks replicate the model): training logits, inference-path logits,
per-token NELBO loss and gradients of a tiny GQA model. Phase 2/3 (TP=2, then TP=2 + sequence parallel): the TP=1 weights are split
with the rules in tests/model/helpers.py (written from megatron's layouts, not taken from the
model), the same batch runs, and the gathered logits/loss/gradients must match Phase 1.
Gradients of sequence-parallel parameters (norms, row-parallel biases) are partial sums over the
rank's sequence shard; they are all-reduced over TP first, as finalize_model_grads would.
Prints "TP OK <phase> max_logit_diff=... max_grad_diff=..." per phase. A last phase
(tp2_sp_documents) repeats TP=1 against TP=2 + sequence parallel with document masking and the
position reset (loss and gradients; docs/method.md §1.4).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bd3.diffusion import sampling_mask
from megatron_bd3.model import BD3Config, BD3LossInputs, BD3Model, loss_func
from megatron_bd3.parallel import ParallelConfig, destroy_parallel, initialize_parallel
from tests.model.helpers import (
    VOCAB_SIZE,
    random_batch,
    single_stream_logits,
    tiny_overrides,
    tp_partition_dim,
    tp_shard,
)

TOL = dict(atol=1e-5, rtol=1e-4)


def config(tp: int, sequence_parallel: bool, **extra) -> BD3Config:
    return BD3Config(
        **tiny_overrides(
            num_attention_heads=4,
            num_query_groups=2,
            tensor_model_parallel_size=tp,
            sequence_parallel=sequence_parallel,
            **extra,
        )
    )


DOCUMENTS = dict(document_mask=True, document_position_reset=True)
DOCUMENT_IDS = torch.tensor([[0] * 5 + [1] * 9 + [2] * 2, [0] * 3 + [1] * 13])  # [b, L]


def run(model: BD3Model, batch):
    model.zero_grad()
    inputs = BD3LossInputs(batch["masked"], batch["loss_weight"], batch["loss_mask"])
    if model.config.document_mask:  # loss and gradients only
        token_loss = model(batch["x_t"], batch["x_0"], inputs, document_ids=DOCUMENT_IDS)
        loss_sum, num_tokens, _ = loss_func(batch["loss_mask"], token_loss)
        loss = loss_sum / num_tokens
        loss.backward()
        return loss.detach().view(1, 1, 1), loss.detach()
    token_loss = model(batch["x_t"], batch["x_0"], inputs)
    loss_sum, num_tokens, _ = loss_func(batch["loss_mask"], token_loss)
    loss = loss_sum / num_tokens
    loss.backward()
    with torch.no_grad():
        logits = model.forward_logits(batch["x_t"], batch["x_0"])
        # A single-stream pass under a caller's own mask (what a sampler runs), same layout.
        window = torch.cat([batch["x_0"][:, :8], batch["x_t"][:, 8:12]], dim=1)
        inference = single_stream_logits(model, window, sampling_mask(8, 4))
    return torch.cat([logits, inference], dim=1), loss.detach()


def gathered_grads(model: BD3Model, tp: int) -> dict[str, torch.Tensor]:
    group = parallel_state.get_tensor_model_parallel_group()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.detach().clone()
        if getattr(param, "sequence_parallel", False) and model.config.sequence_parallel:
            dist.all_reduce(grad, group=group)
        dim = tp_partition_dim(name)
        if dim is not None and tp > 1:
            parts = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(parts, grad, group=group)
            grad = torch.cat(parts, dim=dim)
        if name.startswith(("embedding.", "output_layer.")):
            grad = grad[:VOCAB_SIZE]  # padded rows differ in count between TP sizes
        grads[name] = grad
    return grads


def main() -> None:
    batch = random_batch(2, seed=21)

    for extra, phases in (({}, ((2, False, "tp2"), (2, True, "tp2_sp"))),
                          (DOCUMENTS, ((2, True, "tp2_sp_documents"),))):
        compare(batch, extra, phases)


def compare(batch, extra, phases) -> None:
    initialize_parallel(ParallelConfig(tensor_model_parallel_size=1, seed=7))
    torch.manual_seed(7)
    reference = BD3Model(config(1, False, **extra))
    full_state = {k: v.clone() for k, v in reference.state_dict().items() if v is not None}
    ref_logits, ref_loss = run(reference, batch)
    ref_grads = gathered_grads(reference, 1)
    destroy_parallel()

    for tp, sp, phase in phases:
        info = initialize_parallel(
            ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp)
        )
        model = BD3Model(config(tp, sp, **extra))
        padded = model.padded_vocab_size
        shards = {
            name: tp_shard(name, tensor, info.tp_rank, tp, padded)
            for name, tensor in full_state.items()
            if isinstance(tensor, torch.Tensor)
        }
        model.load_state_dict(shards, strict=True)
        logits, loss = run(model, batch)
        torch.testing.assert_close(logits, ref_logits, **TOL)
        torch.testing.assert_close(loss, ref_loss, **TOL)
        grads = gathered_grads(model, tp)
        assert grads.keys() == ref_grads.keys()
        worst = 0.0
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=f"{phase} {name}")
            worst = max(worst, (grad - ref_grads[name]).abs().max().item())
        logit_diff = (logits - ref_logits).abs().max().item()
        if info.rank == 0:
            print(f"TP OK {phase} max_logit_diff={logit_diff:.2e} max_grad_diff={worst:.2e}")
        destroy_parallel()


if __name__ == "__main__":
    main()
