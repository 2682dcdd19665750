"""The attention masks the BD3 model hands to its core attention, built once and cached.

Convention (one for the whole model package): a mask that flows through BD3Model, the
TransformerBlock and BD3CoreAttention says **True = may attend** — the convention of
scaled_dot_product_attention, FlexAttention and megatron_bd3.diffusion. It is the opposite of
megatron-core's own boolean masks (True = masked out, used by its DotProductAttention and
`attention_mask_func`); `to_megatron_mask` converts for the rare place that feeds a megatron
kernel (the benchmark).

The mask predicate itself lives in megatron_bd3.diffusion (single source); this module only
chooses the representation (dense bool for SDPA, BlockMask for flex) and caches it per device.

Cached masks double as tokens: BD3CoreAttention recognises them by storage (a pointer check that
also holds for the detached copies megatron's activation checkpointing passes on) and then runs
a structured kernel with the same result instead of the dense masked one:
    dense training mask        -> block-structured attention (block_attention.py) on CPU
    its "x_t outputs only" twin -> the same, and the last layer computes only the x_t queries
    full_attention_mask(n)     -> SDPA without a mask (single-stream B = L, i.e. MDLM)
    causal_attention_mask(n)   -> SDPA with is_causal
Any other bool mask is used as given.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask

from megatron_bd3.diffusion import block_diffusion_block_mask, block_diffusion_mask

AttentionMask = torch.Tensor | BlockMask


@functools.lru_cache(maxsize=16)
def _dense_training_mask(
    seq_length: int, block_size: int, device: torch.device, x_t_outputs_only: bool
) -> torch.Tensor:
    # Two separate tensors with the same values: which one arrives tells the last layer whether
    # anything reads its x_0 outputs. (Always called with all four arguments positionally, so
    # each variant has exactly one cache entry.)
    return block_diffusion_mask(seq_length, block_size, device=device)  # [2L, 2L], True = attend


@functools.lru_cache(maxsize=16)
def _flex_training_mask(seq_length: int, block_size: int, device: torch.device) -> BlockMask:
    return block_diffusion_block_mask(seq_length, block_size, device=device)


def training_attention_mask(
    seq_length: int,
    block_size: int,
    kernel: str,
    device: torch.device | str,
    *,
    x_t_outputs_only: bool = False,
) -> AttentionMask:
    """The BD3 training mask over [x_t ; x_0] (2L × 2L) for `kernel` ('sdpa' → dense bool,
    'flex' → BlockMask). Built once per (L, B, kernel, device) and shared by all layers.

    x_t_outputs_only (sdpa): the caller reads only the x_t half of the final hidden states (the
    training loss), so the last transformer layer may skip the x_0 queries, their attention
    output projection and MLP. Same values, a different cached tensor. Ignored for flex."""
    device = torch.device(device)
    if kernel == "sdpa":
        return _dense_training_mask(seq_length, block_size, device, x_t_outputs_only)
    if kernel == "flex":
        return _flex_training_mask(seq_length, block_size, device)
    raise ValueError(f"attention kernel {kernel!r} is not one of ('flex', 'sdpa')")


@functools.lru_cache(maxsize=16)
def _split_training_mask(
    seq_length: int, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    full = _dense_training_mask(seq_length, block_size, device, False)
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


def _same_storage(mask: torch.Tensor, cached: torch.Tensor) -> bool:
    return (
        mask.shape == cached.shape
        and mask.data_ptr() == cached.data_ptr()
        and mask.stride() == cached.stride()
    )


def training_mask_kind(mask: torch.Tensor, seq_length: int, block_size: int) -> str | None:
    """'all' / 'x_t' if `mask` is (the storage of) the cached dense training mask or its
    x_t-outputs-only twin, else None. A pointer check, not a comparison, so it also holds for the
    detached copy megatron's activation checkpointing passes to the recomputed forward."""
    if mask.dim() != 2 or mask.shape != (2 * seq_length, 2 * seq_length):
        return None
    for kind, x_t_only in (("all", False), ("x_t", True)):
        if _same_storage(mask, _dense_training_mask(seq_length, block_size, mask.device, x_t_only)):
            return kind
    return None


def is_dense_training_mask(mask: torch.Tensor, seq_length: int, block_size: int) -> bool:
    """True if `mask` is one of the cached dense training masks (see training_mask_kind)."""
    return training_mask_kind(mask, seq_length, block_size) is not None


def to_megatron_mask(allowed: torch.Tensor) -> torch.Tensor:
    """[sq, sk] True = may attend  ->  [1, 1, sq, sk] True = masked out (megatron-core)."""
    return (~allowed.bool()).view(1, 1, *allowed.shape[-2:])


# Plain masks handed out by full_attention_mask / causal_attention_mask, by (kind, n, device).
# Looked up without creating anything, so an arbitrary mask costs no allocation to classify.
_PLAIN_MASKS: dict[tuple[str, int, torch.device], torch.Tensor] = {}


def _plain_mask(kind: str, length: int, device: torch.device) -> torch.Tensor:
    key = (kind, length, device)
    if key not in _PLAIN_MASKS:
        if len(_PLAIN_MASKS) >= 32:
            _PLAIN_MASKS.pop(next(iter(_PLAIN_MASKS)))
        mask = torch.ones(length, length, dtype=torch.bool, device=device)
        _PLAIN_MASKS[key] = mask if kind == "full" else mask.tril()
    return _PLAIN_MASKS[key]


def full_attention_mask(length: int, device: torch.device | str) -> torch.Tensor:
    """[n, n] all True, cached: every query attends to every key (single-stream MDLM). The
    core attention runs SDPA without a mask when it receives this tensor."""
    return _plain_mask("full", length, torch.device(device))


def causal_attention_mask(length: int, device: torch.device | str) -> torch.Tensor:
    """[n, n] lower-triangular True, cached: query i attends to keys <= i (plain causal LM). The
    core attention runs SDPA with is_causal when it receives this tensor."""
    return _plain_mask("causal", length, torch.device(device))


def plain_mask_kind(mask: torch.Tensor) -> str | None:
    """'full' / 'causal' if `mask` is a cached full_attention_mask / causal_attention_mask."""
    if mask.dim() != 2 or mask.size(0) != mask.size(1):
        return None
    for kind in ("full", "causal"):
        cached = _PLAIN_MASKS.get((kind, mask.size(0), mask.device))
        if cached is not None and _same_storage(mask, cached):
            return kind
    return None
