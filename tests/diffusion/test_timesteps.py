"""Stratified, layout-invariant block times and the counter-based hash."""

import pytest
import torch

from megatron_bd3.diffusion import (
    ClipRange,
    expand_to_tokens,
    fixed_block_times,
    hash_uint32,
    sample_block_times,
    uniform_noise,
)
from megatron_bd3.diffusion.timesteps import _mix32

UNIT = ClipRange(0.0, 1.0)


def python_mix32(x):
    """The documented mixer with python big-int arithmetic (exact mod 2**32)."""
    m = 2**32
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % m
    x ^= x >> 15
    x = (x * 0x735A2D97) % m
    return x ^ (x >> 15)


def test_mixer_matches_exact_modular_arithmetic():
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    values += torch.randint(0, 2**32, (200,), dtype=torch.int64).tolist()
    tensor = _mix32(torch.tensor(values, dtype=torch.int64))
    assert tensor.tolist() == [python_mix32(v) for v in values]
    assert [_mix32(v) for v in values] == [python_mix32(v) for v in values]


def test_hash_is_injective_in_position():
    h = hash_uint32(3, 7, torch.tensor(5), torch.arange(100_000), stream=1)
    assert h.unique().numel() == 100_000
    assert int(h.min()) >= 0 and int(h.max()) < 2**32


@pytest.mark.parametrize("global_batch,num_blocks", [(1, 1), (1, 8), (3, 5), (8, 4), (16, 1)])
@pytest.mark.parametrize("permute", [False, True])
def test_one_draw_per_stratum_of_the_global_batch(global_batch, num_blocks, permute):
    n = global_batch * num_blocks
    for step in range(3):
        t = sample_block_times(
            torch.arange(global_batch),
            global_batch,
            num_blocks,
            seed=11,
            step=step,
            clip_range=UNIT,
            permute_strata=permute,
            dtype=torch.float64,
        )
        assert t.shape == (global_batch, num_blocks)
        strata = (t * n).floor().long().flatten()
        assert sorted(strata.tolist()) == list(range(n))
        if not permute:  # (k, b) -> stratum k * N_b + b, as in the paper's App. C.4
            assert strata.tolist() == list(range(n))


def test_clip_range_mapping_keeps_stratification():
    clip = ClipRange(0.3, 0.8)
    t = sample_block_times(
        torch.arange(6), 6, 4, seed=1, step=2, clip_range=clip, dtype=torch.float64
    )
    assert ((t >= 0.3) & (t < 0.8)).all()
    unit = (t - 0.3) / 0.5
    assert sorted((unit * 24).floor().long().flatten().tolist()) == list(range(24))


def test_layout_invariance_over_ranks_and_microbatches():
    global_batch, num_blocks = 8, 4
    kwargs = dict(seed=5, step=9, clip_range=ClipRange(0.2, 0.9), permute_strata=True)
    full = sample_block_times(torch.arange(global_batch), global_batch, num_blocks, **kwargs)
    for ranks in (1, 2, 4):
        per_rank = global_batch // ranks
        for rank in range(ranks):
            indices = torch.arange(rank * per_rank, (rank + 1) * per_rank)
            for micro in indices.split(max(per_rank // 2, 1)):
                torch.manual_seed(1000 + rank)  # the global torch RNG must play no part
                part = sample_block_times(micro, global_batch, num_blocks, **kwargs)
                assert torch.equal(part, full[micro])
    shuffled = torch.tensor([6, 1, 3])
    assert torch.equal(
        sample_block_times(shuffled, global_batch, num_blocks, **kwargs), full[shuffled]
    )


def test_determinism_and_dependence_on_keys():
    args = (torch.arange(4), 4, 8)
    a = sample_block_times(*args, seed=1, step=3)
    assert torch.equal(a, sample_block_times(*args, seed=1, step=3))
    assert not torch.equal(a, sample_block_times(*args, seed=1, step=4))
    assert not torch.equal(a, sample_block_times(*args, seed=2, step=3))
    ids, pos = torch.arange(4)[:, None], torch.arange(16)[None, :]
    n = uniform_noise(1, 3, ids, pos)
    assert torch.equal(n, uniform_noise(1, 3, ids, pos))
    assert not torch.equal(n, uniform_noise(1, 4, ids, pos))
    assert not torch.equal(n, uniform_noise(1, 3, ids, pos, stream=7))
    assert not torch.equal(n, uniform_noise(1, 3, ids, pos, attempt=1))
    # different steps: essentially no equal values at all
    assert (n == uniform_noise(1, 4, ids, pos)).float().mean() < 0.01


def test_uniformity_sanity():
    u = uniform_noise(0, 0, torch.arange(256)[:, None], torch.arange(256)[None, :])
    assert u.dtype == torch.float32
    assert ((u >= 0) & (u < 1)).all()
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.005
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert (counts - u.numel() / 10).abs().max() < 0.05 * u.numel() / 10
    t = sample_block_times(
        torch.arange(64), 64, 16, seed=3, step=1, antithetic=False, clip_range=UNIT
    )
    assert abs(t.mean().item() - 0.5) < 0.05
    u64 = uniform_noise(
        0, 0, torch.arange(4)[:, None], torch.arange(4)[None, :], dtype=torch.float64
    )
    assert u64.dtype == torch.float64 and ((u64 >= 0) & (u64 < 1)).all()


def test_default_clip_range_and_fixed_times():
    t = sample_block_times(torch.arange(4), 4, 4, seed=0, step=0)
    assert ((t >= 1e-3) & (t <= 1.0)).all()
    fixed = fixed_block_times(3, 5)
    assert fixed.shape == (3, 5) and (fixed == 1.0).all()
    with pytest.raises(ValueError):
        fixed_block_times(3, 5, value=0.0)


def test_expand_to_tokens():
    t = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    expected = torch.tensor([[0.1, 0.1, 0.1, 0.2, 0.2, 0.2], [0.3, 0.3, 0.3, 0.4, 0.4, 0.4]])
    assert torch.equal(expand_to_tokens(t, 3), expected)


def test_bad_global_indices():
    with pytest.raises(ValueError, match="global_batch_size=4"):
        sample_block_times(torch.tensor([0, 4]), 4, 2, seed=0, step=0)
    with pytest.raises(ValueError, match="1-D"):
        sample_block_times(torch.zeros(2, 2, dtype=torch.long), 4, 2, seed=0, step=0)
