"""Worker: context parallelism against one rank, on 2 ranks (CP = 2) or 4 ranks (CP = 2 x TP = 2
or CP = 4), with the all-gather or the ring ('p2p') exchange of the clean keys/values.

Phase 1 (TP = CP = 1, every rank replicates the model): per-token NELBO loss, gradients and the
x_t logits of a tiny GQA model. Phase 2 (CP = 2, with TP = 2 on 4 ranks): the same weights (split
over TP with the rules of tests/model/helpers.py), the same whole [b, L] batch on every rank,
once with the block-structured CPU kernel and once with the dense SDPA path (with TP = 2 also
sequence parallel). Checked:

* the loss: the CP ranks' reports summed equal the CP = 1 loss; the loss each rank
  back-propagates (loss_func) gives, averaged over CP as the data-parallel x CP reduction does,
  every gradient of CP = 1;
* the logits of this rank's positions equal the CP = 1 logits at those positions (the positions
  are written here from the zig-zag definition, not read from the model);
* the exchanged volume: bytes counted by the exchange equal x = (CP - 1) x (L / CP) x b x
  (query groups / TP) x 2 head_dim x 4 bytes per layer forward; backward x with the all-gather
  (its reduce-scatter), 2x with the ring (the keys/values again and their gradients);
* FlexAttention (CPU, forward only, eager) gives the same logits (all-gather; the ring runs its
  own per-chunk kernels whatever the attention kernel).
With 'p2p' the phase is "ring" (with TP = 2 also sequence parallel).
Prints "CP OK <phase> ..." per phase on every rank.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bd3.model import BD3Config, BD3LossInputs, BD3Model, loss_func
from megatron_bd3.model.context_parallel import exchange_meter
from megatron_bd3.parallel import ParallelConfig, destroy_parallel, initialize_parallel
from tests.model.helpers import VOCAB_SIZE, random_batch, tiny_overrides, tp_partition_dim, tp_shard

TOL = dict(atol=2e-5, rtol=1e-4)
L, B, BATCH, HEADS, GROUPS, HEAD_DIM, LAYERS = 32, 4, 2, 4, 2, 8, 2


def config(tp: int, cp: int, **extra) -> BD3Config:
    return BD3Config(**tiny_overrides(
        seq_length=L, block_size=B, num_layers=LAYERS, hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS, num_query_groups=GROUPS, tensor_model_parallel_size=tp,
        context_parallel_size=cp, **extra,
    ))


def zig_zag_positions(rank: int, cp: int) -> torch.Tensor:
    """Chunks rank and 2cp-1-rank of 2cp equal chunks (the documented layout)."""
    chunk = L // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)
    return torch.cat([first, second])


def run(model: BD3Model, batch, cp: int):
    model.zero_grad()
    inputs = BD3LossInputs(batch["masked"], batch["loss_weight"], batch["loss_mask"])
    token_loss = model(batch["x_t"], batch["x_0"], inputs)
    loss_sum, num_tokens, report = loss_func(batch["loss_mask"], token_loss, cp)
    (loss_sum / num_tokens).backward()
    with torch.no_grad():
        logits = model.forward_logits(batch["x_t"], batch["x_0"])  # [b, L / cp, V]
    return logits, report["lm loss"]


def grads_of(model: BD3Model, tp: int, cp: int) -> dict[str, torch.Tensor]:
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.detach().clone()
        if getattr(param, "sequence_parallel", False) and model.config.sequence_parallel:
            dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        if cp > 1:  # the data-parallel x CP averaging of DDP / DeepSpeed
            dist.all_reduce(grad, group=parallel_state.get_context_parallel_group())
            grad /= cp
        dim = tp_partition_dim(name)
        if dim is not None and tp > 1:
            parts = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(parts, grad, group=parallel_state.get_tensor_model_parallel_group())
            grad = torch.cat(parts, dim=dim)
        if name.startswith(("embedding.", "output_layer.")):
            grad = grad[:VOCAB_SIZE]
        grads[name] = grad
    return grads


def main(tp: int, cp: int, comm: str) -> None:
    batch = random_batch(BATCH, seed=5, seq_length=L)

    initialize_parallel(ParallelConfig(seed=3))
    torch.manual_seed(3)
    reference = BD3Model(config(1, 1))
    state = {k: v.clone() for k, v in reference.state_dict().items() if v is not None}
    ref_logits, ref_report = run(reference, batch, 1)
    ref_loss = ref_report[0] / ref_report[1]
    ref_grads = grads_of(reference, 1, 1)
    destroy_parallel()

    info = initialize_parallel(
        ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp, seed=3)
    )
    cp_group = parallel_state.get_context_parallel_group()
    positions = zig_zag_positions(info.cp_rank, cp)
    # with TP, the dense phase also runs sequence parallel (its 2L / CP rows split over TP)
    dense = dict(cpu_block_attention=False, sequence_parallel=tp > 1, cp_comm_type=comm)
    phases = (("block", dict(cp_comm_type=comm)), ("dense_sdpa", dense))
    if comm == "p2p":
        phases = (("ring", dict(cp_comm_type="p2p", sequence_parallel=tp > 1)),)
    for phase, extra in phases:
        model = BD3Model(config(tp, cp, **extra))
        shards = {
            name: tp_shard(name, tensor, info.tp_rank, tp, model.padded_vocab_size)
            for name, tensor in state.items() if isinstance(tensor, torch.Tensor)
        }
        model.load_state_dict(shards, strict=True)
        exchange_meter.reset()
        logits, report = run(model, batch, cp)
        sent = (exchange_meter.forward_bytes, exchange_meter.backward_bytes)

        total = report.clone()
        dist.all_reduce(total, group=cp_group)
        torch.testing.assert_close(total[0] / total[1], ref_loss, **TOL)
        torch.testing.assert_close(logits, ref_logits[:, positions], **TOL)
        grads = grads_of(model, tp, cp)
        assert grads.keys() == ref_grads.keys()
        worst = 0.0
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=f"{phase} {name}")
            worst = max(worst, (grad - ref_grads[name]).abs().max().item())

        # forward (the last layer too: its queries are x_t only, its keys all) and backward
        per_layer = (cp - 1) * (L // cp) * BATCH * (GROUPS // tp) * 2 * HEAD_DIM * 4
        # forward_logits ran one more forward (under no_grad) after the counted step
        backward = 2 * per_layer if comm == "p2p" else per_layer
        expected = (2 * LAYERS * per_layer, LAYERS * backward)
        assert sent == expected, f"{phase}: exchanged {sent} bytes, formula {expected}"
        print(f"CP OK tp{tp}_cp{cp}_{phase} rank={info.rank} loss={float(total[0] / total[1]):.6f}"
              f" max_grad_diff={worst:.2e} bytes_forward={sent[0]} bytes_backward={sent[1]}")

    if comm == "p2p":
        destroy_parallel()
        return
    # FlexAttention with this rank's BlockMask (CPU: forward only, eager)
    model = BD3Model(config(tp, cp, attention_kernel="flex", x_t_only_last_layer=False,
                            cp_comm_type=comm))
    model.load_state_dict({
        name: tp_shard(name, tensor, info.tp_rank, tp, model.padded_vocab_size)
        for name, tensor in state.items() if isinstance(tensor, torch.Tensor)
    }, strict=True)
    model.eval()
    with torch.no_grad():
        flex_logits = model.forward_logits(batch["x_t"], batch["x_0"])
    torch.testing.assert_close(flex_logits, ref_logits[:, positions], **TOL)
    print(f"CP OK tp{tp}_cp{cp}_flex rank={info.rank}")
    destroy_parallel()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
