"""megatron BD3Config <-> standalone config: same network both ways, refusals name the field."""

from __future__ import annotations

import dataclasses

import pytest
import torch.nn.functional as F

from megatron_bd3.convert.config_map import (
    check_same_network,
    megatron_overrides_from_standalone,
    run_config_model_section,
    standalone_config_from_megatron,
)
from megatron_bd3.model import bd3_config, reference_architecture
from megatron_bd3.standalone.model import NetworkConfig

SIZES = dict(seq_length=16, block_size=4, vocab_size=300, mask_token_id=4, num_layers=2,
             hidden_size=64, num_attention_heads=4)


def megatron(**overrides):
    return bd3_config(**SIZES, **{**reference_architecture(0.0), **overrides})


def test_reference_architecture_maps_to_the_reference_standalone_layout():
    sc = standalone_config_from_megatron(megatron(num_query_groups=2), sampling_eps_min=0.2,
                                         sampling_eps_max=0.7, bos_token_id=1)
    assert (sc.num_heads, sc.num_query_groups, sc.head_dim, sc.ffn_hidden_size) == (4, 2, 16, 256)
    assert (sc.qkv_bias, sc.attn_out_bias, sc.mlp_bias, sc.output_bias) == (False, False, True,
                                                                             True)
    assert not sc.tie_embeddings
    assert (sc.layernorm_eps, sc.rotary_base) == (1e-5, 10000.0)
    assert (sc.sampling_eps_min, sc.sampling_eps_max, sc.bos_token_id) == (0.2, 0.7, 1)


@pytest.mark.parametrize("biases", [
    dict(qkv_bias=False, attn_out_bias=False, mlp_bias=True),
    dict(qkv_bias=False, attn_out_bias=False, mlp_bias=False),
    dict(qkv_bias=True, attn_out_bias=False, mlp_bias=False),
    dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True),
])
@pytest.mark.parametrize("tied", [False, True])
def test_standalone_to_megatron_and_back_is_the_same_network(biases, tied):
    sc = NetworkConfig(vocab_size=300, hidden_size=64, num_layers=3, num_heads=8,
                          num_query_groups=2, ffn_hidden_size=96, seq_length=16, block_size=8,
                          mask_token_id=7, layernorm_eps=1e-6, rotary_base=500000.0,
                          output_bias=not tied, tie_embeddings=tied, sampling_eps_min=0.3,
                          sampling_eps_max=0.9, **biases)
    mc = bd3_config(**megatron_overrides_from_standalone(sc))
    back = standalone_config_from_megatron(mc)
    assert dataclasses.asdict(back) == dataclasses.asdict(sc)


def test_impossible_bias_layout_is_refused():
    sc = NetworkConfig(vocab_size=300, hidden_size=64, num_layers=1, num_heads=4,
                          num_query_groups=4, ffn_hidden_size=256, seq_length=16, block_size=4,
                          mask_token_id=4, qkv_bias=False, attn_out_bias=True, mlp_bias=True)
    with pytest.raises(ValueError, match="qkv_bias=False, attn_out_bias=True, mlp_bias=True has no "
                                         "megatron bias layout"):
        megatron_overrides_from_standalone(sc)


@pytest.mark.parametrize("overrides,field", [
    (dict(activation_func=F.gelu), "activation_func"),
    (dict(normalization="RMSNorm"), "normalization"),
    (dict(rotary_percent=0.5), "rotary_percent"),
    (dict(rotary_interleaved=True), "rotary_interleaved"),
    (dict(qk_layernorm=True), "qk_layernorm"),
    (dict(kv_channels=8), "kv_channels"),
])
def test_networks_the_standalone_cannot_compute_are_refused(overrides, field):
    with pytest.raises(ValueError, match=f"cannot be exported to the standalone network: .*{field}"):
        standalone_config_from_megatron(megatron(**overrides))


def test_megatron_default_architecture_is_refused_by_its_activation():
    mc = bd3_config(**SIZES)  # megatron's GPT defaults: GELU (erf), biases everywhere
    with pytest.raises(ValueError, match="activation_func"):
        standalone_config_from_megatron(mc)


def test_network_fields_are_compared_but_context_and_block_size_may_change():
    sc = standalone_config_from_megatron(megatron())
    other = dataclasses.replace(sc, seq_length=64, block_size=16, sampling_eps_min=0.5)
    check_same_network(sc, other, "run")
    wider = dataclasses.replace(sc, num_layers=3, mask_token_id=5)
    with pytest.raises(ValueError, match="num_layers: weights 2 != run 3.*mask_token_id: weights "
                                         "4 != run 5"):
        check_same_network(sc, wider, "run")


def test_run_config_model_section_describes_the_weights():
    from megatron_bd3.training.config import load_config
    from megatron_bd3.training.model_config import build_model_config

    sc = standalone_config_from_megatron(megatron(num_query_groups=2,
                                                  share_embeddings_and_output_weights=True))
    config = load_config(data={"model": run_config_model_section(sc)})
    mc = build_model_config(config, vocab_size=sc.vocab_size, mask_token_id=sc.mask_token_id,
                            precision="fp32")
    assert dataclasses.asdict(standalone_config_from_megatron(mc)) == dataclasses.asdict(sc)
