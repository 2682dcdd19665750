"""The attention masks the BD3 model hands to its core attention, built once and cached.

Convention (one for the whole model package): a mask that flows through BD3Model, the
TransformerBlock and BD3CoreAttention says **True = may attend** — the convention of
scaled_dot_product_attention, FlexAttention and megatron_bd3.diffusion. It is the opposite of
megatron-core's own boolean masks (True = masked out, used by its DotProductAttention and
`attention_mask_func`); `to_megatron_mask` converts for the rare place that feeds a megatron
kernel (the benchmark).

The mask predicate itself lives in megatron_bd3.diffusion (single source); this module only
chooses the representation (dense bool for SDPA, BlockMask for flex) and caches it per device.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask

from megatron_bd3.diffusion import block_diffusion_block_mask, block_diffusion_mask

AttentionMask = torch.Tensor | BlockMask


@functools.lru_cache(maxsize=16)
def _dense_training_mask(seq_length: int, block_size: int, device: torch.device) -> torch.Tensor:
    return block_diffusion_mask(seq_length, block_size, device=device)  # [2L, 2L], True = attend


@functools.lru_cache(maxsize=16)
def _flex_training_mask(seq_length: int, block_size: int, device: torch.device) -> BlockMask:
    return block_diffusion_block_mask(seq_length, block_size, device=device)


def training_attention_mask(
    seq_length: int, block_size: int, kernel: str, device: torch.device | str
) -> AttentionMask:
    """The BD3 training mask over [x_t ; x_0] (2L × 2L) for `kernel` ('sdpa' → dense bool,
    'flex' → BlockMask). Built once per (L, B, kernel, device) and shared by all layers."""
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


def is_dense_training_mask(mask: torch.Tensor, seq_length: int, block_size: int) -> bool:
    """True if `mask` is (a view of the storage of) the cached dense training mask: a pointer
    check, not a comparison, so it also holds for the detached copy megatron's activation
    checkpointing passes to the recomputed forward."""
    if mask.dim() != 2 or mask.shape != (2 * seq_length, 2 * seq_length):
        return False
    cached = _dense_training_mask(seq_length, block_size, mask.device)
    return mask.data_ptr() == cached.data_ptr() and mask.stride() == cached.stride()


def to_megatron_mask(allowed: torch.Tensor) -> torch.Tensor:
    """[sq, sk] True = may attend  ->  [1, 1, sq, sk] True = masked out (megatron-core)."""
    return (~allowed.bool()).view(1, 1, *allowed.shape[-2:])


def full_attention_mask(length: int, device: torch.device | str) -> torch.Tensor:
    """[n, n] all True: every query attends to every key (single-stream MDLM-style)."""
    return torch.ones(length, length, dtype=torch.bool, device=device)
