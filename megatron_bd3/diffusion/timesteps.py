"""Layout-invariant randomness: per-block diffusion times and token noise (docs/method.md §2.2).

The reference draws ``torch.rand`` per device and stratifies ``t`` over the *local* micro-batch
(docs/method.md §7, pitfall 5), so a sample's noise depends on how the global batch was split.
Here every random number is a pure function of ``(seed, step, sample id, position, stream,
attempt)`` computed by a counter-based hash, and ``t`` is stratified over the **whole global
batch**. A sample therefore gets the same ``t`` and the same mask whether the global batch runs
on 1, 2 or 4 ranks, in one micro-batch or several, and on every TP/PP peer of a rank.

Hash design (keep it stable: changing it changes every mask of every run):

* 32-bit lanes stored in int64 tensors. The mixer is an xorshift-multiply permutation of
  ``[0, 2**32)`` (shifts 16/15/15, odd multipliers 0x21F0AAAD and 0x735A2D97). Multiplication
  mod ``2**32`` is done by splitting the constant into 16-bit halves, so no intermediate exceeds
  ``2**49`` and nothing relies on signed-overflow behaviour; the same code runs on python ints.
* Key words are absorbed one by one, ``state = mix(state ^ word)``, starting from a fixed domain
  constant: seed (low, high 32 bits), step (low, high), stream, attempt (python ints, absorbed
  once per call on the host), then per element the sample id (low, high) and position (low,
  high). For fixed other words the map from one word to the state is a bijection.
* ``uniform = (hash >> 8) * 2**-24`` in float32 (every value exactly representable, in
  ``[0, 1)``); float64 uses all 32 bits.

Reserved streams: :data:`STREAM_BLOCK_TIME`, :data:`STREAM_STRATA_PERMUTATION` and
:data:`STREAM_TOKEN_MASK` (with ``attempt`` = resampling attempt). Other users (e.g. a sampler)
should pick streams >= 16.
"""

from __future__ import annotations

import torch

from megatron_bd3.diffusion.schedules import DEFAULT_CLIP_RANGE, ClipRange

__all__ = [
    "STREAM_BLOCK_TIME",
    "STREAM_STRATA_PERMUTATION",
    "STREAM_TOKEN_MASK",
    "expand_to_tokens",
    "fixed_block_times",
    "hash_uint32",
    "sample_block_times",
    "uniform_noise",
]

STREAM_BLOCK_TIME = 1
STREAM_STRATA_PERMUTATION = 2
STREAM_TOKEN_MASK = 3

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_DOMAIN = 0x6BD3B10C  # fixed start state: "BD3 block"


def _mul32(x, constant: int):
    """``(x * constant) mod 2**32`` for ``x`` in ``[0, 2**32)`` without 64-bit overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x):
    """Bijective 32-bit mixer (xorshift-multiply); works on python ints and int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def _absorb(state, word):
    return _mix32(state ^ word)


def _scalar_words(value: int) -> tuple[int, int]:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"hash key must be an int, got {value!r}")
    value &= _MASK64
    return value & _MASK32, value >> 32


def _absorb_tensor(state, values: torch.Tensor):
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"sample ids / positions must be an integer tensor, got {values.dtype}")
    values = values.to(torch.int64)
    state = _absorb(state, values & _MASK32)
    return _absorb(state, (values >> 32) & _MASK32)


def hash_uint32(
    seed: int,
    step: int,
    sample_ids: torch.Tensor,
    positions: torch.Tensor,
    stream: int,
    attempt: int = 0,
) -> torch.Tensor:
    """Counter-based hash in ``[0, 2**32)`` (int64), elementwise over broadcast
    ``sample_ids`` and ``positions``; a pure function of all six keys."""
    sample_ids = torch.as_tensor(sample_ids)
    positions = torch.as_tensor(positions, device=sample_ids.device)
    state = _DOMAIN
    for value in (seed, step, stream, attempt):
        for word in _scalar_words(value):
            state = _absorb(state, word)
    start = torch.full((), state, dtype=torch.int64, device=sample_ids.device)
    return _absorb_tensor(_absorb_tensor(start, sample_ids), positions)


def uniform_noise(
    seed: int,
    step: int,
    sample_ids: torch.Tensor,
    positions: torch.Tensor,
    stream: int = STREAM_TOKEN_MASK,
    attempt: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform ``[0, 1)`` noise keyed by ``(seed, step, sample id, position, stream, attempt)``.

    ``sample_ids`` and ``positions`` are integer tensors broadcast against each other, e.g.
    ``[b, 1]`` global sample indices and ``[1, L]`` token positions for ``[b, L]`` noise.
    """
    hashed = hash_uint32(seed, step, sample_ids, positions, stream, attempt)
    if dtype == torch.float64:
        return hashed.to(torch.float64) * 2.0**-32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"uniform_noise dtype must be a floating dtype, got {dtype}")
    # 24 bits fill the float32 mantissa exactly; lower precisions round from float32.
    return ((hashed >> 8).to(torch.float32) * 2.0**-24).to(dtype)


def _check_global_indices(global_indices: torch.Tensor, global_batch_size: int) -> None:
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int):
        raise ValueError(f"global_batch_size must be an int, got {global_batch_size!r}")
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if global_indices.dim() != 1:
        raise ValueError(f"global_indices must be 1-D [b], got shape {tuple(global_indices.shape)}")
    if global_indices.is_floating_point() or global_indices.dtype == torch.bool:
        raise ValueError(f"global_indices must be an integer tensor, got {global_indices.dtype}")
    if global_indices.numel() and (
        int(global_indices.min()) < 0 or int(global_indices.max()) >= global_batch_size
    ):
        raise ValueError(
            f"global_indices must lie in [0, global_batch_size={global_batch_size}), got range "
            f"[{int(global_indices.min())}, {int(global_indices.max())}]"
        )


def sample_block_times(
    global_indices: torch.Tensor,
    global_batch_size: int,
    num_blocks: int,
    seed: int,
    step: int,
    clip_range: ClipRange = DEFAULT_CLIP_RANGE,
    antithetic: bool = True,
    *,
    permute_strata: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One diffusion time per (sample, block), shape ``[b, num_blocks]``, in ``clip_range``.

    ``global_indices [b]`` is each local sample's position ``k`` in the global batch
    (``0..G-1``, ``G = global_batch_size``). With ``antithetic=True`` the ``G * N_b`` pairs are
    stratified over the global batch (paper App. C.4): pair ``(k, b)`` takes stratum
    ``j = k * N_b + b`` (or ``perm[j]`` with ``permute_strata=True``, a permutation drawn from
    ``(seed, step)``) and ``t = (j + u) / (G * N_b)``. Otherwise ``t = u``. Finally
    ``t <- eps_min + (eps_max - eps_min) * t``. ``u`` comes from :func:`uniform_noise` with
    position = block index, so the result for a sample does not depend on which other samples
    are in the local batch.
    """
    _check_global_indices(global_indices, global_batch_size)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
        raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
    device = global_indices.device
    sample_ids = global_indices.to(torch.int64)[:, None]  # [b, 1]
    blocks = torch.arange(num_blocks, device=device)[None, :]  # [1, N_b]
    u = uniform_noise(seed, step, sample_ids, blocks, STREAM_BLOCK_TIME, dtype=torch.float64)
    if antithetic:
        num_strata = global_batch_size * num_blocks
        strata = sample_ids * num_blocks + blocks  # [b, N_b]
        if permute_strata:
            keys = hash_uint32(
                seed,
                step,
                torch.zeros((), dtype=torch.int64, device=device),
                torch.arange(num_strata, device=device),
                STREAM_STRATA_PERMUTATION,
            )
            # Keys are distinct (the position word is absorbed through a bijection), so the
            # argsort is a well-defined permutation.
            strata = torch.argsort(keys)[strata]
        t = (strata.to(torch.float64) + u) / num_strata
    else:
        t = u
    t = clip_range.eps_min + (clip_range.eps_max - clip_range.eps_min) * t
    return t.to(dtype)


def fixed_block_times(
    num_samples: int,
    num_blocks: int,
    value: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Constant time ``[num_samples, num_blocks]``; ``value=1`` is B=1 ``eval_nll`` (full
    masking, exact AR NLL)."""
    if not 0.0 < value <= 1.0:
        raise ValueError(f"fixed diffusion time must be in (0, 1], got {value}")
    return torch.full((num_samples, num_blocks), float(value), device=device, dtype=dtype)


def expand_to_tokens(t_blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Repeat each block's value over its tokens: ``[b, N_b] -> [b, N_b * block_size]``."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return t_blocks.repeat_interleave(block_size, dim=-1)
