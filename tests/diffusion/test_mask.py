"""Training / sampling attention masks against loops written from the rules of docs/method.md §1."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask, flex_attention

from megatron_bd3.diffusion import (
    block_diffusion_allowed,
    block_diffusion_block_mask,
    block_diffusion_mask,
    flex_mask_mod,
    mask_density,
    sampling_mask,
)

SIZES = [(1, 1), (4, 1), (4, 4), (6, 2), (8, 2), (12, 3), (16, 4), (16, 16), (10, 5)]


def reference_mask(seq_len, block_size):
    """M_full = [[M_BD, M_OBC], [0, M_BC]] from the three rules of §1.1, one entry at a time."""

    def half(i):
        return 0 if i < seq_len else 1

    def blk(i):
        return (i % seq_len) // block_size

    size = 2 * seq_len
    out = torch.zeros(size, size, dtype=torch.bool)
    for q in range(size):
        for k in range(size):
            bd = blk(q) == blk(k) and half(q) == half(k)
            obc = half(q) == 0 and half(k) == 1 and blk(k) < blk(q)
            bc = half(q) == 1 and half(k) == 1 and blk(k) <= blk(q)
            out[q, k] = bd or obc or bc
    return out


@pytest.mark.parametrize("seq_len,block_size", SIZES)
def test_dense_mask_matches_definition(seq_len, block_size):
    expected = reference_mask(seq_len, block_size)
    got = block_diffusion_mask(seq_len, block_size)
    assert got.dtype == torch.bool and got.shape == (2 * seq_len, 2 * seq_len)
    assert torch.equal(got, expected)


def test_predicate_on_python_ints():
    expected = reference_mask(8, 2)
    for q in range(16):
        for k in range(16):
            assert bool(block_diffusion_allowed(q, k, 8, 2)) == bool(expected[q, k])


def test_worked_example_l6_b2():
    rows = """
110000 000000
110000 000000
001100 110000
001100 110000
000011 111100
000011 111100
000000 110000
000000 110000
000000 111100
000000 111100
000000 111111
000000 111111
"""
    literal = torch.tensor(
        [[c == "1" for c in line.replace(" ", "")] for line in rows.strip().splitlines()]
    )
    assert torch.equal(block_diffusion_mask(6, 2), literal)


@pytest.mark.parametrize("seq_len,block_size", SIZES + [(1024, 4), (1024, 16), (1024, 1024)])
def test_density(seq_len, block_size):
    formula = 0.25 + block_size / (4 * seq_len)
    assert mask_density(seq_len, block_size) == pytest.approx(formula, rel=1e-12)
    dense = block_diffusion_mask(seq_len, block_size)
    count = int(dense.sum())
    assert count == seq_len * seq_len + seq_len * block_size
    assert count / dense.numel() == pytest.approx(formula, rel=1e-12)


def test_b_equals_l_is_mdlm_and_b1_is_ar():
    seq_len = 8
    full = block_diffusion_mask(seq_len, seq_len)
    assert full[:seq_len, :seq_len].all() and not full[:seq_len, seq_len:].any()
    ar = block_diffusion_mask(seq_len, 1)
    for i in range(seq_len):
        # noisy token i: itself plus clean tokens < i
        expected = torch.zeros(2 * seq_len, dtype=torch.bool)
        expected[i] = True
        expected[seq_len : seq_len + i] = True
        assert torch.equal(ar[i], expected)


def test_invalid_layout_names_both_values():
    with pytest.raises(ValueError, match="seq_len 10 is not a multiple of block_size 4"):
        block_diffusion_mask(10, 4)
    with pytest.raises(ValueError, match="1000.*16"):
        block_diffusion_block_mask(1000, 16, device="cpu")
    with pytest.raises(ValueError):
        block_diffusion_mask(8, 0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize(
    "seq_len,block_size,tile_size",
    [
        (6, 2, 128),  # one partial tile
        (100, 4, 128),  # 2L = 200: not a multiple of 128, bigger than one tile
        (160, 8, 128),  # 2L = 320: two full tiles and a partial one
        (48, 8, 16),  # several small tiles, some fully masked
        (32, 32, 16),  # B = L
        (24, 1, 16),  # B = 1
    ],
)
def test_flex_block_mask_matches_dense(seq_len, block_size, tile_size):
    torch.manual_seed(0)
    dense = reference_mask(seq_len, block_size)
    total = 2 * seq_len
    block_mask = block_diffusion_block_mask(seq_len, block_size, device="cpu", tile_size=tile_size)

    token_mask = create_mask(flex_mask_mod(seq_len, block_size), None, None, total, total, "cpu")
    assert torch.equal(token_mask[0, 0], dense)

    # Tile map (what BlockMask.to_dense shows): a tile is kept iff it holds an allowed entry.
    tiles = block_mask.to_dense()[0, 0].bool()
    n_tiles = -(-total // tile_size)
    padded = torch.zeros(n_tiles * tile_size, n_tiles * tile_size, dtype=torch.bool)
    padded[:total, :total] = dense
    expected_tiles = padded.view(n_tiles, tile_size, n_tiles, tile_size).any(3).any(1)
    assert torch.equal(tiles, expected_tiles)

    q, k, v = (torch.randn(2, 2, total, 8) for _ in range(3))
    flex_out = flex_attention(q, k, v, block_mask=block_mask)
    sdpa_out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(flex_out, sdpa_out, rtol=1e-5, atol=1e-5)


def test_block_mask_is_cached():
    first = block_diffusion_block_mask(16, 4, device="cpu", tile_size=16)
    assert block_diffusion_block_mask(16, 4, device="cpu", tile_size=16) is first
    assert block_diffusion_block_mask(16, 2, device="cpu", tile_size=16) is not first


def reference_sampling_mask(prefix_len, block_size):
    """Window [clean prefix ; current block]: the block sees everything; a prefix token sees the
    prefix tokens of its own and earlier blocks (never the current block)."""
    window = prefix_len + block_size
    out = torch.zeros(window, window, dtype=torch.bool)
    for i in range(window):
        for j in range(window):
            if i >= prefix_len:
                out[i, j] = True
            else:
                out[i, j] = j < prefix_len and j // block_size <= i // block_size
    return out


@pytest.mark.parametrize("prefix_len,block_size", [(0, 4), (8, 4), (6, 3), (5, 1), (16, 16)])
def test_sampling_mask(prefix_len, block_size):
    expected = reference_sampling_mask(prefix_len, block_size)
    assert torch.equal(sampling_mask(prefix_len, block_size), expected)
    last = sampling_mask(prefix_len, block_size, query_block_only=True)
    assert last.shape == (block_size, prefix_len + block_size)
    assert torch.equal(last, expected[prefix_len:])


def test_sampling_mask_reproduces_training_context():
    """Noisy block b in training sees clean blocks < b and its own noisy block; the sampler's
    current block after a prefix of b blocks sees the same tokens. The prefix rows equal M_BC."""
    seq_len, block_size = 12, 3
    train = block_diffusion_mask(seq_len, block_size)
    for b in range(seq_len // block_size):
        prefix = b * block_size
        sample = sampling_mask(prefix, block_size)
        rows = range(b * block_size, (b + 1) * block_size)  # noisy block b in training
        train_rows = train[rows]
        # keys: clean tokens 0..prefix-1, then the noisy block itself
        keys = list(range(seq_len, seq_len + prefix)) + list(rows)
        assert torch.equal(train_rows[:, keys], sample[prefix:])
        assert train_rows.sum() == len(keys) * block_size  # nothing else is visible
        clean = train[seq_len : seq_len + prefix, seq_len : seq_len + prefix]
        assert torch.equal(clean, sample[:prefix, :prefix])


def test_sampling_mask_rejects_partial_prefix():
    with pytest.raises(ValueError, match="prefix_len 5 is not a multiple of block_size 4"):
        sampling_mask(5, 4)
