"""Configuration of a BD3-LM (block diffusion language model) for Hugging Face transformers.

Written for megatron_bd3 and shipped inside every model directory it exports; it imports only
transformers. Two weight layouts share this configuration (field ``weight_layout``):

* ``"reference"``: the DiT with adaLN modulation of the released BD3-LM models, weights under
  ``backbone.*`` with their names (``backbone.blocks.{i}.attn_qkv.weight`` ...), config fields as
  theirs (``hidden_dim``, ``n_blocks``, ``n_heads``, ``cond_dim``, ``model_length``, ...);
* ``"megatron_bd3"``: the pre-LN transformer that megatron_bd3 trains (grouped-query attention,
  optional biases, optional tied embeddings), weights under ``backbone.*`` with the names of
  megatron_bd3's standalone network (``backbone.layers.{i}.attn.qkv.weight`` ...).

The fields of the reference layout keep their names and meaning; the extra fields below default
to the reference architecture, so a reference config without them reads the same.
"""

from __future__ import annotations

from transformers import PretrainedConfig

WEIGHT_LAYOUTS = ("reference", "megatron_bd3")


class BD3LMConfig(PretrainedConfig):
    """Sizes, block size, special ids and the learned clip range of a BD3-LM.

    ``model_length`` is the training context L (also the longest sample ``generate_blocks``
    produces); ``block_size`` is B; ``mask_token_id`` the absorbing [MASK] state;
    ``sampling_eps_min/max`` the learned clip range of the masking rate.
    """

    model_type = "bd3lm"

    def __init__(
        self,
        block_size: int = 4,
        vocab_size: int = 50258,
        model_length: int = 1024,
        cross_attn: bool = True,
        adaln: bool = True,
        attn_backend: str = "sdpa",
        causal: bool = False,
        hidden_dim: int = 768,
        cond_dim: int = 128,
        n_blocks: int = 12,
        n_heads: int = 12,
        dropout: float = 0.1,
        time_conditioning: bool = False,
        var_min: bool = True,
        sampling_eps_min: float = 1e-3,
        sampling_eps_max: float = 1.0,
        mask_token_id: int | None = None,
        weight_layout: str = "reference",
        n_query_groups: int | None = None,
        ffn_hidden_dim: int | None = None,
        qkv_bias: bool = False,
        attn_out_bias: bool = False,
        mlp_bias: bool = True,
        output_bias: bool = True,
        tie_embeddings: bool = False,
        rotary_base: float = 10000.0,
        layernorm_eps: float = 1e-5,
        tokenizer_fingerprint: str | None = None,
        **kwargs,
    ) -> None:
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.model_length = model_length
        self.cross_attn = cross_attn
        self.adaln = adaln
        self.attn_backend = attn_backend
        self.causal = causal
        self.hidden_dim = hidden_dim
        self.cond_dim = cond_dim
        self.n_blocks = n_blocks
        self.n_heads = n_heads
        self.dropout = dropout
        self.time_conditioning = time_conditioning
        self.var_min = var_min
        self.sampling_eps_min = sampling_eps_min
        self.sampling_eps_max = sampling_eps_max
        self.mask_token_id = vocab_size - 1 if mask_token_id is None else mask_token_id
        self.weight_layout = weight_layout
        self.n_query_groups = n_heads if n_query_groups is None else n_query_groups
        self.ffn_hidden_dim = 4 * hidden_dim if ffn_hidden_dim is None else ffn_hidden_dim
        self.qkv_bias = qkv_bias
        self.attn_out_bias = attn_out_bias
        self.mlp_bias = mlp_bias
        self.output_bias = output_bias
        self.tie_embeddings = tie_embeddings
        self.rotary_base = rotary_base
        self.layernorm_eps = layernorm_eps
        self.tokenizer_fingerprint = tokenizer_fingerprint
        kwargs.setdefault("tie_word_embeddings", False)  # tying is ours (tie_embeddings)
        super().__init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first field this code cannot run."""
        if self.weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"weight_layout {self.weight_layout!r} is not one of "
                             f"{WEIGHT_LAYOUTS}")
        if self.time_conditioning:
            raise ValueError("time_conditioning=True is not supported (BD3-LMs are trained "
                             "without it)")
        if self.causal or not self.cross_attn:
            raise ValueError("causal=True or cross_attn=False is not a block diffusion model")
        if self.hidden_dim % self.n_heads or (self.hidden_dim // self.n_heads) % 2:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be n_heads {self.n_heads} "
                             "times an even head size")
        if self.n_heads % self.n_query_groups:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_query_groups "
                             f"{self.n_query_groups}")
        if self.model_length % self.block_size:
            raise ValueError(f"model_length {self.model_length} is not a multiple of "
                             f"block_size {self.block_size}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
