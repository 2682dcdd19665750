"""The BD3 transformer-layer spec: megatron-core's GPT layer spec with its attention leaves swapped.

Block diffusion changes exactly one thing inside a layer — which keys a query may attend to — so
the spec is megatron's own (local, or Transformer Engine when importable) with
`self_attention.submodules.core_attention` replaced by BD3CoreAttention and the self-attention
mask type set to `arbitrary`. `self_attention.module` changes for speed, not semantics (see
self_attention.py): BD3SelfAttention is megatron's SelfAttention with a short forward for
BD3Model's calls (cheaper RoPE, and x_t queries only in the last layer of a training forward).
The two bias-dropout-add leaves (`self_attn_bda`, `mlp_bda`) are keyed_dropout.BD3BiasDropoutAdd:
megatron's bias-dropout-add with the residual cut to the rows that attention returned, and with
`dropout_rng: keyed` layout-invariant dropout masks (keyed_dropout.py).
TransformerLayer and MLP are megatron's, unmodified.

Reference bias layout (qkv and attention-out without bias, MLP fc1/fc2 with bias):
megatron has one switch, `add_bias_linear`, for all four linears (and `add_qkv_bias` for qkv).
We keep `add_bias_linear=False` — megatron then builds qkv and linear_proj without bias by
itself — and swap the two MLP leaves for subclasses that force `bias=True`. Alternatives
rejected: `add_bias_linear=True` with the qkv/out biases frozen at zero leaves dead parameters in
every checkpoint, optimizer state and weight-decay group, and makes "loads exactly" depend on
every consumer keeping them zero; forcing the attention biases off instead would need the same
two subclasses (qkv and proj) plus care with TE's fused layernorm-qkv leaf. The MLP subclasses
only override the constructor argument; forward, sharding and checkpoint keys are megatron's.

Sequence parallel without apex/Transformer Engine: megatron's torch-norm fallback
(WrappedTorchNorm, transformer/torch_norm.py:32) refuses sequence parallel, because torch's
LayerNorm parameters lack the `sequence_parallel` flag that tells finalize_model_grads to
all-reduce their (sequence-sharded, hence partial) gradients over the TP group. Only in that case
the norm leaves (and the block's final norm) become SequenceParallelTorchNorm: the same torch
norm, with the flag set. With apex or TE, megatron's own norms are used unchanged.
"""

from __future__ import annotations

import copy
import functools

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    LayerNormImpl,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_bd3.model.attention import BD3CoreAttention
from megatron_bd3.model.config import BD3Config
from megatron_bd3.model.keyed_dropout import ATTENTION_OUTPUT, MLP_OUTPUT, BD3BiasDropoutAdd
from megatron_bd3.model.self_attention import BD3SelfAttention

try:  # Transformer Engine is a GPU-only optional dependency.
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:
    HAVE_TE = False


class BiasedColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear that always has a bias (MLP fc1 in the reference bias layout)."""

    def __init__(self, *args, **kwargs):
        kwargs["bias"] = True
        super().__init__(*args, **kwargs)


class BiasedRowParallelLinear(RowParallelLinear):
    """RowParallelLinear that always has a bias (MLP fc2 in the reference bias layout)."""

    def __init__(self, *args, **kwargs):
        kwargs["bias"] = True
        super().__init__(*args, **kwargs)


class SequenceParallelTorchNorm:
    """torch LayerNorm/RMSNorm whose parameters carry megatron's `sequence_parallel` flag.

    Built like megatron's WrappedTorchNorm (a factory class returning a torch module)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma needs apex or Transformer Engine")
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {config.normalization!r} is not LayerNorm/RMSNorm")
        for param in norm.parameters():
            # Gradients are partial sums over this rank's sequence shard: all-reduce over TP.
            param.sequence_parallel = config.sequence_parallel
        return norm


def _needs_sequence_parallel_norm(config: TransformerConfig, norm: type) -> bool:
    return bool(config.sequence_parallel) and norm is WrappedTorchNorm


@functools.lru_cache(maxsize=None)
def _biased(linear_cls: type) -> type:
    """A subclass of `linear_cls` whose constructor forces bias=True (for TE leaves)."""
    if linear_cls is ColumnParallelLinear:
        return BiasedColumnParallelLinear
    if linear_cls is RowParallelLinear:
        return BiasedRowParallelLinear

    def __init__(self, *args, **kwargs):
        kwargs["bias"] = True
        linear_cls.__init__(self, *args, **kwargs)

    return type(f"Biased{linear_cls.__name__}", (linear_cls,), {"__init__": __init__})


def get_bd3_layer_spec(
    config: BD3Config,
    use_transformer_engine: bool | None = None,
) -> ModuleSpec:
    """megatron-core's GPT layer spec with the BD3 core attention and the arbitrary mask type.

    Args:
        config: the model config (normalization, qk_layernorm, reference_bias_layout are read).
        use_transformer_engine: True = TE spec (raises if TE is missing), False = megatron's local
            spec, None = TE when importable.
    """
    if use_transformer_engine is None:
        use_transformer_engine = HAVE_TE
    if use_transformer_engine:
        if not HAVE_TE:
            raise ImportError("use_transformer_engine=True but transformer_engine is not installed")
        base = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    else:
        base = get_gpt_layer_local_spec(
            qk_layernorm=config.qk_layernorm, normalization=config.normalization
        )

    spec = copy.deepcopy(base)
    self_attention = spec.submodules.self_attention
    self_attention.module = BD3SelfAttention
    self_attention.params = {**self_attention.params, "attn_mask_type": AttnMaskType.arbitrary}
    self_attention.submodules.core_attention = BD3CoreAttention
    bda_params = dict(keyed=config.dropout_rng == "keyed", sequence_parallel=config.sequence_parallel)
    spec.submodules.self_attn_bda = ModuleSpec(
        module=BD3BiasDropoutAdd, params=dict(kind=ATTENTION_OUTPUT, **bda_params)
    )
    spec.submodules.mlp_bda = ModuleSpec(
        module=BD3BiasDropoutAdd, params=dict(kind=MLP_OUTPUT, **bda_params)
    )

    if config.reference_bias_layout:
        mlp = spec.submodules.mlp.submodules
        mlp.linear_fc1 = _biased(mlp.linear_fc1)
        mlp.linear_fc2 = _biased(mlp.linear_fc2)

    layer = spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if _needs_sequence_parallel_norm(config, getattr(layer, name)):
            setattr(layer, name, SequenceParallelTorchNorm)
    return spec


def get_bd3_block_spec(
    config: BD3Config,
    layer_spec: ModuleSpec,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """The TransformerBlock spec for this pipeline stage: `layer_spec` for each local layer and
    megatron's final-norm choice (TENorm / apex FusedLayerNorm / torch), except that the torch
    norm becomes SequenceParallelTorchNorm under sequence parallel (see the module docstring)."""
    final_norm = LayerNormImpl
    if _needs_sequence_parallel_norm(config, final_norm):
        final_norm = SequenceParallelTorchNorm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=final_norm)
