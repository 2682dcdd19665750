"""Epoch permutations and global-batch layout against plain-Python references."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_bd3.data.layout import BatchLayout, epoch_key, permutation, splitmix64

MASK = (1 << 64) - 1


def splitmix64_reference(state: int) -> int:
    """SplitMix64 (Steele, Lea, Flood 2014) on Python integers: one step from `state`."""
    z = (state + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_splitmix64_matches_the_reference_and_its_known_value():
    assert splitmix64_reference(0) == 0xE220A8397B1DCDAF  # first output of SplitMix64 seeded 0
    values = [0, 1, 2, 12345, MASK, MASK - 7, 1 << 63, 0x0123456789ABCDEF]
    got = splitmix64(np.array(values, dtype=np.uint64)).tolist()
    assert got == [splitmix64_reference(v) for v in values]


@pytest.mark.parametrize(
    "num_samples,seed,epoch", [(1, 0, 0), (17, 3, 0), (300, 3, 1), (300, 4, 1)]
)
def test_permutation_matches_a_sort_by_hashed_index(num_samples, seed, epoch):
    key = epoch_key(seed, epoch)
    expected = sorted(range(num_samples), key=lambda i: splitmix64_reference((i + key) & MASK))
    assert permutation(num_samples, seed, epoch).tolist() == expected


def test_permutations_differ_by_seed_and_epoch():
    base = permutation(1000, 0, 0)
    assert sorted(base.tolist()) == list(range(1000))
    assert not np.array_equal(base, permutation(1000, 0, 1))
    assert not np.array_equal(base, permutation(1000, 1, 0))
    assert np.array_equal(base, permutation(1000, 0, 0))


def reference_micro_batches(num_samples, mb, micro_batches, dp, seed, epoch, remainder, shuffle):
    """Deal each global batch out megatron-style: consecutive micro-batch-sized pieces go to
    rank 0, 1, ..., dp-1 for micro-batch 0, then again for micro-batch 1, and so on."""
    g = mb * micro_batches * dp
    order = permutation(num_samples, seed, epoch).tolist() if shuffle else list(range(num_samples))
    steps = num_samples // g if remainder == "drop" else -(-num_samples // g)
    while len(order) < steps * g:
        order = order + order
    result = {}  # (rank, step, micro-batch) -> (indices, positions)
    for step in range(steps):
        batch = order[step * g : (step + 1) * g]
        for piece in range(micro_batches * dp):
            rank, micro = piece % dp, piece // dp
            positions = list(range(piece * mb, (piece + 1) * mb))
            result[(rank, step, micro)] = ([batch[p] for p in positions], positions)
    return result, steps


@pytest.mark.parametrize("remainder", ["drop", "wrap"])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("mb,micro_batches,dp", [(2, 3, 2), (1, 1, 4), (5, 2, 1)])
def test_layout_matches_the_reference(remainder, shuffle, mb, micro_batches, dp):
    n, seed, epoch = 103, 11, 2
    layout = BatchLayout(n, mb, micro_batches, dp, seed, shuffle=shuffle, remainder=remainder)
    expected, steps = reference_micro_batches(
        n, mb, micro_batches, dp, seed, epoch, remainder, shuffle
    )
    assert layout.steps_per_epoch == steps
    order = layout.epoch_order(epoch)
    per_epoch = layout.micro_batches_per_epoch
    for rank in range(dp):
        for t in range(per_epoch):
            e, step, micro = layout.locate(epoch * per_epoch + t)
            assert e == epoch
            positions = layout.positions(rank, micro)
            indices = order[step * layout.global_batch_size + positions]
            assert (indices.tolist(), positions.tolist()) == expected[(rank, step, micro)]
    g = layout.global_batch_size
    assert layout.samples_dropped_per_epoch == (n % g if remainder == "drop" else 0)
    assert layout.samples_repeated_per_epoch == (steps * g - n if remainder == "wrap" else 0)


def test_layout_rejects_bad_settings():
    with pytest.raises(ValueError, match="fewer than one global batch of 12"):
        BatchLayout(10, 3, 2, 2, 0)
    assert BatchLayout(10, 3, 2, 2, 0, remainder="wrap").steps_per_epoch == 1
    with pytest.raises(ValueError, match="micro_batch_size 0 must be at least 1"):
        BatchLayout(10, 0, 1, 1, 0)
    with pytest.raises(ValueError, match="seed -1 must be >= 0"):
        BatchLayout(10, 1, 1, 1, -1)
    with pytest.raises(ValueError, match="remainder 'pad' is not one of drop, wrap"):
        BatchLayout(10, 1, 1, 1, 0, remainder="pad")
