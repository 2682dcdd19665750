"""The BD3 model on megatron-core: config, core attention, layer spec, two-stream model, step.

config       BD3Config (TransformerConfig + BD3 knobs) and presets bd3/ar/mdlm/reference
masks        mask constructors (True = may attend), AttentionPattern.CAUSAL
attention    BD3CoreAttention: FlexAttention / SDPA drop-in for megatron's core_attention;
             attention_mask=None runs the model's own attention (AttentionPlan, from the
             config), anything else is a caller's own mask, used as given
block_attention  the training mask's attention computed block by block on CPU
context_parallel the CP layout of the two streams (zig-zag chunks of whole blocks) and the
             clean key/value all-gather
self_attention   BD3SelfAttention (short forward, own RoPE, x_t-only last layer) and its bda
rope         rotary embedding as one autograd function
keyed_dropout    layout-invariant dropout (DropoutKey, the layers' bias-dropout-add leaves)
keyed_init   layout-invariant initial weights (init_rng: keyed)
layer_spec   get_bd3_layer_spec: megatron's GPT layer spec with the attention leaves swapped
bd3_model    BD3Model (LanguageModule) and build_bd3_model (megatron model provider)
step         forward_step / loss_func for megatron's forward_backward_func

The fast paths are BD3Config switches (cpu_block_attention, x_t_only_last_layer,
short_self_attention_forward, masked_only_logits, single_stream_mdlm), all on by default.
"""

from megatron_bd3.model.attention import AttentionPlan, BD3CoreAttention
from megatron_bd3.model.bd3_model import BD3LossInputs, BD3Model, build_bd3_model
from megatron_bd3.model.config import (
    BD3Config,
    ar_config,
    bd3_config,
    gelu_tanh,
    mdlm_config,
    reference_architecture,
    reference_owt_config,
)
from megatron_bd3.model.layer_spec import get_bd3_layer_spec
from megatron_bd3.model.masks import (
    AttentionPattern,
    to_megatron_mask,
    training_attention_mask,
)
from megatron_bd3.model.step import BATCH_KEYS, forward_step, loss_func

__all__ = [
    "AttentionPattern",
    "AttentionPlan",
    "BATCH_KEYS",
    "BD3Config",
    "BD3CoreAttention",
    "BD3LossInputs",
    "BD3Model",
    "ar_config",
    "bd3_config",
    "build_bd3_model",
    "forward_step",
    "gelu_tanh",
    "get_bd3_layer_spec",
    "loss_func",
    "mdlm_config",
    "reference_architecture",
    "reference_owt_config",
    "to_megatron_mask",
    "training_attention_mask",
]
