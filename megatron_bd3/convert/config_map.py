"""BD3Config (megatron) <-> NetworkConfig (standalone): one field table maps the network both ways.

The standalone network is a fixed pre-LN transformer (LayerNorm with bias, GELU-tanh MLP, RoPE
rotate-half over the whole head, softmax scale 1/sqrt(head_dim)); only its sizes, biases, tying,
eps and rotary base are configurable. A megatron config converts when it describes exactly that
network; anything else (RMSNorm, SwiGLU, GELU-erf, partial or interleaved rotary, qk-layernorm,
MoE, ...) is refused with the field that differs, because its weights would load but compute a
different function.
"""

from __future__ import annotations

import math
from typing import Any

from megatron_bd3.model.config import BD3Config, gelu_tanh
from megatron_bd3.standalone.model import NetworkConfig

__all__ = [
    "check_same_network",
    "megatron_overrides_from_standalone",
    "run_config_model_section",
    "standalone_config_from_megatron",
]


def _unsupported(config: BD3Config) -> list[str]:
    """Fields of `config` the standalone network cannot represent, as messages."""
    problems = []

    def want(name: str, ok: bool, right: str) -> None:
        if not ok:
            problems.append(f"{name}={getattr(config, name)!r} (the standalone network needs "
                            f"{right})")

    want("normalization", config.normalization == "LayerNorm", "'LayerNorm'")
    want("layernorm_zero_centered_gamma", not config.layernorm_zero_centered_gamma, "False")
    want("activation_func", config.activation_func is gelu_tanh,
         "megatron_bd3.model.gelu_tanh, GELU with the tanh approximation")
    want("gated_linear_unit", not config.gated_linear_unit, "False")
    want("position_embedding_type", config.position_embedding_type == "rope", "'rope'")
    want("rotary_percent", config.rotary_percent == 1.0, "1.0")
    want("rotary_interleaved", not config.rotary_interleaved, "False (rotate-half layout)")
    want("apply_residual_connection_post_layernorm",
         not config.apply_residual_connection_post_layernorm, "False (pre-LN)")
    want("qk_layernorm", not config.qk_layernorm, "False")
    want("num_moe_experts", config.num_moe_experts is None, "None")
    want("attention_output_gate", not getattr(config, "attention_output_gate", False), "False")
    head_dim = config.hidden_size // config.num_attention_heads
    want("kv_channels", config.kv_channels == head_dim,
         f"hidden_size / num_attention_heads = {head_dim}")
    want("softmax_scale", config.softmax_scale is None
         or math.isclose(config.softmax_scale, 1.0 / math.sqrt(head_dim), rel_tol=1e-12),
         f"None or 1/sqrt({head_dim})")
    return problems


def standalone_config_from_megatron(
    config: BD3Config,
    *,
    sampling_eps_min: float | None = None,
    sampling_eps_max: float | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> NetworkConfig:
    """The standalone config of the network `config` describes (ValueError naming the fields
    that have no standalone equivalent). The clip range defaults to config.clip_min/clip_max."""
    problems = _unsupported(config)
    if problems:
        raise ValueError("this model cannot be exported to the standalone network: "
                         + "; ".join(problems))
    reference_layout = config.reference_bias_layout
    return NetworkConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups,
        ffn_hidden_size=config.ffn_hidden_size,
        seq_length=config.seq_length,
        block_size=config.block_size,
        mask_token_id=config.mask_token_id,
        rotary_base=float(config.rotary_base),
        layernorm_eps=float(config.layernorm_epsilon),
        # megatron: linear_qkv has a bias if add_bias_linear or add_qkv_bias, linear_proj and the
        # MLP if add_bias_linear; reference_bias_layout forces the MLP biases on (layer_spec.py).
        qkv_bias=bool(config.add_bias_linear or config.add_qkv_bias),
        attn_out_bias=bool(config.add_bias_linear),
        mlp_bias=bool(config.add_bias_linear or reference_layout),
        output_bias=bool(config.output_layer_bias),
        tie_embeddings=bool(config.share_embeddings_and_output_weights),
        sampling_eps_min=float(config.clip_min if sampling_eps_min is None else sampling_eps_min),
        sampling_eps_max=float(config.clip_max if sampling_eps_max is None else sampling_eps_max),
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


# (qkv_bias, attn_out_bias, mlp_bias) -> the megatron switches that build it. add_bias_linear puts a
# bias on all four linears, add_qkv_bias on linear_qkv only, reference_bias_layout on the MLP only.
_BIAS_LAYOUTS: dict[tuple[bool, bool, bool], dict[str, bool]] = {
    (False, False, True): dict(add_bias_linear=False, add_qkv_bias=False,
                               reference_bias_layout=True),
    (False, False, False): dict(add_bias_linear=False, add_qkv_bias=False,
                                reference_bias_layout=False),
    (True, False, False): dict(add_bias_linear=False, add_qkv_bias=True,
                               reference_bias_layout=False),
    (True, True, True): dict(add_bias_linear=True, add_qkv_bias=False,
                             reference_bias_layout=False),
}


def megatron_overrides_from_standalone(config: NetworkConfig) -> dict[str, Any]:
    """BD3Config keyword arguments for the network `config` describes (sizes, biases, tying,
    norm/activation/rotary settings). Parallel sizes, dropout and the noise settings are left to
    the caller. A bias layout megatron cannot build is refused (see _BIAS_LAYOUTS)."""
    triple = (config.qkv_bias, config.attn_out_bias, config.mlp_bias)
    if triple not in _BIAS_LAYOUTS:
        raise ValueError(
            f"qkv_bias={triple[0]}, attn_out_bias={triple[1]}, mlp_bias={triple[2]} has no "
            f"megatron bias layout; possible (qkv, attn_out, mlp): {sorted(_BIAS_LAYOUTS)}"
        )
    biases = _BIAS_LAYOUTS[triple]
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_query_groups=config.num_query_groups,
        ffn_hidden_size=config.ffn_hidden_size,
        seq_length=config.seq_length,
        block_size=config.block_size,
        mask_token_id=config.mask_token_id,
        normalization="LayerNorm",
        layernorm_epsilon=config.layernorm_eps,
        layernorm_zero_centered_gamma=False,
        activation_func=gelu_tanh,
        gated_linear_unit=False,
        position_embedding_type="rope",
        rotary_base=_rotary_base(config.rotary_base),
        rotary_percent=1.0,
        rotary_interleaved=False,
        output_layer_bias=config.output_bias,
        share_embeddings_and_output_weights=config.tie_embeddings,
        clip_min=config.sampling_eps_min,
        clip_max=config.sampling_eps_max,
        **biases,
    )


def _rotary_base(value: float) -> int:
    if float(value) != int(value):
        raise ValueError(f"rotary_base {value} is not an integer (megatron's rotary_base is int)")
    return int(value)


def run_config_model_section(config: NetworkConfig) -> dict[str, Any]:
    """A run config `model:` section (architecture: reference) for the network `config`
    describes, for writing a trainer checkpoint when no run config is given. Only reference-style
    bias layouts are expressible in YAML this way; others need an explicit run config."""
    if (config.qkv_bias, config.attn_out_bias, config.mlp_bias) != (False, False, True):
        raise ValueError(
            "the standalone model does not use the reference bias layout (qkv_bias "
            f"{config.qkv_bias}, attn_out_bias {config.attn_out_bias}, mlp_bias "
            f"{config.mlp_bias}); pass a run config (--config) that describes it"
        )
    extra: dict[str, Any] = {}
    if not config.output_bias:
        extra["output_layer_bias"] = False
    if config.tie_embeddings:
        extra["share_embeddings_and_output_weights"] = True
    if config.layernorm_eps != 1e-5:
        extra["layernorm_epsilon"] = config.layernorm_eps
    if config.rotary_base != 10000.0:
        extra["rotary_base"] = _rotary_base(config.rotary_base)
    return {
        "preset": "bd3",
        "architecture": "reference",
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_heads,
        "num_query_groups": config.num_query_groups,
        "ffn_hidden_size": config.ffn_hidden_size,
        "seq_length": config.seq_length,
        "block_size": config.block_size,
        "extra": extra,
    }


# Fields that decide the function the weights compute; the rest (seq_length, block_size, the clip
# range, special ids) may differ between a checkpoint and the run that starts from it -- e.g. an
# MDLM (B = L) initialising a BD3-LM with B = 16.
NETWORK_FIELDS = (
    "vocab_size", "hidden_size", "num_layers", "num_heads", "num_query_groups", "ffn_hidden_size",
    "mask_token_id", "rotary_base", "layernorm_eps", "qkv_bias", "attn_out_bias", "mlp_bias",
    "output_bias", "tie_embeddings",
)


def check_same_network(ours: NetworkConfig, theirs: NetworkConfig, what: str) -> None:
    """Raise ValueError naming every network field where `theirs` (e.g. the run config's model)
    differs from `ours` (the weights being converted)."""
    problems = [
        f"{name}: weights {getattr(ours, name)!r} != {what} {getattr(theirs, name)!r}"
        for name in NETWORK_FIELDS
        if getattr(ours, name) != getattr(theirs, name)
    ]
    if problems:
        raise ValueError(f"the weights do not fit {what}: " + "; ".join(problems))
