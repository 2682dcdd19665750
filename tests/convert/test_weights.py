"""The TP=1 megatron <-> standalone tensor mapping (torch only, no megatron model)."""

from __future__ import annotations

import pytest
import torch

from megatron_bd3.convert.weights import (
    MappingError,
    megatron_shapes,
    megatron_to_standalone,
    qkv_megatron_to_standalone,
    qkv_standalone_to_megatron,
    standalone_shapes,
    standalone_to_megatron,
)
from megatron_bd3.standalone.model import BD3Network, NetworkConfig

PADDED = 384


def config(**overrides) -> NetworkConfig:
    values = dict(vocab_size=300, hidden_size=24, num_layers=2, num_heads=4, num_query_groups=2,
                  ffn_hidden_size=40, seq_length=8, block_size=4, mask_token_id=4)
    values.update(overrides)
    return NetworkConfig(**values)


def random_megatron_state(cfg: NetworkConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(*shape, generator=gen) for k, shape in
             megatron_shapes(cfg, PADDED).items()}
    state["output_layer._extra_state"] = None  # megatron metadata entries are ignored
    return state


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (4, 1), (6, 3)])
def test_qkv_rows_follow_the_group_interleave(heads, groups):
    """Brute force: megatron row ((j*(p+2) + s)*hd + e) holds query head j*p+s (s < p), key group
    j (s = p) or value group j (s = p+1); the standalone rows are (q|k|v, head, hd)."""
    hd, d = 2, 5
    cfg = config(hidden_size=heads * hd, num_heads=heads, num_query_groups=groups)
    p = heads // groups
    megatron = torch.randn((heads + 2 * groups) * hd, d)
    standalone = qkv_megatron_to_standalone(megatron, cfg)
    expected = torch.empty_like(megatron)
    for j in range(groups):
        for s in range(p + 2):
            for e in range(hd):
                row = megatron[(j * (p + 2) + s) * hd + e]
                if s < p:
                    expected[(j * p + s) * hd + e] = row
                elif s == p:
                    expected[heads * hd + j * hd + e] = row
                else:
                    expected[(heads + groups) * hd + j * hd + e] = row
    assert torch.equal(standalone, expected)
    assert torch.equal(qkv_standalone_to_megatron(standalone, cfg), megatron)
    bias = megatron[:, 0].clone()
    assert torch.equal(qkv_megatron_to_standalone(bias, cfg), expected[:, 0])


def test_qkv_permutation_matches_megatron_split_semantics():
    """Per head, the q/k/v vectors megatron's attention splits out of its fused output
    (view [ng, (np/ng + 2) * hn], split [np/ng * hn, hn, hn]) equal the standalone's split."""
    cfg = config(hidden_size=24, num_heads=4, num_query_groups=2)  # hd 6, p 2
    x = torch.randn(3, 24)
    w_megatron = torch.randn((4 + 4) * 6, 24)
    w_standalone = qkv_megatron_to_standalone(w_megatron, cfg)
    mixed = (x @ w_megatron.T).view(3, 2, (2 + 2) * 6)
    q_m, k_m, v_m = mixed.split([2 * 6, 6, 6], dim=-1)
    q_m = q_m.reshape(3, 4, 6)
    out = (x @ w_standalone.T).view(3, 4 + 2 * 2, 6)
    q_s, k_s, v_s = out.split([4, 2, 2], dim=1)
    assert torch.equal(q_m, q_s)
    assert torch.equal(k_m, k_s)
    assert torch.equal(v_m, v_s)


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_strips_and_repads_the_vocabulary(tied):
    cfg = config(tie_embeddings=tied)
    state = random_megatron_state(cfg)
    standalone = megatron_to_standalone(state, cfg, PADDED)
    assert set(standalone) == set(standalone_shapes(cfg)) == set(BD3Network(cfg).state_dict())
    assert standalone["embedding.weight"].shape == (300, 24)
    assert torch.equal(standalone["embedding.weight"],
                       state["embedding.word_embeddings.weight"][:300])
    bias_key = "output_bias" if tied else "output.bias"
    assert torch.equal(standalone[bias_key], state["output_layer.bias"][:300])
    assert ("output.weight" in standalone) is not tied
    back = standalone_to_megatron(standalone, cfg, PADDED)
    del state["output_layer._extra_state"]
    assert set(back) == set(state)
    for key, tensor in back.items():
        if key in ("embedding.word_embeddings.weight", "output_layer.weight",
                   "output_layer.bias"):
            assert torch.equal(tensor[:300], state[key][:300]), key
            assert not tensor[300:].any(), f"{key}: padding rows must be zero"
        else:
            assert torch.equal(tensor, state[key]), key


def test_renamed_layers_and_biases():
    """Every non-qkv tensor is copied unchanged under its counterpart's name."""
    cfg = config(qkv_bias=True, attn_out_bias=True, mlp_bias=True, output_bias=False)
    state = random_megatron_state(cfg)
    out = megatron_to_standalone(state, cfg, PADDED)
    pairs = {
        "decoder.layers.1.input_layernorm.bias": "layers.1.attn_norm.bias",
        "decoder.layers.1.self_attention.linear_proj.weight": "layers.1.attn.out.weight",
        "decoder.layers.1.self_attention.linear_proj.bias": "layers.1.attn.out.bias",
        "decoder.layers.0.pre_mlp_layernorm.weight": "layers.0.mlp_norm.weight",
        "decoder.layers.0.mlp.linear_fc1.bias": "layers.0.mlp.fc1.bias",
        "decoder.layers.0.mlp.linear_fc2.weight": "layers.0.mlp.fc2.weight",
        "decoder.final_layernorm.weight": "final_norm.weight",
    }
    for megatron_key, standalone_key in pairs.items():
        assert torch.equal(out[standalone_key], state[megatron_key])
    assert "output.bias" not in out
    assert torch.equal(qkv_standalone_to_megatron(out["layers.0.attn.qkv.bias"], cfg),
                       state["decoder.layers.0.self_attention.linear_qkv.bias"])


def test_transformer_engine_norm_names_are_accepted():
    cfg = config()
    state = random_megatron_state(cfg)
    te_state = {}
    for key, value in state.items():
        key = key.replace("input_layernorm.", "self_attention.linear_qkv.layer_norm_")
        te_state[key.replace("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")] = value
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te_state
    a = megatron_to_standalone(state, cfg, PADDED)
    b = megatron_to_standalone(te_state, cfg, PADDED)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_extra_and_misshaped_tensors_are_named():
    cfg = config()
    state = random_megatron_state(cfg)
    del state["decoder.layers.1.mlp.linear_fc2.bias"]
    state["decoder.layers.0.self_attention.linear_proj.bias"] = torch.zeros(24)
    state["decoder.layers.0.self_attention.linear_qkv.weight"] = torch.zeros(72, 24)
    with pytest.raises(MappingError) as info:
        megatron_to_standalone(state, cfg, PADDED)
    message = str(info.value)
    assert "missing tensor(s) decoder.layers.1.mlp.linear_fc2.bias (expected shape [24])" in message
    assert "unexpected tensor(s) decoder.layers.0.self_attention.linear_proj.bias" in message
    assert ("tensor decoder.layers.0.self_attention.linear_qkv.weight has shape [72, 24], "
            "expected [48, 24]") in message

    standalone = megatron_to_standalone(random_megatron_state(cfg), cfg, PADDED)
    standalone["output.weight"] = standalone["output.weight"][:299]
    standalone["layers.2.attn.qkv.weight"] = torch.zeros(1)
    del standalone["final_norm.bias"]
    with pytest.raises(MappingError) as info:
        standalone_to_megatron(standalone, cfg, PADDED)
    message = str(info.value)
    assert "missing tensor(s) final_norm.bias" in message
    assert "unexpected tensor(s) layers.2.attn.qkv.weight" in message
    assert "tensor output.weight has shape [299, 24], expected [300, 24]" in message


def test_padding_must_cover_the_vocabulary():
    cfg = config()
    with pytest.raises(MappingError, match="padded_vocab_size 256 is smaller than vocab_size 300"):
        megatron_to_standalone(random_megatron_state(cfg), cfg, 256)
