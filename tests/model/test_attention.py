"""BD3CoreAttention against a brute-force attention written here, on one rank (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_bd3.diffusion import block_diffusion_block_mask
from megatron_bd3.model import BD3Config, BD3CoreAttention, to_megatron_mask
from tests.model.helpers import reference_bd3_mask, tiny_overrides

HEADS, GROUPS, HEAD_DIM = 4, 2, 8


def make_attention(**extra) -> BD3CoreAttention:
    config = BD3Config(**tiny_overrides(num_query_groups=GROUPS, **extra))
    return BD3CoreAttention(
        config=config,
        layer_number=1,
        attn_mask_type=AttnMaskType.arbitrary,
        attention_type="self",
    )


def qkv(seq: int, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, batch, HEADS, HEAD_DIM, generator=gen)  # [s, b, np, hn]
    k = torch.randn(seq, batch, GROUPS, HEAD_DIM, generator=gen)  # [s, b, ng, hn]
    v = torch.randn(seq, batch, GROUPS, HEAD_DIM, generator=gen)
    return q, k, v


def brute_force_attention(q, k, v, allowed):
    """Loop over heads; query head h uses kv group h // (heads / groups)."""
    seq, batch = q.shape[:2]
    out = torch.zeros(seq, batch, HEADS, HEAD_DIM)
    for h in range(HEADS):
        g = h // (HEADS // GROUPS)
        for bi in range(batch):
            scores = q[:, bi, h] @ k[:, bi, g].T / math.sqrt(HEAD_DIM)  # [sq, sk]
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[:, bi, h] = torch.softmax(scores, dim=-1) @ v[:, bi, g]
    return out.reshape(seq, batch, HEADS * HEAD_DIM)


def test_sdpa_with_gqa_matches_brute_force(single_rank):
    attention = make_attention().eval()
    q, k, v = qkv(32)
    allowed = reference_bd3_mask(16, 4)
    out = attention(q, k, v, allowed)
    assert out.shape == (32, 2, HEADS * HEAD_DIM)
    torch.testing.assert_close(out, brute_force_attention(q, k, v, allowed), atol=1e-5, rtol=1e-5)


def test_flex_forward_matches_brute_force(single_rank):
    attention = make_attention(attention_kernel="flex").eval()
    q, k, v = qkv(32, seed=1)
    block_mask = block_diffusion_block_mask(16, 4, device="cpu")
    with torch.no_grad():
        out = attention(q, k, v, block_mask)
    expected = brute_force_attention(q, k, v, reference_bd3_mask(16, 4))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_flex_backward_on_cpu_raises_clearly(single_rank):
    attention = make_attention(attention_kernel="flex")
    q, k, v = qkv(32)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        attention(q, k, v, block_diffusion_block_mask(16, 4, device="cpu"))


def test_matches_megatron_dot_product_attention_with_converted_mask(single_rank):
    config = BD3Config(**tiny_overrides(num_query_groups=GROUPS))
    megatron_attention = DotProductAttention(
        config=config,
        layer_number=1,
        attn_mask_type=AttnMaskType.arbitrary,
        attention_type="self",
    ).eval()
    attention = make_attention().eval()
    q, k, v = qkv(32, seed=2)
    allowed = reference_bd3_mask(16, 4)
    expected = megatron_attention(q, k, v, to_megatron_mask(allowed))
    torch.testing.assert_close(attention(q, k, v, allowed), expected, atol=1e-5, rtol=1e-5)


def test_megatron_convention_mask_is_rejected(single_rank):
    attention = make_attention().eval()
    q, k, v = qkv(8)
    megatron_causal = torch.triu(torch.ones(8, 8, dtype=torch.bool), diagonal=1)  # True = masked
    with pytest.raises(ValueError, match="True = may attend"):
        attention(q, k, v, megatron_causal)


def test_none_mask_means_training_mask_and_only_at_two_l(single_rank):
    attention = make_attention().eval()
    q, k, v = qkv(32, seed=3)
    torch.testing.assert_close(
        attention(q, k, v, None), attention(q, k, v, reference_bd3_mask(16, 4))
    )
    q, k, v = qkv(8)
    with pytest.raises(ValueError, match="attention_mask=None"):
        attention(q, k, v, None)


def test_dropout_only_in_training(single_rank):
    attention = make_attention(attention_dropout=0.5)
    q, k, v = qkv(32, seed=4)
    allowed = reference_bd3_mask(16, 4)
    attention.train()
    first, second = attention(q, k, v, allowed), attention(q, k, v, allowed)
    assert not torch.allclose(first, second)  # fresh dropout masks from the tracker stream
    attention.eval()
    torch.testing.assert_close(
        attention(q, k, v, allowed), brute_force_attention(q, k, v, allowed), atol=1e-5, rtol=1e-5
    )
