"""q(x_t | x_0), masked-fraction resampling and noise_batch."""

import pytest
import torch

from megatron_bd3.diffusion import (
    ClipRange,
    get_noise_schedule,
    mask_tokens,
    noise_batch,
    resample_block_noise,
    uniform_noise,
)

MASK_ID = 63


def fractions(masked, block_size):
    b, seq_len = masked.shape
    out = []
    for row in range(b):
        out.append(
            [
                sum(bool(masked[row, s + i]) for i in range(block_size)) / block_size
                for s in range(0, seq_len, block_size)
            ]
        )
    return torch.tensor(out, dtype=torch.float64)


def test_mask_tokens_matches_loop():
    torch.manual_seed(0)
    x_0 = torch.randint(0, MASK_ID, (3, 12))
    move_prob = torch.rand(3, 12)
    noise = torch.rand(3, 12)
    for ignore_bos in (False, True):
        x_t, masked = mask_tokens(x_0, move_prob, MASK_ID, noise, ignore_bos=ignore_bos)
        for r in range(3):
            for c in range(12):
                should = bool(noise[r, c] < move_prob[r, c]) and not (ignore_bos and c == 0)
                assert bool(masked[r, c]) == should
                assert int(x_t[r, c]) == (MASK_ID if should else int(x_0[r, c]))
    _, masked = mask_tokens(x_0, torch.ones(3, 12), MASK_ID, noise, ignore_bos=True)
    assert not masked[:, 0].any() and masked[:, 1:].all()


@pytest.mark.parametrize(
    "clip,block_size",
    [
        (ClipRange(0.3, 0.8), 4),
        (ClipRange(0.45, 0.95), 16),
        (ClipRange(0.5, 1.0), 4),  # lower bound only
        (ClipRange(1e-3, 0.5), 8),  # upper bound only
        (ClipRange(0.5, 1.0), 1),
    ],
)
def test_resampling_puts_every_block_in_range(clip, block_size):
    x_0 = torch.randint(0, MASK_ID, (8, 64))
    batch = noise_batch(
        x_0,
        torch.arange(8),
        8,
        seed=4,
        step=2,
        block_size=block_size,
        mask_token_id=MASK_ID,
        schedule="linear",
        clip_range=clip,
        resample=True,
    )
    frac = fractions(batch.masked, block_size)
    if clip.eps_min > 1e-3:
        assert (frac >= clip.eps_min).all()
    if clip.eps_max < 1.0:
        assert (frac <= clip.eps_max).all()
    # without resampling the same draw has offending blocks (so the test can fail)
    plain = noise_batch(
        x_0,
        torch.arange(8),
        8,
        seed=4,
        step=2,
        block_size=block_size,
        mask_token_id=MASK_ID,
        schedule="linear",
        clip_range=clip,
    )
    plain_frac = fractions(plain.masked, block_size)
    offending = (plain_frac < clip.eps_min) | (plain_frac > clip.eps_max)
    if clip.eps_min == 1e-3:
        offending = plain_frac > clip.eps_max
    if clip.eps_max == 1.0:
        offending = plain_frac < clip.eps_min
    assert offending.any()
    # blocks that were already in range keep their first draw
    keep = (~offending).repeat_interleave(block_size, dim=-1)
    assert torch.equal(batch.masked[keep], plain.masked[keep])


def test_elbo_interval_never_resamples():
    x_0 = torch.randint(0, MASK_ID, (4, 32))
    kwargs = dict(seed=1, step=1, block_size=4, mask_token_id=MASK_ID, schedule="linear")
    a = noise_batch(x_0, torch.arange(4), 4, resample=True, **kwargs)
    b = noise_batch(x_0, torch.arange(4), 4, resample=False, **kwargs)
    assert torch.equal(a.masked, b.masked)


def test_impossible_interval_is_a_value_error():
    with pytest.raises(ValueError, match=r"eps_min=0\.3.*eps_max=0\.45.*block_size 2"):
        noise_batch(
            torch.zeros(2, 8, dtype=torch.long),
            torch.arange(2),
            2,
            seed=0,
            step=0,
            block_size=2,
            mask_token_id=MASK_ID,
            clip_range=ClipRange(0.3, 0.45),
            resample=True,
        )
    with pytest.raises(ValueError, match="block_size 1"):
        noise_batch(
            torch.zeros(2, 8, dtype=torch.long),
            torch.arange(2),
            2,
            seed=0,
            step=0,
            block_size=1,
            mask_token_id=MASK_ID,
            clip_range=ClipRange(0.2, 0.8),
            resample=True,
        )


def test_bounded_tries_is_a_runtime_error_naming_blocks():
    noise = torch.rand(2, 8)
    move_prob = torch.full((2, 8), 1e-9)  # almost nothing is ever masked

    def redraw(attempt):
        return uniform_noise(
            0, 0, torch.arange(2)[:, None], torch.arange(8)[None, :], attempt=attempt
        )

    with pytest.raises(RuntimeError, match=r"max_tries=5.*\(sample 10, block 0\)"):
        resample_block_noise(
            noise,
            move_prob,
            4,
            ClipRange(0.5, 1.0),
            redraw,
            max_tries=5,
            sample_ids=torch.tensor([10, 11]),
        )


def test_noise_batch_layout_invariance_with_resampling():
    global_batch = 8
    x_0 = torch.randint(0, MASK_ID, (global_batch, 32))
    kwargs = dict(
        seed=7,
        step=3,
        block_size=4,
        mask_token_id=MASK_ID,
        schedule="cosine",
        clip_range=ClipRange(0.3, 0.8),
        ignore_bos=True,
        resample=True,
    )
    full = noise_batch(x_0, torch.arange(global_batch), global_batch, **kwargs)
    for ranks in (2, 4):
        per = global_batch // ranks
        for rank in range(ranks):
            idx = torch.arange(rank * per, (rank + 1) * per)
            part = noise_batch(x_0[idx], idx, global_batch, **kwargs)
            for field in ("x_t", "masked", "t_tokens", "t_blocks", "loss_weight"):
                assert torch.equal(getattr(part, field), getattr(full, field)[idx]), field


def test_noise_batch_fields_and_bos():
    x_0 = torch.randint(0, MASK_ID, (16, 64))
    batch = noise_batch(
        x_0,
        torch.arange(16),
        16,
        seed=2,
        step=0,
        block_size=8,
        mask_token_id=MASK_ID,
        schedule="linear",
        ignore_bos=True,
    )
    assert torch.equal(batch.x_t[:, 0], x_0[:, 0]) and not batch.masked[:, 0].any()
    assert torch.equal(batch.masked, batch.x_t == MASK_ID)
    assert torch.equal(batch.x_t[~batch.masked], x_0[~batch.masked])
    assert torch.equal(batch.t_tokens, batch.t_blocks.repeat_interleave(8, dim=-1))
    assert torch.equal(batch.move_prob, batch.t_tokens)
    assert torch.equal(batch.loss_weight, 1 / batch.t_tokens)
    # realised mask rate tracks t (generous: 1024 tokens)
    assert abs(batch.masked[:, 1:].float().mean() - batch.t_tokens[:, 1:].mean()) < 0.06


def test_full_masking_for_eval_nll_and_clipped_weights():
    x_0 = torch.randint(0, MASK_ID, (2, 16))
    batch = noise_batch(
        x_0, torch.arange(2), 2, seed=0, step=0, block_size=1, mask_token_id=MASK_ID, fixed_t=1.0
    )
    assert batch.masked.all() and (batch.loss_weight == 1).all() and (batch.t_blocks == 1).all()
    cosine = noise_batch(
        x_0,
        torch.arange(2),
        2,
        seed=0,
        step=0,
        block_size=4,
        mask_token_id=MASK_ID,
        schedule=get_noise_schedule("cosine"),
        clip_range=ClipRange(0.6, 1.0),
    )
    assert (cosine.loss_weight == 1).all()  # eps_min > 0.5: plain CE
