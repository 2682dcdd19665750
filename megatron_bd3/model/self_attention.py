"""BD3SelfAttention: megatron's SelfAttention with a short forward for the BD3 model's calls.

BD3Model calls self-attention in one plain way (no inference context, no packed sequences, RoPE
angles as one [s, 1 or b, 1, d] table, no output gate), for which megatron's general forward
reduces to: qkv projection, RoPE on q and k, core attention, output projection. This class runs
exactly that (config.short_self_attention_forward, default on), with two differences that change
the cost, not the result:

* RoPE through megatron_bd3.model.rope (one pass per half instead of megatron's unfused chain of
  slices, negations and concatenations; identical formula).
* x_t queries only in the model's last layer (config.x_t_only_last_layer, default on). In the
  two-stream training forward nothing reads the x_0 half of the last layer's output (the loss
  uses the x_t half; the x_0 half only ever served as keys/values, and after the last layer there
  are no more). The layer then computes the x_t queries' attention only, and the rest of the
  layer (its output projection, residual, MLP) runs on the L x_t rows: the layer's
  bias-dropout-add (keyed_dropout.BD3BiasDropoutAdd) cuts the residual to the rows the attention
  returned. Keys
  and values still come from all 2L tokens. Decided explicitly, never from the mask tensor:
  at construction from the config (last layer, two streams, sdpa, no sequence parallelism — the
  rows of a rank are not the x_t rows), and per call by `outputs` (set by BD3Model:
  "x_t" for the training forward, "all" inside BD3Model.forward_hidden), and only for the model's
  own attention (attention_mask None, or the per-token document ids that restrict it to
  documents, masks.py), never for a caller's own mask.

Every other call (inference contexts, packed sequences, interleaved or scaled RoPE, gates,
activation offloading, ...) goes to megatron's forward unchanged.
"""

from __future__ import annotations

from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention
from torch import Tensor

from megatron_bd3.model.masks import is_document_ids
from megatron_bd3.model.rope import apply_rotary, rotary_cos_sin


class BD3SelfAttention(SelfAttention):
    """SelfAttention with the short BD3 forward described in the module docstring."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = self.config
        self._short_forward = not any(
            (
                config.rotary_interleaved,
                config.multi_latent_attention,
                getattr(config, "attention_output_gate", False),
                getattr(config, "fused_single_qkv_rope", False),
                getattr(config, "flash_decode", False),
                getattr(config, "no_rope_freq", None),
                getattr(config, "apply_rope_fusion", False),
                _yarn_get_concentration_factor_from_config(config) != 1.0,
                getattr(self, "offload_qkv_linear", False),
                getattr(self, "offload_core_attention", False),
                getattr(self, "offload_attn_proj", False),
            )
        )
        self._short_forward = self._short_forward and getattr(
            config, "short_self_attention_forward", True
        )
        # Whether this layer may ever compute the x_t queries alone (see the module docstring).
        self.x_t_rows_eligible = (
            self._short_forward
            and getattr(config, "x_t_only_last_layer", False)
            and self.layer_number == config.num_layers
            and not config.sequence_parallel
            and not getattr(config, "single_stream", False)
            and getattr(config, "resolved_attention_kernel", None) == "sdpa"
        )
        # Which output rows the caller reads in the current call: "x_t" (the training forward,
        # the resting state) or "all" (BD3Model.forward_hidden sets it for its call).
        self.outputs = "x_t"

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask,
        key_value_states: Tensor | None = None,
        inference_context=None,
        rotary_pos_emb: Tensor | None = None,
        rotary_pos_cos: Tensor | None = None,
        rotary_pos_sin: Tensor | None = None,
        rotary_pos_cos_sin: Tensor | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
    ):
        """[s, b, h] -> ([s' , b, h] output, bias); s' = L instead of 2L only in the case above."""
        plain_call = (
            self._short_forward
            and key_value_states is None
            and inference_context is None
            and inference_params is None
            and packed_seq_params is None
            and rotary_pos_cos is None
            and rotary_pos_sin is None
            and rotary_pos_cos_sin is None
            and attention_bias is None
            and sequence_len_offset is None
            and (rotary_pos_emb is None or isinstance(rotary_pos_emb, Tensor))
        )
        if not plain_call:
            return super().forward(
                hidden_states,
                attention_mask,
                key_value_states=key_value_states,
                inference_context=inference_context,
                rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos,
                rotary_pos_sin=rotary_pos_sin,
                rotary_pos_cos_sin=rotary_pos_cos_sin,
                attention_bias=attention_bias,
                packed_seq_params=packed_seq_params,
                sequence_len_offset=sequence_len_offset,
                inference_params=inference_params,
            )

        query, key, value = self.get_query_key_value_tensors(hidden_states)  # [s, b, n, hn]
        x_t_rows = self._x_t_rows_only(attention_mask, query.size(0))
        if rotary_pos_emb is not None:
            cos, sin = rotary_cos_sin(rotary_pos_emb, query.dtype)  # [s, 1|b, 1, rot/2]
            key = apply_rotary(key, cos, sin)
            if x_t_rows is not None:
                query, cos, sin = query[:x_t_rows], cos[:x_t_rows], sin[:x_t_rows]
            query = apply_rotary(query, cos, sin)
        elif x_t_rows is not None:
            query = query[:x_t_rows]

        if self.checkpoint_core_attention and self.training:
            core_attn_out = self._checkpointed_attention_forward(
                query, key, value, attention_mask, attn_mask_type=self.attn_mask_type
            )
        else:
            core_attn_out = self.core_attention(
                query, key, value, attention_mask, attn_mask_type=self.attn_mask_type
            )  # [sq, b, hp]
        return self.linear_proj(core_attn_out)

    def _x_t_rows_only(self, attention_mask, rows: int) -> int | None:
        """L if this call computes the x_t queries only (see the module docstring)."""
        own_attention = attention_mask is None or is_document_ids(attention_mask)
        if not self.x_t_rows_eligible or self.outputs != "x_t" or not own_attention:
            return None
        # this rank's x_t positions: L, or L / CP under context parallelism
        seq_length = self.config.seq_length // self.config.context_parallel_size
        return seq_length if rows == 2 * seq_length else None

