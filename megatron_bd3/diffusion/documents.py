"""Document-aware packing: the same-document predicate and per-document positions
(docs/method.md §1.4).

A packed training sequence of L tokens may hold the end of one document, several whole ones and
the start of another. With document masking a token attends only to tokens of its own document,
in both streams of [x_t ; x_0] and on top of the block-diffusion mask (§1.1): query q may attend
to key k iff `block_diffusion_allowed(q, k)` and doc(q mod L) = doc(k mod L). The x_t and x_0
copies of token i share its document, as they share its position.

Documents are given as per-token ids, `document_ids` [b, L] (any integer dtype): equal ids on a
contiguous run of tokens mark one document. They come from the packer (data/packing.py), never
from token values: an EOS id can also occur inside a document's text.

Pure torch, no megatron import; the model's kernels (model/masks.py, model/block_attention.py)
and the tests build their masks from these definitions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask

from megatron_bd3.diffusion.mask import (
    block_diffusion_mask,
    flex_mask_mod,
    validate_block_layout,
)

__all__ = [
    "check_document_ids",
    "document_block_diffusion_mask",
    "document_block_mask",
    "document_positions",
    "same_document_mask",
]


def check_document_ids(document_ids: torch.Tensor, batch: int | None, seq_len: int) -> None:
    """Raise ValueError unless `document_ids` is an integer [batch, seq_len] tensor."""
    if not isinstance(document_ids, torch.Tensor):
        raise ValueError(f"document_ids must be a tensor, got {type(document_ids).__name__}")
    if document_ids.is_floating_point() or document_ids.dtype == torch.bool:
        raise ValueError(f"document_ids must be an integer tensor, got dtype {document_ids.dtype}")
    expected = (batch if batch is not None else document_ids.size(0), seq_len)
    if document_ids.dim() != 2 or tuple(document_ids.shape) != expected:
        raise ValueError(
            f"document_ids must be [batch, seq_length] = {list(expected)}, got "
            f"{list(document_ids.shape)}"
        )


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """[b, L] ids -> [b, L] int64 position of each token inside its document's run (0 at the
    first token of every run; a run continuing from the previous sequence also starts at 0)."""
    b, seq_len = document_ids.shape
    index = torch.arange(seq_len, device=document_ids.device).expand(b, seq_len)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    run_start = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    return index - run_start


def same_document_mask(document_ids: torch.Tensor, streams: int = 2) -> torch.Tensor:
    """[b, L] ids -> [b, s, s] bool, True where query and key are in the same document, over
    s = streams·L positions (position i holds token i mod L)."""
    tiled = document_ids.repeat(1, streams)  # [b, s]
    return tiled[:, :, None] == tiled[:, None, :]


def document_block_diffusion_mask(document_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Dense training mask with documents, [b, 2L, 2L] (row = query, True = may attend)."""
    seq_len = document_ids.size(1)
    validate_block_layout(seq_len, block_size)
    base = block_diffusion_mask(seq_len, block_size, device=document_ids.device)  # [2L, 2L]
    return base[None] & same_document_mask(document_ids)


def _same_document_mask_mod(document_ids: torch.Tensor, seq_len: int) -> Callable:
    def same_document(batch, head, q_idx, kv_idx):
        del head
        return document_ids[batch, q_idx % seq_len] == document_ids[batch, kv_idx % seq_len]

    return same_document


def document_block_mask(
    document_ids: torch.Tensor, block_size: int, tile_size: int = 128
) -> BlockMask:
    """FlexAttention BlockMask of the training mask with documents: Q_LEN = KV_LEN = 2L, one
    batch entry per sequence (B = b), H = None. The mask_mod is the block-diffusion predicate
    and-ed with the same-document predicate (flex's `and_masks`). Built per batch (not cached:
    the documents change with every batch)."""
    batch, seq_len = document_ids.shape
    validate_block_layout(seq_len, block_size)
    mask_mod = and_masks(
        flex_mask_mod(seq_len, block_size), _same_document_mask_mod(document_ids, seq_len)
    )
    return create_block_mask(
        mask_mod,
        B=batch,
        H=None,
        Q_LEN=2 * seq_len,
        KV_LEN=2 * seq_len,
        device=document_ids.device,
        BLOCK_SIZE=tile_size,
    )
