"""Worker: context parallelism against one rank, on 2 ranks (CP = 2) or 4 ranks (CP = 2 x TP = 2,
or CP = 4), with the all-gather ('all_gather') or the ring ('p2p') exchange of the clean
keys/values (argv: tp cp exchange).

Phase 1 (TP = CP = 1, every rank replicates the model): per-token NELBO loss, gradients and the
x_t logits of a tiny GQA model. Phase 2 (CP = 2, with TP = 2 on 4 ranks): the same weights (split
over TP with the rules of tests/model/helpers.py), the same whole [b, L] batch on every rank,
once with the block-structured CPU kernel and once with the dense SDPA path (with TP = 2 also
sequence parallel), and once with full activation recompute on the block kernel. Checked:

* the loss: the CP ranks' reports summed equal the CP = 1 loss; the loss each rank
  back-propagates (loss_func) gives, averaged over CP as the data-parallel x CP reduction does,
  every gradient of CP = 1;
* the logits of this rank's positions equal the CP = 1 logits at those positions (the positions
  are written here from the zig-zag definition, not read from the model);
* the exchanged volume: bytes counted by the exchange equal x = (CP - 1) x (L / CP) x b x
  (query groups / TP) x 2 head_dim x 4 bytes per layer forward; backward x with the all-gather
  (its reduce-scatter), 2x with the ring (the keys/values again, and their gradients);
* FlexAttention (CPU, forward only, eager) gives the same logits (all-gather: the ring runs its
  own per-chunk kernels whatever the attention kernel).
The same is checked for two model variants against their own CP = 1 runs:
* keyed dropout 0.1 on the embedding, both bias-dropout-adds and the attention probabilities
  (dense SDPA path, with TP = 2 under sequence parallel), under one DropoutKey: the masks of a
  CP rank are those of the same global elements at CP = 1, so loss, gradients and logits agree;
* document masking with per-document RoPE positions, random document runs that cross block and
  chunk edges, the global [b, L] ids on every rank: block kernel and dense SDPA (loss, gradients,
  logits) and flex (logits).
The ring's phases: plain, full recompute, documents, and keyed dropout 0.1 on the embedding and
both bias-dropout-adds (the ring has no attention dropout), each with sequence parallel when
TP = 2.
Prints "CP OK <phase> ..." per phase on every rank.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bd3.model import BD3Config, BD3LossInputs, BD3Model, loss_func
from megatron_bd3.model.context_parallel import exchange_meter
from megatron_bd3.model.keyed_dropout import DropoutKey, dropout_key_scope
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


# Model variants: extra BD3Config settings, and whether the batch carries document ids.
DROPOUT = dict(hidden_dropout=0.1, attention_dropout=0.1, embedding_dropout=0.1,
               dropout_rng="keyed")
# keyed dropout without the attention probabilities' (what the ring takes)
HIDDEN_DROPOUT = dict(hidden_dropout=0.1, embedding_dropout=0.1, dropout_rng="keyed")
DOCUMENTS = dict(document_mask=True, document_position_reset=True)
# the dropout key of the micro-batch: (seed, step, global-batch positions of its rows)
DROPOUT_KEY = DropoutKey(seed=11, step=4, sample_ids=torch.tensor([6, 1]))


def random_documents(seed: int) -> torch.Tensor:
    """[BATCH, L] ids: random runs of 1..12 tokens (crossing block and CP chunk edges)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(BATCH):
        lengths = torch.randint(1, 13, (L,), generator=gen).tolist()
        ids = [doc for doc, n in enumerate(lengths) for _ in range(n)]
        rows.append(torch.tensor(ids[:L]))
    return torch.stack(rows)


def run(model: BD3Model, batch, cp: int):
    model.zero_grad()
    inputs = BD3LossInputs(batch["masked"], batch["loss_weight"], batch["loss_mask"])
    documents = batch.get("document_ids")
    with dropout_key_scope(DROPOUT_KEY):
        token_loss = model(batch["x_t"], batch["x_0"], inputs, document_ids=documents)
        loss_sum, num_tokens, report = loss_func(batch["loss_mask"], token_loss, cp)
        (loss_sum / num_tokens).backward()
        with torch.no_grad():  # [b, L / cp, V] (the same dropout masks as the step)
            logits = model.forward_logits(batch["x_t"], batch["x_0"], documents)
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


def load(model: BD3Model, state, tp_rank: int, tp: int) -> BD3Model:
    model.load_state_dict({
        name: tp_shard(name, tensor, tp_rank, tp, model.padded_vocab_size)
        for name, tensor in state.items() if isinstance(tensor, torch.Tensor)
    }, strict=True)
    return model


def main(tp: int, cp: int, comm: str) -> None:
    batch = random_batch(BATCH, seed=5, seq_length=L)
    document_batch = dict(batch, document_ids=random_documents(seed=6))
    variants = {"plain": ({}, batch), "dropout": (DROPOUT, batch),
                "documents": (DOCUMENTS, document_batch)}
    if comm == "p2p":
        variants = {"plain": ({}, batch), "hidden_dropout": (HIDDEN_DROPOUT, batch),
                    "documents": (DOCUMENTS, document_batch)}

    initialize_parallel(ParallelConfig(seed=3))
    torch.manual_seed(3)
    reference = BD3Model(config(1, 1))
    state = {k: v.clone() for k, v in reference.state_dict().items() if v is not None}
    references = {}
    for variant, (extra, data) in variants.items():
        model = load(BD3Model(config(1, 1, **extra)), state, 0, 1)
        logits, report = run(model, data, 1)
        references[variant] = (logits, report[0] / report[1], grads_of(model, 1, 1))
    destroy_parallel()

    info = initialize_parallel(
        ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp, seed=3)
    )
    cp_group = parallel_state.get_context_parallel_group()
    positions = zig_zag_positions(info.cp_rank, cp)
    # with TP, the dense phase also runs sequence parallel (its 2L / CP rows split over TP)
    dense = dict(cpu_block_attention=False, sequence_parallel=tp > 1)
    full_recompute = dict(recompute_granularity="full", recompute_method="uniform",
                          recompute_num_layers=1)
    phases = (
        ("block", "plain", {}),
        # every layer reruns in backward, its clean key/value all-gather included
        ("recompute_full_block", "plain", full_recompute),
        ("dense_sdpa", "plain", dense),
        ("dropout_dense_sdpa", "dropout", dense),  # attention dropout: the dense path
        ("documents_block", "documents", {}),
        ("documents_dense_sdpa", "documents", dense),
    )
    if comm == "p2p":
        ring = dict(sequence_parallel=tp > 1)
        phases = (
            ("ring", "plain", ring),
            ("ring_recompute_full", "plain", {**ring, **full_recompute}),
            ("ring_hidden_dropout", "hidden_dropout", ring),
            ("ring_documents", "documents", ring),
        )
    for phase, variant, extra in phases:
        extra = dict(extra, cp_comm_type=comm)
        ref_logits, ref_loss, ref_grads = references[variant]
        model = load(BD3Model(config(tp, cp, **extra, **variants[variant][0])), state,
                     info.tp_rank, tp)
        exchange_meter.reset()
        logits, report = run(model, variants[variant][1], cp)
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
        # forward_logits ran one more forward (under no_grad) after the counted step; full
        # recompute one more in backward
        forwards = 3 if "recompute_granularity" in extra else 2
        backward = 2 * per_layer if comm == "p2p" else per_layer
        expected = (forwards * LAYERS * per_layer, LAYERS * backward)
        assert sent == expected, f"{phase}: exchanged {sent} bytes, formula {expected}"
        print(f"CP OK tp{tp}_cp{cp}_{phase} rank={info.rank} loss={float(total[0] / total[1]):.6f}"
              f" max_grad_diff={worst:.2e} bytes_forward={sent[0]} bytes_backward={sent[1]}")

    if comm == "p2p":
        destroy_parallel()
        return
    # FlexAttention with this rank's BlockMask (CPU: forward only, eager)
    for phase, variant in (("flex", "plain"), ("documents_flex", "documents")):
        extra, data = variants[variant]
        model = load(BD3Model(config(tp, cp, attention_kernel="flex", x_t_only_last_layer=False,
                                     cp_comm_type=comm, **extra)), state, info.tp_rank, tp)
        model.eval()
        with torch.no_grad():
            flex_logits = model.forward_logits(data["x_t"], data["x_0"], data.get("document_ids"))
        torch.testing.assert_close(flex_logits, references[variant][0][:, positions], **TOL)
        print(f"CP OK tp{tp}_cp{cp}_{phase} rank={info.rank}")
    destroy_parallel()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
