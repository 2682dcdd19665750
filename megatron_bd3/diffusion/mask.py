"""Block-diffusion attention masks (docs/method.md §1 and §3.3).

Training runs one forward pass over the concatenation ``[x_t ; x_0]`` of length ``2L``. Position
``i < L`` is noisy token ``i``; position ``i >= L`` is clean token ``i - L``. Every mask here uses
the same convention: **row = query position, column = key position, True = the query may attend
to the key.**

One predicate, :func:`block_diffusion_allowed`, defines the training mask; the dense mask (SDPA
backend) and the FlexAttention ``BlockMask`` are both built from it, so the two backends cannot
disagree.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

__all__ = [
    "block_diffusion_allowed",
    "block_diffusion_block_mask",
    "block_diffusion_mask",
    "flex_mask_mod",
    "mask_density",
    "sampling_mask",
    "validate_block_layout",
]


def validate_block_layout(seq_len: int, block_size: int) -> None:
    """Raise ValueError unless ``seq_len`` is a positive multiple of a positive ``block_size``."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if seq_len % block_size != 0:
        raise ValueError(f"seq_len {seq_len} is not a multiple of block_size {block_size}")


def block_diffusion_allowed(
    q_idx: torch.Tensor | int, kv_idx: torch.Tensor | int, seq_len: int, block_size: int
) -> torch.Tensor | bool:
    """The BD3-LM training-mask predicate over ``[x_t ; x_0]`` (docs/method.md §1.1).

    ``q_idx`` / ``kv_idx`` are positions in ``[0, 2L)`` (int tensors, broadcast elementwise, or
    plain ints). Returns True where the query may attend to the key:

    * block-diagonal (M_BD): same block and same half;
    * offset block-causal (M_OBC): noisy query, clean key of a strictly earlier block;
    * block-causal (M_BC): clean query, clean key of the same or an earlier block.

    Only comparisons, ``%``, ``//``, ``&`` and ``|`` are used so the function traces under the
    vmap that FlexAttention's ``create_block_mask`` applies to a mask_mod.
    """
    q_clean = q_idx >= seq_len
    kv_clean = kv_idx >= seq_len
    q_noisy = q_idx < seq_len
    q_block = (q_idx % seq_len) // block_size
    kv_block = (kv_idx % seq_len) // block_size

    block_diagonal = (q_block == kv_block) & (q_clean == kv_clean)
    offset_block_causal = q_noisy & kv_clean & (kv_block < q_block)
    block_causal = q_clean & kv_clean & (kv_block <= q_block)
    return block_diagonal | offset_block_causal | block_causal


def flex_mask_mod(seq_len: int, block_size: int) -> Callable[..., torch.Tensor]:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for the training mask of length ``2L``."""
    validate_block_layout(seq_len, block_size)

    def block_diffusion_mask_mod(batch, head, q_idx, kv_idx):
        del batch, head  # the mask is the same for every sequence and head
        return block_diffusion_allowed(q_idx, kv_idx, seq_len, block_size)

    return block_diffusion_mask_mod


def block_diffusion_mask(
    seq_len: int, block_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Dense training mask ``[2L, 2L]`` (bool; row = query, column = key, True = may attend).

    This is what the SDPA backend passes as ``attn_mask``. ``device=None`` means torch's default
    device (CPU unless changed).
    """
    validate_block_layout(seq_len, block_size)
    positions = torch.arange(2 * seq_len, device=device)
    return block_diffusion_allowed(positions[:, None], positions[None, :], seq_len, block_size)


@functools.lru_cache(maxsize=32)
def _cached_block_mask(
    seq_len: int, block_size: int, device: torch.device | None, tile_size: int
) -> BlockMask:
    total = 2 * seq_len
    return create_block_mask(
        flex_mask_mod(seq_len, block_size),
        B=None,
        H=None,
        Q_LEN=total,
        KV_LEN=total,
        device=device,
        BLOCK_SIZE=tile_size,
    )


def block_diffusion_block_mask(
    seq_len: int,
    block_size: int,
    device: torch.device | str | None = None,
    tile_size: int = 128,
) -> BlockMask:
    """FlexAttention ``BlockMask`` of the training mask (Q_LEN = KV_LEN = 2L, B = H = None).

    ``tile_size`` is FlexAttention's sparsity tile (its ``BLOCK_SIZE``), unrelated to the diffusion
    ``block_size``: partly masked tiles evaluate the predicate per element, so the token-level
    mask is exact for any tile size (reference issue #23). ``BlockMask.to_dense()`` shows the tile
    map, not the token mask.

    Results are cached per ``(seq_len, block_size, device, tile_size)`` because
    ``create_block_mask`` is slow; the returned object is shared, so do not mutate it.
    ``device=None`` follows ``create_block_mask``: the current accelerator, else CPU.
    """
    validate_block_layout(seq_len, block_size)
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size <= 0:
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
    normalized = torch.device(device) if device is not None else None
    return _cached_block_mask(seq_len, block_size, normalized, tile_size)


def sampling_mask(
    prefix_len: int,
    block_size: int,
    *,
    query_block_only: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sampling-time mask over the window ``[clean prefix ; current block]`` (docs/method.md §3.3).

    The window has ``W = prefix_len + block_size`` positions: the clean prefix (a whole number of
    blocks, already generated or a prompt) followed by the block being denoised. Window position
    ``i`` belongs to block ``i // block_size``; key ``j`` is visible to query ``i`` iff
    ``j // block_size <= i // block_size``. This is the M_BC part of the training mask over the
    window, so:

    * queries of the current block see the full clean prefix and their whole block (the same
      context a noisy block has in training: earlier clean blocks plus its own noisy block);
    * prefix queries are block-causal, which is the cache-writing pass: clean block ``b`` attends
      to clean blocks ``0..b`` and so produces exactly the K/V the training clean half produces.

    Returns ``[W, W]`` (row = query, column = key, True = may attend). With
    ``query_block_only=True`` only the last ``block_size`` rows are returned, shape
    ``[block_size, W]`` (all True): the KV-cached denoiser call, whose queries are the current
    block and whose keys are ``[cache ; current block]``.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"prefix_len must be a non-negative int, got {prefix_len!r}")
    if prefix_len % block_size != 0:
        raise ValueError(f"prefix_len {prefix_len} is not a multiple of block_size {block_size}")
    window = prefix_len + block_size
    key_blocks = torch.arange(window, device=device) // block_size
    query_positions = torch.arange(prefix_len if query_block_only else 0, window, device=device)
    query_blocks = query_positions // block_size
    return key_blocks[None, :] <= query_blocks[:, None]


def mask_density(seq_len: int, block_size: int) -> float:
    """Fraction of True entries in the ``[2L, 2L]`` training mask: ``1/4 + B/(4L)``.

    Count: M_BD gives ``L*B`` (noisy half), M_OBC ``B^2 N(N-1)/2`` and M_BC ``B^2 N(N+1)/2`` with
    ``N = L/B``; together ``L*B + L^2`` out of ``4 L^2``.
    """
    validate_block_layout(seq_len, block_size)
    return 0.25 + block_size / (4.0 * seq_len)
