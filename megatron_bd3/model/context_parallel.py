"""Context parallelism (CP) of the two-stream training input [x_t ; x_0] (docs/training.md,
"Context parallelism"; the mask is docs/method.md §1.1).

Layout. The L positions are cut into 2·c chunks of L / (2c) positions, each made of whole
blocks (c = context_parallel_size). CP rank r holds chunks r and 2c − 1 − r ("zig-zag") of
*both* streams, at the same positions: its local input is

    [x_t at its positions ; x_0 at the same positions]       2L / c rows, [s, b, h]

Why zig-zag: a noisy query at position p reads its own block and the clean blocks before it, a
clean query the clean blocks up to its own, so the work of a position grows with p. Chunk r and
chunk 2c − 1 − r together cost the same on every rank. Why the same positions in both streams:
a noisy query's own noisy block is then on its rank, so noisy keys and values never leave it.

Exchange (cp_comm_type 'all_gather'; the ring, 'p2p', is model/ring_attention.py).
The only keys a rank lacks are clean ones of earlier positions. Each layer all-gathers
the clean stream's keys and values ([L/c, b, ng, 2·hn] per rank, K and V in one message) into
the global order ([L, b, ng, 2·hn]); the backward reduce-scatters (sums) their gradients back to
the ranks that own them (`gather_clean_key_values`). Per layer and micro-batch a rank therefore
sends (c − 1) · (L/c) · b · ng · 2 · hn elements forward and as many backward, and nothing of
the noisy stream or of the queries (`ExchangeMeter` counts it). The local attention then runs on
the existing kernels with the rank's own mask: its 2L/c queries against [its L/c noisy keys ;
all L clean keys], the predicate of megatron_bd3.diffusion evaluated at the global indices
(`query_key_indices`).

RoPE uses the global positions (`ContextParallelLayout.positions`), and the loss of a rank
covers its positions only: the caller slices every [b, L] input with `ContextParallelLayout.local`.

Global indices elsewhere. Document ids stay the whole sequence's [b, L] on every rank; the
rank's masks compare them at the global positions of its queries and keys
(`document_rank_mask`, `flex_document_rank_mask`; the block kernel takes ids and spans).
Keyed dropout keys the rank's rows by `stream_rows` and its attention probabilities by
`query_key_indices`, so every element gets the mask of the same element at CP = 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from megatron_bd3.diffusion import block_diffusion_allowed


@dataclass(frozen=True)
class ContextParallelLayout:
    """Which positions CP rank `rank` of `size` holds, for sequences of L = `seq_length`
    tokens in blocks of `block_size` (see the module docstring)."""

    seq_length: int
    block_size: int
    size: int
    rank: int

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"context-parallel rank {self.rank} is not in [0, {self.size})")
        quantum = 2 * self.size * self.block_size
        if self.seq_length % quantum:
            raise ValueError(
                f"context_parallel_size {self.size} cuts seq_length {self.seq_length} into "
                f"{2 * self.size} chunks of whole blocks; seq_length must be a multiple of "
                f"2 x context_parallel_size x block_size = {quantum}"
            )

    @property
    def chunk_length(self) -> int:
        """Positions per chunk, L / (2c)."""
        return self.seq_length // (2 * self.size)

    @property
    def local_length(self) -> int:
        """Positions per rank (per stream), L / c."""
        return 2 * self.chunk_length

    def spans_of(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(first global position, length) of the two chunks of `rank`, in increasing order."""
        n = self.chunk_length
        return (rank * n, n), ((2 * self.size - 1 - rank) * n, n)

    @property
    def spans(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return self.spans_of(self.rank)

    def positions_of(self, rank: int) -> Tensor:
        """Global positions [L/c] held by `rank`, in local order."""
        return torch.cat([torch.arange(s, s + n) for s, n in self.spans_of(rank)])

    @functools.cached_property
    def positions(self) -> Tensor:
        """Global positions [L/c] of this rank's tokens (the RoPE positions), local order."""
        return self.positions_of(self.rank)

    @functools.cached_property
    def global_order(self) -> Tensor:
        """[L]: row of the rank-major gathered tensor that holds global position p."""
        gathered = torch.cat([self.positions_of(r) for r in range(self.size)])
        return torch.argsort(gathered)

    def local(self, tensor: Tensor, dim: int = 1) -> Tensor:
        """This rank's positions of a tensor over all L positions along `dim` ([b, L] -> [b, L/c]
        by default)."""
        if tensor.size(dim) != self.seq_length:
            raise ValueError(
                f"context parallelism slices {self.seq_length} positions, got a tensor of "
                f"{tensor.size(dim)} along dim {dim} (shape {tuple(tensor.shape)})"
            )
        return torch.cat([tensor.narrow(dim, s, n) for s, n in self.spans], dim=dim)

    @functools.cached_property
    def stream_rows(self) -> Tensor:
        """[2L/c] index in [0, 2L) of each row of this rank's two-stream input [x_t ; x_0]
        (x_t position p is p, x_0 position p is L + p): the global rows keyed dropout is keyed by
        (model/keyed_dropout.py)."""
        return torch.cat([self.positions, self.positions + self.seq_length])

    def query_key_indices(self, queries: int) -> tuple[Tensor, Tensor]:
        """Indices in [0, 2L) (docs/method.md §1.1: x_t position p is p, x_0 position p is L + p)
        of this rank's `queries` query rows (L/c x_t rows, or 2L/c rows [x_t ; x_0]) and of its
        key rows [its L/c noisy keys ; all L clean keys]."""
        L, pos = self.seq_length, self.positions
        query = pos if queries == self.local_length else torch.cat([pos, pos + L])
        key = torch.cat([pos, torch.arange(L, 2 * L)])
        return query, key


def current_layout(seq_length: int, block_size: int) -> ContextParallelLayout | None:
    """The layout of this rank from megatron's parallel state; None without context parallelism."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    size = parallel_state.get_context_parallel_world_size()
    if size == 1:
        return None
    rank = parallel_state.get_context_parallel_rank()
    return ContextParallelLayout(seq_length, block_size, size, rank)


# ------------------------------------------------------------------------------ the exchange


class ExchangeMeter:
    """Bytes this process has sent in the clean key/value exchange, forward and backward.

    A ring all-gather (or reduce-scatter) of a local payload of x bytes over c ranks sends
    (c − 1)·x bytes from each rank; that is what is counted (the same volume NCCL's bus
    bandwidth is defined by). The ring exchange (ring_attention.py) counts the payload of each
    message it sends. Read by the tests and tools/bench/long_context_bench.py."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.forward_bytes = 0
        self.backward_bytes = 0
        self.calls = 0


exchange_meter = ExchangeMeter()


class _GatherCleanKeyValues(torch.autograd.Function):
    """All-gather along dim 0 over the CP group, reordered to global positions; the backward
    reduce-scatters (sums) the gradient back to the rank that owns each row."""

    @staticmethod
    def forward(ctx, local: Tensor, layout: ContextParallelLayout, group) -> Tensor:
        size = layout.size
        gathered = local.new_empty((size * local.size(0), *local.shape[1:]))
        dist.all_gather_single(gathered, local.contiguous(), group=group)
        exchange_meter.forward_bytes += (size - 1) * local.numel() * local.element_size()
        exchange_meter.calls += 1
        order = layout.global_order.to(local.device)
        ctx.layout, ctx.group = layout, group
        return gathered.index_select(0, order)  # [L, ...] in global position order

    @staticmethod
    def backward(ctx, grad: Tensor):
        layout = ctx.layout
        rank_major = torch.empty_like(grad)
        rank_major.index_copy_(0, layout.global_order.to(grad.device), grad)
        local = grad.new_empty((grad.size(0) // layout.size, *grad.shape[1:]))
        dist.reduce_scatter_single(local, rank_major, group=ctx.group)
        exchange_meter.backward_bytes += (layout.size - 1) * local.numel() * local.element_size()
        return local, None, None


def gather_clean_key_values(
    local: Tensor, layout: ContextParallelLayout, group: dist.ProcessGroup
) -> Tensor:
    """[L/c, b, ...] clean-stream rows of this rank -> [L, b, ...] of all ranks, global order.
    Differentiable: the gradient of every row returns, summed, to the rank that owns it."""
    return _GatherCleanKeyValues.apply(local, layout, group)


# ------------------------------------------------------------------------- per-rank masks


@functools.lru_cache(maxsize=16)
def dense_rank_mask(layout: ContextParallelLayout, queries: int, device: torch.device) -> Tensor:
    """[queries, L/c + L] bool, True = may attend: this rank's queries against [its noisy keys ;
    all clean keys], the training mask's predicate at their global indices."""
    q, k = layout.query_key_indices(queries)
    q, k = q.to(device), k.to(device)
    return block_diffusion_allowed(q[:, None], k[None, :], layout.seq_length, layout.block_size)


@functools.lru_cache(maxsize=16)
def flex_rank_mask(
    layout: ContextParallelLayout, queries: int, device: torch.device, tile_size: int = 128
) -> BlockMask:
    """The FlexAttention BlockMask of `dense_rank_mask` (Q_LEN = queries, KV_LEN = L/c + L)."""
    q_index, k_index = layout.query_key_indices(queries)
    q_index, k_index = q_index.to(device), k_index.to(device)
    L, B = layout.seq_length, layout.block_size

    def rank_mask_mod(batch, head, q_idx, kv_idx):
        del batch, head
        return block_diffusion_allowed(q_index[q_idx], k_index[kv_idx], L, B)

    return create_block_mask(
        rank_mask_mod, B=None, H=None, Q_LEN=queries, KV_LEN=k_index.numel(), device=device,
        BLOCK_SIZE=tile_size,
    )


# ------------------------------------------------------------ per-rank masks with documents
# Document masking (docs/method.md §1.4) under context parallelism: the document ids are the
# whole sequence's [b, L] on every CP rank (the batch is not sliced before the model), so a
# query and a key compare the ids at their global positions (index mod L).


def _rank_documents(layout: ContextParallelLayout, document_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Document id of each of this rank's 2L/c query rows [b, 2L/c] and of each of its key rows
    [b, L/c + L] ([its noisy keys ; all clean keys]), from the global ids [b, L]."""
    if document_ids.dim() != 2 or document_ids.size(1) != layout.seq_length:
        raise ValueError(
            f"context-parallel document masks take the global document ids [b, "
            f"{layout.seq_length}], got {list(document_ids.shape)}"
        )
    q, k = layout.query_key_indices(2 * layout.local_length)
    device = document_ids.device
    L = layout.seq_length
    return document_ids[:, q.to(device) % L], document_ids[:, k.to(device) % L]


def document_rank_mask(layout: ContextParallelLayout, document_ids: Tensor) -> Tensor:
    """[b, 2L/c, L/c + L] bool, True = may attend: `dense_rank_mask` of all this rank's queries
    and-ed with the same-document predicate at the global positions; `document_ids` [b, L] are
    the global ids."""
    query_docs, key_docs = _rank_documents(layout, document_ids)
    allowed = dense_rank_mask(layout, 2 * layout.local_length, document_ids.device)
    return allowed[None] & (query_docs[:, :, None] == key_docs[:, None, :])


def flex_document_rank_mask(
    layout: ContextParallelLayout, document_ids: Tensor, tile_size: int = 128
) -> BlockMask:
    """The FlexAttention BlockMask of `document_rank_mask`: B = b, Q_LEN = 2L/c, KV_LEN =
    L/c + L; the rank's block-diffusion predicate and-ed with the same-document one. Built per
    batch (the documents change with every batch)."""
    query_docs, key_docs = _rank_documents(layout, document_ids)
    device = document_ids.device
    q_index, k_index = layout.query_key_indices(2 * layout.local_length)
    q_index, k_index = q_index.to(device), k_index.to(device)
    L, B = layout.seq_length, layout.block_size

    def rank_document_mask_mod(batch, head, q_idx, kv_idx):
        del head
        same_document = query_docs[batch, q_idx] == key_docs[batch, kv_idx]
        return block_diffusion_allowed(q_index[q_idx], k_index[kv_idx], L, B) & same_document

    return create_block_mask(
        rank_document_mask_mod, B=document_ids.size(0), H=None, Q_LEN=q_index.numel(),
        KV_LEN=k_index.numel(), device=device, BLOCK_SIZE=tile_size,
    )
