"""MFU accounting: mask density counted from the §1.1 rules, FLOPs from explicit matmul shapes."""

import pytest

from megatron_bd3.training.flops import attention_density, forward_flops_per_sequence


def bd3_allowed(q, k, L, B):
    half_q, half_k = q >= L, k >= L
    blk_q, blk_k = (q % L) // B, (k % L) // B
    block_diagonal = blk_q == blk_k and half_q == half_k
    offset_block_causal = (not half_q) and half_k and blk_k < blk_q
    block_causal = half_q and half_k and blk_k <= blk_q
    return block_diagonal or offset_block_causal or block_causal


@pytest.mark.parametrize("L, B", [(8, 1), (8, 2), (12, 4), (16, 16), (32, 8)])
def test_bd3_density_formula_matches_counting_the_mask(L, B):
    allowed = sum(bd3_allowed(q, k, L, B) for q in range(2 * L) for k in range(2 * L))
    assert attention_density("bd3", L, B) == pytest.approx(allowed / (2 * L) ** 2)


def test_ar_and_mdlm_density():
    L = 10
    causal = sum(1 for q in range(L) for k in range(L) if k <= q)
    assert attention_density("ar", L, None) == pytest.approx(causal / L**2)
    assert attention_density("mdlm", L, L) == 1.0


def test_forward_flops_from_matmul_shapes():
    L, B, h, f, heads, V, layers = 16, 4, 32, 128, 4, 100, 3
    T = 2 * L
    rho = attention_density("bd3", L, B)
    matmuls = [  # (m, k, n) of each forward matmul of one layer, batch 1
        (T, h, 3 * h),  # qkv
        (T, h, h),  # out proj
        (T, h, f),  # fc1
        (T, f, h),  # fc2
    ]
    dense = sum(2 * m * k * n for m, k, n in matmuls)
    attn = 2 * (2 * T * T * h) * rho  # QK^T and AV over all heads, scaled by density
    expected = layers * (dense + attn) + 2 * L * h * V  # logits for x_t only
    got = forward_flops_per_sequence(
        preset="bd3",
        num_layers=layers,
        hidden_size=h,
        ffn_hidden_size=f,
        num_attention_heads=heads,
        num_query_groups=None,
        seq_length=L,
        block_size=B,
        vocab_size=V,
    )
    assert got == pytest.approx(expected)
