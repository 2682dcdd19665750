"""BD3Config validation, presets and the layer spec (no process group needed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_bd3.model import (
    BD3Config,
    BD3CoreAttention,
    ar_config,
    bd3_config,
    gelu_tanh,
    get_bd3_layer_spec,
    mdlm_config,
    reference_owt_config,
)
from megatron_bd3.model.keyed_dropout import ATTENTION_OUTPUT, MLP_OUTPUT, BD3BiasDropoutAdd
from megatron_bd3.model.self_attention import BD3SelfAttention
from tests.model.helpers import tiny_overrides


def test_defaults_and_derived_sizes():
    config = BD3Config(**tiny_overrides())
    assert config.stream_length == 32 and config.num_blocks == 4
    assert config.padded_vocab_size == 112  # 100 -> multiple of 16
    tp2 = BD3Config(**tiny_overrides(tensor_model_parallel_size=2))
    assert tp2.padded_vocab_size == 128  # multiple of 16 * 2
    assert config.clip_range.eps_min == pytest.approx(1e-3) and config.clip_range.eps_max == 1.0
    auto = BD3Config(**tiny_overrides(attention_kernel="auto"))
    assert auto.attention_dropout == 0.0  # BD3 default (megatron's is 0.1)
    assert auto.resolved_attention_kernel == ("flex" if torch.cuda.is_available() else "sdpa")
    with_dropout = BD3Config(**tiny_overrides(attention_kernel="auto", attention_dropout=0.1))
    assert with_dropout.resolved_attention_kernel == "sdpa"  # flex has no attention dropout


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(seq_length=18), "seq_length 18 is not a multiple of block_size 4"),
        (dict(block_size=0), "block_size must be positive"),
        (dict(mask_token_id=100), "mask_token_id 100"),
        (dict(attention_kernel="flash"), "attention_kernel 'flash'"),
        (dict(noise_schedule="nope"), "unknown noise schedule 'nope'"),
        (dict(clip_min=0.6, clip_max=0.5), "clip range"),
        (dict(fixed_t=0.0), "fixed_t"),
        (dict(add_bias_linear=True), "reference_bias_layout=True"),
        (dict(attention_kernel="flex", attention_dropout=0.1), "no attention dropout"),
        (dict(position_embedding_type="learned_absolute"), "position_embedding_type"),
        (
            dict(tensor_model_parallel_size=3, num_attention_heads=6, sequence_parallel=True),
            "2L = 32",
        ),
        (
            dict(share_embeddings_and_output_weights=True, pipeline_model_parallel_size=2),
            "needs CUDA",
        ),
    ],
)
def test_bad_values_are_rejected_with_a_clear_message(override, message):
    with pytest.raises(ValueError, match=message):
        BD3Config(**tiny_overrides(**override))


def test_presets():
    size = dict(num_layers=2, hidden_size=32, num_attention_heads=4)
    common = dict(seq_length=16, vocab_size=100, mask_token_id=99, **size)
    assert bd3_config(block_size=4, **common).block_size == 4
    ar = ar_config(**common)
    assert (ar.block_size, ar.fixed_t) == (1, 1.0)
    mdlm = mdlm_config(**common)
    assert mdlm.block_size == mdlm.seq_length == 16
    owt = reference_owt_config(block_size=16)
    assert owt.activation_func is gelu_tanh and owt.layernorm_epsilon == 1e-5
    assert owt.reference_bias_layout and owt.output_layer_bias
    assert not owt.add_bias_linear and not owt.share_embeddings_and_output_weights
    assert owt.kv_channels == 64 and owt.rotary_percent == 1.0 and not owt.rotary_interleaved


def _leaves(spec, path=""):
    """Flatten a ModuleSpec tree into {path: module class or value}."""
    out = {}
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        for field in dataclasses.fields(spec):
            out.update(_leaves(getattr(spec, field.name), f"{path}.{field.name}"))
    else:
        out[path] = spec
    return out


def test_spec_swaps_only_the_attention_and_bias_dropout_add_leaves():
    config = BD3Config(**tiny_overrides(reference_bias_layout=False, output_layer_bias=False))
    spec = get_bd3_layer_spec(config, use_transformer_engine=False)
    bdas = (".submodules.self_attn_bda", ".submodules.mlp_bda")
    ours = {k: v for k, v in _leaves(spec).items() if not k.startswith(bdas)}
    megatron = _leaves(get_gpt_layer_local_spec(normalization="LayerNorm"))
    assert megatron[bdas[0]] is megatron[bdas[1]] is get_bias_dropout_add
    megatron = {k: v for k, v in megatron.items() if k not in bdas}
    assert ours.keys() == megatron.keys()
    changed = {key for key in ours if ours[key] != megatron[key]}
    core = ".submodules.self_attention.submodules.core_attention"
    params = ".submodules.self_attention.params"
    module = ".submodules.self_attention.module"
    assert changed == {core, params, module}
    assert ours[core] is BD3CoreAttention
    assert ours[params]["attn_mask_type"] == AttnMaskType.arbitrary
    # Speed-only swap: megatron's SelfAttention subclassed.
    assert ours[module] is BD3SelfAttention and issubclass(BD3SelfAttention, SelfAttention)
    # Both bias-dropout-adds: ours (row cut; keyed dropout by config), one per kind.
    assert spec.submodules.self_attn_bda.module is BD3BiasDropoutAdd
    assert spec.submodules.self_attn_bda.params["kind"] == ATTENTION_OUTPUT
    assert spec.submodules.mlp_bda.module is BD3BiasDropoutAdd
    assert spec.submodules.mlp_bda.params["kind"] == MLP_OUTPUT
    assert not spec.submodules.mlp_bda.params["keyed"]  # BD3Config's default: torch
    keyed = get_bd3_layer_spec(BD3Config(**tiny_overrides(dropout_rng="keyed")), False)
    assert keyed.submodules.mlp_bda.params["keyed"]


def test_bias_dropout_add_cuts_only_a_longer_residual():
    x, bias = torch.randn(4, 2, 8), torch.randn(8)
    residual = torch.randn(6, 2, 8)
    bda = BD3BiasDropoutAdd(ATTENTION_OUTPUT, keyed=False, sequence_parallel=False)
    for training in (False, True):
        torch.manual_seed(0)
        same = bda(training, False)((x, bias), residual[:4], 0.5)
        torch.manual_seed(0)
        cut = bda(training, False)((x, bias), residual, 0.5)
        torch.testing.assert_close(cut, same, rtol=0.0, atol=0.0)
    # Independent reference without dropout: x + bias + the residual's first rows.
    expected = x + bias + residual[:4]
    torch.testing.assert_close(bda(False, False)((x, bias), residual, 0.5), expected)


def test_reference_bias_layout_forces_only_the_mlp_biases():
    config = BD3Config(**tiny_overrides())
    ours = _leaves(get_bd3_layer_spec(config, use_transformer_engine=False))
    fc1 = ours[".submodules.mlp.submodules.linear_fc1"]
    fc2 = ours[".submodules.mlp.submodules.linear_fc2"]
    assert issubclass(fc1, ColumnParallelLinear) and fc1 is not ColumnParallelLinear
    assert issubclass(fc2, RowParallelLinear) and fc2 is not RowParallelLinear
    assert ours[".submodules.self_attention.submodules.linear_proj"] is RowParallelLinear
    assert ours[".submodules.self_attention.submodules.linear_qkv"] is ColumnParallelLinear
