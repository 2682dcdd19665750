"""Attention masks for the BD3 core attention: pure constructors, and the one named pattern.

Convention (one for the whole model package): a mask that flows through the TransformerBlock
and BD3CoreAttention says **True = may attend** — the convention of
scaled_dot_product_attention, FlexAttention and megatron_bd3.diffusion. It is the opposite of
megatron-core's own boolean masks (True = masked out, used by its DotProductAttention and
`attention_mask_func`); `to_megatron_mask` converts for the rare place that feeds a megatron
kernel (the benchmark).

The mask predicate itself lives in megatron_bd3.diffusion (single source); this module only
builds its representations (dense bool for SDPA, BlockMask for flex), cached per (L, B, device)
so that the layers of a model share one copy. Nothing here is recognised by identity: which
kernel runs is decided by BD3CoreAttention's plan (attention.py), from the config and the
device, never from which tensor arrives.

Document masking (docs/method.md §1.4): with config.document_mask the model passes, in the
attention-mask slot, the per-token document ids [b, L] (an integer tensor; a tensor so it passes
megatron's activation checkpoint like a mask). It is not a mask: it asks for the model's own
attention restricted to documents (`is_document_ids`). `document_attention_masks` builds that
restriction for the dense and flex kernels once per batch (the block-structured CPU kernel takes
the ids directly).

`AttentionPattern.CAUSAL` is what a caller passes *instead of* a mask tensor when it wants plain
causal attention (query i attends to keys <= i): the core attention then runs SDPA with
is_causal, which needs no [n, n] tensor at all.
"""

from __future__ import annotations

import enum
import functools

import torch
from torch.nn.attention.flex_attention import BlockMask

from megatron_bd3.diffusion import (
    block_diffusion_block_mask,
    block_diffusion_mask,
    document_block_mask,
    same_document_mask,
)
from megatron_bd3.model.context_parallel import (
    ContextParallelLayout,
    document_rank_mask,
    flex_document_rank_mask,
)


class AttentionPattern(enum.Enum):
    """A mask a caller names instead of building it (passed where a mask tensor would go).

    Not a tensor, so it cannot pass megatron's activation checkpoint (which saves its arguments
    with save_for_backward): use it without activation recompute, or pass a bool mask."""

    CAUSAL = "causal"


AttentionMask = torch.Tensor | BlockMask | AttentionPattern


@functools.lru_cache(maxsize=16)
def _dense_training_mask(seq_length: int, block_size: int, device: torch.device) -> torch.Tensor:
    return block_diffusion_mask(seq_length, block_size, device=device)  # [2L, 2L], True = attend


@functools.lru_cache(maxsize=16)
def _flex_training_mask(seq_length: int, block_size: int, device: torch.device) -> BlockMask:
    return block_diffusion_block_mask(seq_length, block_size, device=device)


def training_attention_mask(
    seq_length: int, block_size: int, kernel: str, device: torch.device | str
) -> torch.Tensor | BlockMask:
    """The BD3 training mask over [x_t ; x_0] (2L × 2L) for `kernel` ('sdpa' → dense bool
    [2L, 2L], 'flex' → BlockMask). Built once per (L, B, kernel, device) and shared.

    BD3CoreAttention computes this mask itself when it is handed no mask (the model's own
    attention); pass it explicitly only to run it as a caller's own mask (one dense SDPA call,
    or flex with it)."""
    device = torch.device(device)
    if kernel == "sdpa":
        return _dense_training_mask(seq_length, block_size, device)
    if kernel == "flex":
        return _flex_training_mask(seq_length, block_size, device)
    raise ValueError(f"attention kernel {kernel!r} is not one of ('flex', 'sdpa')")


@functools.lru_cache(maxsize=16)
def _split_training_mask(
    seq_length: int, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    full = _dense_training_mask(seq_length, block_size, device)
    noisy_rows = full[:seq_length].contiguous()  # [L, 2L]: x_t queries, all keys
    clean_block = full[seq_length:, seq_length:].contiguous()  # [L, L]: x_0 queries, x_0 keys
    return noisy_rows, clean_block


def split_training_mask(
    seq_length: int, block_size: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense training mask in the two pieces that are not structurally empty:
    x_t queries × all 2L keys ([L, 2L]) and x_0 queries × x_0 keys ([L, L], block-causal).
    The x_0-query × x_t-key quadrant is all False (the clean half never sees noise), so SDPA can
    skip it: 3L² instead of 4L² scores, with identical results."""
    return _split_training_mask(seq_length, block_size, torch.device(device))


def is_document_ids(attention_mask: object) -> bool:
    """Whether an attention-mask argument is per-token document ids (an integer tensor), which
    stand for the model's own attention restricted to documents, not for a caller's mask."""
    return (
        isinstance(attention_mask, torch.Tensor)
        and not attention_mask.is_floating_point()
        and attention_mask.dtype != torch.bool
    )


class PerBatchCache:
    """One entry: what was built for the last batch's document ids [b, L]. Every layer's forward
    and backward (and a recompute) of a batch ask for the same masks, so they are built once per
    batch. The entry holds the ids tensor itself, so a new tensor at a recycled address cannot
    match, and its version, so an in-place edit of the ids rebuilds."""

    def __init__(self) -> None:
        self._entry: tuple | None = None

    def get(self, document_ids: torch.Tensor, key: object, build):
        """The value cached for (these ids, `key`), else `build()` cached in its place."""
        full_key = (key, document_ids._version)
        entry = self._entry
        if entry is not None and entry[0] is document_ids and entry[1] == full_key:
            return entry[2]
        value = build()
        self._entry = (document_ids, full_key, value)
        return value


_document_masks = PerBatchCache()


def document_attention_masks(
    document_ids: torch.Tensor,
    seq_length: int,
    block_size: int,
    kind: str,
    layout: ContextParallelLayout | None = None,
) -> BlockMask | tuple[torch.Tensor, ...]:
    """The model's own attention restricted to documents, for one batch of ids [b, L]:

    'flex'           BlockMask over [x_t ; x_0] with B = b (block-diffusion and same-document);
    'sdpa'           (noisy_rows [b, 1, L, 2L], clean_block [b, 1, L, L]): split_training_mask's
                     two pieces and-ed with the same-document mask;
    'bidirectional'  (same_document [b, 1, L, L],): the single-stream model's mask.

    With a context-parallel `layout` (the ids stay the global [b, L]) the masks are this rank's
    (model/context_parallel.py, n = L / CP): 'flex' a BlockMask of Q_LEN 2n, KV_LEN n + L;
    'sdpa' (noisy_rows [b, 1, n, n + L], clean_block [b, 1, n, L]): its x_t queries against
    [its noisy keys ; all clean keys], its x_0 queries against the clean keys.

    Built once per batch and kind (one-entry cache keyed by the ids tensor)."""
    return _document_masks.get(
        document_ids,
        (kind, seq_length, block_size, layout),
        lambda: _build_document_masks(document_ids, seq_length, block_size, kind, layout),
    )


def _build_document_masks(document_ids, seq_length, block_size, kind, layout):
    if layout is not None:
        return _context_parallel_document_masks(document_ids, kind, layout)
    if kind == "flex":
        return document_block_mask(document_ids, block_size)
    if kind == "sdpa":
        noisy_rows, clean_block = split_training_mask(seq_length, block_size, document_ids.device)
        same = same_document_mask(document_ids, streams=1)  # [b, L, L]
        both_streams = torch.cat([same, same], dim=-1)  # [b, L, 2L]: x_t keys, then x_0 keys
        return (noisy_rows & both_streams)[:, None], (clean_block & same)[:, None]
    if kind == "bidirectional":
        return (same_document_mask(document_ids, streams=1)[:, None],)
    raise ValueError(f"document mask kind {kind!r} is not one of flex, sdpa, bidirectional")


def _context_parallel_document_masks(
    document_ids: torch.Tensor, kind: str, layout: ContextParallelLayout
) -> BlockMask | tuple[torch.Tensor, ...]:
    if kind == "flex":
        return flex_document_rank_mask(layout, document_ids)
    if kind != "sdpa":
        raise ValueError(f"context parallelism has no {kind!r} document mask (two streams only)")
    n = layout.local_length
    allowed = document_rank_mask(layout, document_ids)  # [b, 2n, n + L]
    return allowed[:, None, :n].contiguous(), allowed[:, None, n:, n:].contiguous()


def to_megatron_mask(allowed: torch.Tensor) -> torch.Tensor:
    """[sq, sk] True = may attend  ->  [1, 1, sq, sk] True = masked out (megatron-core)."""
    return (~allowed.bool()).view(1, 1, *allowed.shape[-2:])
