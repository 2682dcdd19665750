"""The forward process q(x_t | x_0) with optional masked-fraction resampling (docs/method.md §2.2).

:func:`noise_batch` is the one call the trainer and the evaluator use: it draws the per-block
times, the mask, and the per-token loss weights, all layout-invariant (see ``timesteps``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_bd3.diffusion.mask import validate_block_layout
from megatron_bd3.diffusion.schedules import (
    DEFAULT_CLIP_RANGE,
    ELBO_EPS_MIN,
    ClipRange,
    NoiseSchedule,
    get_noise_schedule,
    loss_weight_with_clipping,
)
from megatron_bd3.diffusion.timesteps import (
    STREAM_TOKEN_MASK,
    _check_global_indices,
    expand_to_tokens,
    fixed_block_times,
    sample_block_times,
    uniform_noise,
)

__all__ = [
    "NoisedBatch",
    "check_fraction_reachable",
    "mask_tokens",
    "masked_fraction_bounds",
    "noise_batch",
    "resample_block_noise",
]

DEFAULT_MAX_RESAMPLE_TRIES = 1000


def mask_tokens(
    x_0: torch.Tensor,
    move_prob: torch.Tensor,
    mask_token_id: int,
    noise: torch.Tensor,
    ignore_bos: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbing-state corruption: token ``l`` becomes [MASK] where ``noise[l] < move_prob[l]``.

    ``x_0``, ``move_prob`` and ``noise`` (uniform ``[0, 1)``) are ``[b, L]``. With ``ignore_bos``
    position 0 is never masked (reference ``ignore_bos``: its loss is then 0). Returns
    ``(x_t, masked)``.
    """
    if x_0.shape != noise.shape:
        raise ValueError(f"x_0 shape {tuple(x_0.shape)} != noise shape {tuple(noise.shape)}")
    masked = noise < move_prob
    if ignore_bos:
        masked[..., 0] = False
    x_t = torch.where(masked, torch.full_like(x_0, mask_token_id), x_0)
    return x_t, masked


def masked_fraction_bounds(clip_range: ClipRange) -> tuple[float | None, float | None]:
    """Bounds on a block's realised masked fraction that resampling enforces (None = not
    enforced). Reference rule: a lower bound equal to 1e-3 and an upper bound equal to 1 are not
    enforced, so the ELBO interval ``(1e-3, 1)`` never resamples."""
    lower = None if abs(clip_range.eps_min - ELBO_EPS_MIN) <= 1e-12 else clip_range.eps_min
    upper = None if clip_range.eps_max >= 1.0 else clip_range.eps_max
    return lower, upper


def check_fraction_reachable(clip_range: ClipRange, block_size: int) -> None:
    """Raise ValueError when no masked fraction ``k / block_size`` satisfies the enforced bounds
    (the reference's resampling would loop forever)."""
    lower, upper = masked_fraction_bounds(clip_range)
    lo = 0.0 if lower is None else lower
    hi = 1.0 if upper is None else upper
    if not any(lo <= k / block_size <= hi for k in range(block_size + 1)):
        raise ValueError(
            f"clip range [eps_min={clip_range.eps_min}, eps_max={clip_range.eps_max}] contains "
            f"no masked fraction k/{block_size} for block_size {block_size}: resampling could "
            f"never succeed; widen the clip range or turn resampling off"
        )


def _offending_blocks(
    noise: torch.Tensor,
    move_prob: torch.Tensor,
    block_size: int,
    lower: float | None,
    upper: float | None,
) -> torch.Tensor:
    batch, seq_len = noise.shape
    masked_count = (noise < move_prob).view(batch, seq_len // block_size, block_size).sum(-1)
    fraction = masked_count.to(torch.float64) / block_size  # [b, N_b]
    bad = torch.zeros_like(fraction, dtype=torch.bool)
    if lower is not None:
        bad |= fraction < lower
    if upper is not None:
        bad |= fraction > upper
    return bad


def resample_block_noise(
    noise: torch.Tensor,
    move_prob: torch.Tensor,
    block_size: int,
    clip_range: ClipRange,
    redraw: Callable[[int], torch.Tensor],
    max_tries: int = DEFAULT_MAX_RESAMPLE_TRIES,
    sample_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rejection-resample the noise of blocks whose masked fraction is outside the clip range.

    The realised fraction of block ``(k, b)`` is ``#{l in block: noise < move_prob} / B``
    (before any BOS protection, as in the reference). Offending blocks take their noise from
    ``redraw(attempt)`` (fresh ``[b, L]`` uniform noise for attempt 1, 2, ...); other blocks keep
    theirs, so each block's final mask depends only on its own keyed draws. Which bounds are
    enforced: :func:`masked_fraction_bounds`. Raises ValueError upfront if the bounds are
    unreachable and RuntimeError naming the blocks if ``max_tries`` redraws do not suffice
    (the reference loops forever). Returns the final ``[b, L]`` noise.
    """
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 0:
        raise ValueError(f"max_tries must be a non-negative int, got {max_tries!r}")
    validate_block_layout(noise.shape[-1], block_size)
    lower, upper = masked_fraction_bounds(clip_range)
    if lower is None and upper is None:
        return noise
    check_fraction_reachable(clip_range, block_size)
    for attempt in range(1, max_tries + 2):
        bad = _offending_blocks(noise, move_prob, block_size, lower, upper)
        if not bool(bad.any()):
            return noise
        if attempt > max_tries:
            break
        noise = torch.where(bad.repeat_interleave(block_size, dim=-1), redraw(attempt), noise)
    rows, blocks = torch.nonzero(bad, as_tuple=True)
    ids = rows if sample_ids is None else sample_ids.to(rows.device)[rows]
    pairs = list(zip(ids.tolist(), blocks.tolist(), strict=True))
    shown = ", ".join(f"(sample {k}, block {b})" for k, b in pairs[:8])
    more = f" and {len(pairs) - 8} more" if len(pairs) > 8 else ""
    raise RuntimeError(
        f"masked-fraction resampling gave up after max_tries={max_tries} redraws: {shown}{more} "
        f"still outside [eps_min={clip_range.eps_min}, eps_max={clip_range.eps_max}] with "
        f"block_size {block_size}; raise the number of tries or widen the clip range"
    )


@dataclass(frozen=True)
class NoisedBatch:
    """Everything the loss needs about one corrupted batch (all ``[b, L]`` unless noted)."""

    x_t: torch.Tensor  # token ids, [MASK] where masked
    masked: torch.Tensor  # bool, True where x_t is [MASK]
    t_tokens: torch.Tensor  # diffusion time of each token's block
    t_blocks: torch.Tensor  # [b, N_b]
    move_prob: torch.Tensor  # schedule.move_prob(t_tokens)
    loss_weight: torch.Tensor  # positive weight of -log p at masked tokens


def noise_batch(
    x_0: torch.Tensor,
    global_indices: torch.Tensor,
    global_batch_size: int,
    seed: int,
    step: int,
    block_size: int,
    mask_token_id: int,
    schedule: NoiseSchedule | str = "linear",
    clip_range: ClipRange = DEFAULT_CLIP_RANGE,
    ignore_bos: bool = False,
    resample: bool = False,
    antithetic: bool = True,
    *,
    fixed_t: float | None = None,
    max_resample_tries: int = DEFAULT_MAX_RESAMPLE_TRIES,
    permute_strata: bool = False,
) -> NoisedBatch:
    """Corrupt a local batch ``x_0 [b, L]`` exactly as the reference training step does (§2.2).

    ``global_indices [b]`` gives each row's position in the global batch of
    ``global_batch_size`` samples; together with ``(seed, step)`` it keys all randomness, so the
    result for a sample does not depend on the data-parallel / micro-batch split. Steps:

    1. ``t`` per block, stratified over the global batch, in ``clip_range``
       (or ``fixed_t`` everywhere, e.g. 1.0 for the B=1 ``eval_nll``; then no resampling);
    2. ``move_prob = schedule.move_prob(t)``; loss weight ``schedule.loss_weight(t)``, or 1 when
       the lower bound of ``t`` (``clip_range.eps_min`` or ``fixed_t``) exceeds 0.5;
    3. token noise, resampled per block into the clip range when ``resample`` is set and the
       range is not the ELBO interval;
    4. mask where ``noise < move_prob``, then protect position 0 if ``ignore_bos``.
    """
    if x_0.dim() != 2:
        raise ValueError(f"x_0 must be [b, L], got shape {tuple(x_0.shape)}")
    batch, seq_len = x_0.shape
    validate_block_layout(seq_len, block_size)
    if isinstance(schedule, str):
        schedule = get_noise_schedule(schedule)
    global_indices = torch.as_tensor(global_indices).to(x_0.device)
    if global_indices.shape != (batch,):
        raise ValueError(
            f"global_indices must have shape [{batch}] (one per row of x_0), "
            f"got {tuple(global_indices.shape)}"
        )
    num_blocks = seq_len // block_size

    if fixed_t is None:
        t_blocks = sample_block_times(
            global_indices,
            global_batch_size,
            num_blocks,
            seed,
            step,
            clip_range,
            antithetic,
            permute_strata=permute_strata,
        )
        t_lower_bound = clip_range.eps_min
    else:
        _check_global_indices(global_indices, global_batch_size)
        t_blocks = fixed_block_times(batch, num_blocks, fixed_t, device=x_0.device)
        t_lower_bound = float(fixed_t)
    t_tokens = expand_to_tokens(t_blocks, block_size)  # [b, L]
    move_prob = schedule.move_prob(t_tokens)
    loss_weight = loss_weight_with_clipping(schedule, t_tokens, t_lower_bound)

    sample_ids = global_indices.to(torch.int64)[:, None]  # [b, 1]
    positions = torch.arange(seq_len, device=x_0.device)[None, :]  # [1, L]

    def token_noise(attempt: int) -> torch.Tensor:
        return uniform_noise(seed, step, sample_ids, positions, STREAM_TOKEN_MASK, attempt)

    noise = token_noise(0)
    if resample and fixed_t is None:
        noise = resample_block_noise(
            noise,
            move_prob,
            block_size,
            clip_range,
            token_noise,
            max_resample_tries,
            sample_ids=global_indices,
        )
    x_t, masked = mask_tokens(x_0, move_prob, mask_token_id, noise, ignore_bos)
    return NoisedBatch(x_t, masked, t_tokens, t_blocks, move_prob, loss_weight)
