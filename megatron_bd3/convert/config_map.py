"""BD3Config (megatron) <-> NetworkConfig (standalone): one field table maps the network both ways.

The standalone network is a fixed pre-LN transformer (LayerNorm with bias, GELU-tanh MLP, RoPE
rotate-half over the whole head, softmax scale 1/sqrt(head_dim)); only its sizes, biases, tying,
eps and rotary base are configurable. `_FIXED` is that fixed part in megatron's words, `_FIELDS`
the configurable part (NetworkConfig name -> BD3Config name), `_BIAS_LAYOUTS` the bias switches.
A megatron config converts when it describes exactly that network; anything else (RMSNorm,
SwiGLU, GELU-erf, partial or interleaved rotary, qk-layernorm, MoE, ...) is refused with the field
that differs, because its weights would load but compute a different function.
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

# NetworkConfig field -> BD3Config field: the same quantity under two names.
_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_layers",
    "num_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",
    "ffn_hidden_size": "ffn_hidden_size",
    "seq_length": "seq_length",
    "block_size": "block_size",
    "mask_token_id": "mask_token_id",
    "rotary_base": "rotary_base",
    "layernorm_eps": "layernorm_epsilon",
    "output_bias": "output_layer_bias",
    "tie_embeddings": "share_embeddings_and_output_weights",
    "sampling_eps_min": "clip_min",
    "sampling_eps_max": "clip_max",
}
# The types the standalone side stores (megatron's rotary_base is an int).
_STANDALONE_FLOAT = ("rotary_base", "layernorm_eps", "sampling_eps_min", "sampling_eps_max")

# BD3Config settings of the one network the standalone side computes: (value, what it means).
_FIXED: dict[str, tuple[Any, str]] = {
    "normalization": ("LayerNorm", "'LayerNorm'"),
    "layernorm_zero_centered_gamma": (False, "False"),
    "activation_func": (gelu_tanh,
                        "megatron_bd3.model.gelu_tanh, GELU with the tanh approximation"),
    "gated_linear_unit": (False, "False"),
    "position_embedding_type": ("rope", "'rope'"),
    "rotary_percent": (1.0, "1.0"),
    "rotary_interleaved": (False, "False (rotate-half layout)"),
    "apply_residual_connection_post_layernorm": (False, "False (pre-LN)"),
    "qk_layernorm": (False, "False"),
    "num_moe_experts": (None, "None"),
}

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


def _bias_triple(config: BD3Config) -> tuple[bool, bool, bool]:
    """megatron: linear_qkv has a bias if add_bias_linear or add_qkv_bias, linear_proj and the
    MLP if add_bias_linear; reference_bias_layout forces the MLP biases on (layer_spec.py)."""
    return (bool(config.add_bias_linear or config.add_qkv_bias), bool(config.add_bias_linear),
            bool(config.add_bias_linear or config.reference_bias_layout))


def _unsupported(config: BD3Config) -> list[str]:
    """Fields of `config` the standalone network cannot represent, as messages."""
    head_dim = config.hidden_size // config.num_attention_heads
    checks = [(name, getattr(config, name) == value, right)
              for name, (value, right) in _FIXED.items()]
    checks += [
        ("attention_output_gate", not getattr(config, "attention_output_gate", False), "False"),
        ("kv_channels", config.kv_channels == head_dim,
         f"hidden_size / num_attention_heads = {head_dim}"),
        ("softmax_scale", config.softmax_scale is None
         or math.isclose(config.softmax_scale, 1.0 / math.sqrt(head_dim), rel_tol=1e-12),
         f"None or 1/sqrt({head_dim})"),
    ]
    return [f"{name}={getattr(config, name)!r} (the standalone network needs {right})"
            for name, ok, right in checks if not ok]


def standalone_config_from_megatron(
    config: BD3Config,
    *,
    sampling_eps_min: float | None = None,
    sampling_eps_max: float | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    tokenizer_fingerprint: str | None = None,
) -> NetworkConfig:
    """The standalone config of the network `config` describes (ValueError naming the fields
    that have no standalone equivalent). The clip range defaults to config.clip_min/clip_max."""
    problems = _unsupported(config)
    if problems:
        raise ValueError("this model cannot be exported to the standalone network: "
                         + "; ".join(problems))
    values = {ours: getattr(config, theirs) for ours, theirs in _FIELDS.items()}
    for name in _STANDALONE_FLOAT:
        values[name] = float(values[name])
    values["output_bias"] = bool(values["output_bias"])
    values["tie_embeddings"] = bool(values["tie_embeddings"])
    if sampling_eps_min is not None:
        values["sampling_eps_min"] = float(sampling_eps_min)
    if sampling_eps_max is not None:
        values["sampling_eps_max"] = float(sampling_eps_max)
    values["qkv_bias"], values["attn_out_bias"], values["mlp_bias"] = _bias_triple(config)
    return NetworkConfig(**values, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, tokenizer_fingerprint=tokenizer_fingerprint)


def megatron_overrides_from_standalone(config: NetworkConfig) -> dict[str, Any]:
    """BD3Config keyword arguments for the network `config` describes (sizes, biases, tying,
    norm/activation/rotary settings, clip range). Parallel sizes, dropout and the other noise
    settings are left to the caller. A bias layout megatron cannot build is refused."""
    triple = (config.qkv_bias, config.attn_out_bias, config.mlp_bias)
    if triple not in _BIAS_LAYOUTS:
        raise ValueError(
            f"qkv_bias={triple[0]}, attn_out_bias={triple[1]}, mlp_bias={triple[2]} has no "
            f"megatron bias layout; possible (qkv, attn_out, mlp): {sorted(_BIAS_LAYOUTS)}"
        )
    overrides = {theirs: getattr(config, ours) for ours, theirs in _FIELDS.items()}
    overrides["rotary_base"] = _rotary_base(config.rotary_base)
    overrides.update({name: value for name, (value, _) in _FIXED.items()})
    overrides.update(_BIAS_LAYOUTS[triple])
    return overrides


def _rotary_base(value: float) -> int:
    if float(value) != int(value):
        raise ValueError(f"rotary_base {value} is not an integer (megatron's rotary_base is int)")
    return int(value)


def run_config_model_section(config: NetworkConfig) -> dict[str, Any]:
    """A run config `model:` section (architecture: reference) for the network `config`
    describes, for writing a trainer checkpoint when no run config is given. Only the reference
    bias layout is expressible in YAML this way; others need an explicit run config."""
    from megatron_bd3.training.model_config import REFINEMENTS

    if (config.qkv_bias, config.attn_out_bias, config.mlp_bias) != (False, False, True):
        raise ValueError(
            "the standalone model does not use the reference bias layout (qkv_bias "
            f"{config.qkv_bias}, attn_out_bias {config.attn_out_bias}, mlp_bias "
            f"{config.mlp_bias}); pass a run config (--config) that describes it"
        )
    megatron = megatron_overrides_from_standalone(config)
    section: dict[str, Any] = {"preset": "bd3", "architecture": "reference"}
    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size", "seq_length", "block_size"):
        section[name] = megatron[name]
    for ours, theirs in REFINEMENTS.items():
        if theirs in megatron:
            section[ours] = megatron[theirs]
    return section


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
