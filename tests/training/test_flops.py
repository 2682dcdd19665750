"""MFU accounting: mask density counted from the §1.1 rules, FLOPs from explicit matmul shapes,
both derived from the model config alone."""

import pytest

from megatron_bd3.model import BD3Config
from megatron_bd3.training.flops import attention_density, forward_flops_per_sequence


def model_config(L, B, **overrides):
    settings = dict(seq_length=L, block_size=B, vocab_size=100, mask_token_id=99, num_layers=3,
                    hidden_size=32, num_attention_heads=4, ffn_hidden_size=128)
    settings.update(overrides)
    return BD3Config(**settings)


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
    config = model_config(L, B, single_stream_mdlm=False)
    assert config.stream_length == 2 * L
    assert attention_density(config) == pytest.approx(allowed / (2 * L) ** 2)


def test_single_stream_mdlm_density_and_stream():
    L = 10
    config = model_config(L, L)  # B = L trains on x_t alone: one bidirectional block
    assert config.stream_length == L
    assert attention_density(config) == 1.0
    full = sum(1 for q in range(L) for k in range(L))
    assert attention_density(config) == pytest.approx(full / L**2)


def test_forward_flops_from_matmul_shapes():
    L, B, h, f, heads, V, layers = 16, 4, 32, 128, 4, 100, 3
    T = 2 * L
    rho = attention_density(model_config(L, B))
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
        model_config(L, B, num_layers=layers, hidden_size=h, ffn_hidden_size=f,
                     num_attention_heads=heads, vocab_size=V, mask_token_id=V - 1)
    )
    assert got == pytest.approx(expected)


def test_plain_causal_pass_counted_from_the_causal_mask():
    """The benches' causal AR baseline: L tokens, density counted from k <= q, logits at all L."""
    from megatron_bd3.training.flops import matmul_flops

    L, h, f, heads, V, layers = 10, 32, 128, 4, 100, 2
    causal = sum(1 for q in range(L) for k in range(L) if k <= q)
    dense = sum(2 * m * k * n for m, k, n in [(L, h, 3 * h), (L, h, h), (L, h, f), (L, f, h)])
    expected = layers * (dense + 2 * 2 * h * causal) + 2 * L * h * V
    assert matmul_flops(num_layers=layers, hidden_size=h, ffn_hidden_size=f,
                        num_attention_heads=heads, num_query_groups=None, vocab_size=V,
                        stream_length=L, density=(L + 1) / (2 * L),
                        logit_positions=L) == pytest.approx(expected)
