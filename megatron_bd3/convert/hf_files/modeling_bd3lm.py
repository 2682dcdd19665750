"""BD3-LM (block diffusion language model) for Hugging Face transformers.

Written for megatron_bd3 and shipped inside every model directory it exports, so that

    model = AutoModelForMaskedLM.from_pretrained(directory, trust_remote_code=True)

works offline. It imports only torch, transformers and its sibling configuration file. The
method, in short (megatron_bd3's docs/method.md has it in full):

* The network is a pre-LN transformer with rotary positions (rotate-half, over the whole head),
  LayerNorm in fp32, GELU with the tanh approximation and an output projection to the
  vocabulary. The reference layout is the DiT of the released models: with time conditioning
  off its adaLN modulation is a constant, ``c = SiLU(sigma_map(sinusoid(0)))``, so each
  ``LN(x) * w * (1 + scale) + shift`` is a LayerNorm with weight ``w * (1 + scale)`` and bias
  ``shift`` and each gate scales the rows of the output projection it follows. This file computes
  those folded weights from the stored ones (in float64) at every call and runs the same layer
  as the megatron_bd3 layout.
* Training reads the 2L tokens ``[x_t ; x_0]`` in one pass under the block-diffusion mask: noisy
  block b sees its own noisy block and the clean blocks before it, clean block b sees the clean
  blocks up to b; both halves use positions 0..L-1. ``forward`` on a ``[batch, 2L]`` input does
  this and returns the logits of the ``x_t`` half.
* Sampling (``sample_mode=True``) is block-causal over clean context: after ``reset_kv_cache``,
  each call feeds new tokens that attend to the cached keys/values and to each other
  block-causally; ``store_kv=True`` appends the new tokens' keys/values to the cache.
  Without a cache, a ``sample_mode`` call reads the whole window block-causally.
* ``generate_blocks`` is the block-by-block sampler with the cache: a block starts all [MASK]
  and the first-hitting sampler reveals one uniformly chosen masked position per call, drawn
  from the model's distribution there (SUBS: [MASK] is never drawn; temperature; nucleus
  top-p), until the block is clean; then it joins the cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_bd3lm import BD3LMConfig

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal features the reference's sigma_map reads
MASK_LOGIT = -1_000_000.0  # added to the [MASK] logit: SUBS never predicts [MASK]


# ---------------------------------------------------------------------------- shared math
def block_diffusion_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """Bool ``[2L, 2L]`` (True = may attend) over ``[x_t ; x_0]``: noisy-noisy within a block,
    noisy -> clean blocks strictly before, clean -> clean blocks up to its own."""
    index = torch.arange(2 * length, device=device)
    clean = index >= length
    block = (index % length) // block_size
    q_clean, k_clean = clean[:, None], clean[None, :]
    q_block, k_block = block[:, None], block[None, :]
    noisy_noisy = ~q_clean & ~k_clean & (q_block == k_block)
    noisy_clean = ~q_clean & k_clean & (k_block < q_block)
    clean_clean = q_clean & k_clean & (k_block <= q_block)
    return noisy_noisy | noisy_clean | clean_clean


def rotary(positions: torch.Tensor, head_dim: int, base: float, dtype) -> tuple:
    """cos and signed sin ``[b|1, s, 1, hd]`` of ``positions [b|1, s]``, computed in float64:
    ``x * cos + swap_halves(x) * signed_sin`` is rotate-half RoPE."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64,
                                            device=positions.device) / head_dim))
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [b|1, s, hd / 2]
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1)
    sin = torch.cat((-angles.sin(), angles.sin()), dim=-1)
    return cos.to(dtype)[:, :, None], sin.to(dtype)[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """LayerNorm computed in fp32, as the reference does."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


class KVCache:
    """Rotated keys and values of the tokens stored so far, per layer ``[b, groups, n, hd]``."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # tokens stored (their positions are 0..length-1)


def transformer_layer(x, w: dict, heads: int, groups: int, eps: float, cos, sin, mask,
                      cache: KVCache | None, layer: int, store: bool) -> torch.Tensor:
    """One pre-LN layer over ``x [b, s, d]`` with weights ``w`` (folded for the DiT)::

        h  = x + out(Attn(RoPE(qkv(LN1(x)))))
        x' = h + fc2(GELU_tanh(fc1(LN2(h))))

    ``mask`` bool ``[b|1, 1, s, kv]`` or None (all); with ``cache``, keys/values are the cached
    ones followed by the new ones, and ``store`` appends the new ones to the cache."""
    b, s, d = x.shape
    hd = d // heads
    qkv = F.linear(layer_norm(x, w["norm1.weight"], w["norm1.bias"], eps), w["qkv.weight"],
                   w.get("qkv.bias")).view(b, s, heads + 2 * groups, hd)
    q, k = apply_rotary(qkv[:, :, :heads + groups], cos, sin).split([heads, groups], dim=2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, heads + groups:].transpose(1, 2)
    if cache is not None:
        if cache.keys[layer] is not None:
            k = torch.cat((cache.keys[layer], k), dim=2)  # [b, g, n + s, hd]
            v = torch.cat((cache.values[layer], v), dim=2)
        if store:
            cache.keys[layer], cache.values[layer] = k, v
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(hd),
                                              enable_gqa=groups != heads)  # [b, h, s, hd]
    x = x + F.linear(attended.transpose(1, 2).reshape(b, s, d), w["out.weight"],
                     w.get("out.bias"))
    h = layer_norm(x, w["norm2.weight"], w["norm2.bias"], eps)
    h = F.linear(gelu_tanh(F.linear(h, w["fc1.weight"], w.get("fc1.bias"))), w["fc2.weight"],
                 w.get("fc2.bias"))
    return x + h


class _Norm(nn.Module):
    """Holds a LayerNorm's parameters under ``weight`` (and ``bias``) names."""

    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None


# ---------------------------------------------------------------------------- megatron_bd3
class _Attention(nn.Module):
    def __init__(self, config: BD3LMConfig) -> None:
        super().__init__()
        d, hd = config.hidden_dim, config.hidden_dim // config.n_heads
        self.qkv = nn.Linear(d, (config.n_heads + 2 * config.n_query_groups) * hd,
                             bias=config.qkv_bias)
        self.out = nn.Linear(config.n_heads * hd, d, bias=config.attn_out_bias)


class _MLP(nn.Module):
    def __init__(self, config: BD3LMConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_dim, config.ffn_hidden_dim, bias=config.mlp_bias)
        self.fc2 = nn.Linear(config.ffn_hidden_dim, config.hidden_dim, bias=config.mlp_bias)


class _Layer(nn.Module):
    def __init__(self, config: BD3LMConfig) -> None:
        super().__init__()
        self.attn_norm = _Norm(config.hidden_dim, bias=True)
        self.attn = _Attention(config)
        self.mlp_norm = _Norm(config.hidden_dim, bias=True)
        self.mlp = _MLP(config)

    def weights(self) -> dict:
        return {"norm1.weight": self.attn_norm.weight, "norm1.bias": self.attn_norm.bias,
                "qkv.weight": self.attn.qkv.weight, "qkv.bias": self.attn.qkv.bias,
                "out.weight": self.attn.out.weight, "out.bias": self.attn.out.bias,
                "norm2.weight": self.mlp_norm.weight, "norm2.bias": self.mlp_norm.bias,
                "fc1.weight": self.mlp.fc1.weight, "fc1.bias": self.mlp.fc1.bias,
                "fc2.weight": self.mlp.fc2.weight, "fc2.bias": self.mlp.fc2.bias}


class TransformerBackbone(nn.Module):
    """megatron_bd3's network: ``embedding``, ``layers.{i}``, ``final_norm``, ``output``."""

    def __init__(self, config: BD3LMConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_dim)
        self.layers = nn.ModuleList(_Layer(config) for _ in range(config.n_blocks))
        self.final_norm = _Norm(config.hidden_dim, bias=True)
        if config.tie_embeddings:
            self.output = None
            self.output_bias = (nn.Parameter(torch.zeros(config.vocab_size))
                                if config.output_bias else None)
        else:
            self.output = nn.Linear(config.hidden_dim, config.vocab_size,
                                    bias=config.output_bias)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens)

    def layer_weights(self) -> list[dict]:
        return [layer.weights() for layer in self.layers]

    def output_weights(self) -> dict:
        if self.output is None:
            return {"norm.weight": self.final_norm.weight, "norm.bias": self.final_norm.bias,
                    "weight": self.embedding.weight, "bias": self.output_bias}
        return {"norm.weight": self.final_norm.weight, "norm.bias": self.final_norm.bias,
                "weight": self.output.weight, "bias": self.output.bias}


# ---------------------------------------------------------------------------- reference DiT
class _TimestepEmbedder(nn.Module):
    def __init__(self, cond_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim))


class _Embedding(nn.Module):
    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))


class _Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        # kept for the reference's weight names; the tables are computed in float64 instead
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq)


class _DiTBlock(nn.Module):
    def __init__(self, config: BD3LMConfig) -> None:
        super().__init__()
        d = config.hidden_dim
        self.norm1 = _Norm(d, bias=False)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = _Norm(d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * d, d))
        if config.adaln:
            self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * d)

    def weights(self, c: torch.Tensor | None) -> dict:
        """The block as a pre-LN layer: the constant modulation folded in, in float64."""
        def f64(t):
            return t.detach().to(torch.float64)

        d, dtype = self.norm1.weight.shape[0], self.norm1.weight.dtype
        if c is None:
            zeros, ones = torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
            shift_a = scale_a = shift_m = scale_m = zeros.to(self.norm1.weight.device)
            gate_a = gate_m = ones.to(self.norm1.weight.device)
        else:
            modulation = f64(self.adaLN_modulation.weight) @ c + f64(self.adaLN_modulation.bias)
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation.chunk(6)
        folded = {
            "norm1.weight": f64(self.norm1.weight) * (1 + scale_a), "norm1.bias": shift_a,
            "qkv.weight": self.attn_qkv.weight,
            "out.weight": gate_a[:, None] * f64(self.attn_out.weight),
            "norm2.weight": f64(self.norm2.weight) * (1 + scale_m), "norm2.bias": shift_m,
            "fc1.weight": self.mlp[0].weight, "fc1.bias": self.mlp[0].bias,
            "fc2.weight": gate_m[:, None] * f64(self.mlp[2].weight),
            "fc2.bias": gate_m * f64(self.mlp[2].bias),
        }
        return {k: v.to(dtype) for k, v in folded.items()}


class _FinalLayer(nn.Module):
    def __init__(self, config: BD3LMConfig) -> None:
        super().__init__()
        self.norm_final = _Norm(config.hidden_dim, bias=False)
        self.linear = nn.Linear(config.hidden_dim, config.vocab_size)
        if config.adaln:
            self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * config.hidden_dim)


class DiTBackbone(nn.Module):
    """The reference's DiT under its weight names: ``vocab_embed``, ``sigma_map``,
    ``rotary_emb``, ``blocks.{i}``, ``output_layer``."""

    def __init__(self, config: BD3LMConfig) -> None:
        super().__init__()
        self.adaln = config.adaln
        self.vocab_embed = _Embedding(config.hidden_dim, config.vocab_size)
        if config.adaln:
            self.sigma_map = _TimestepEmbedder(config.cond_dim)
        self.rotary_emb = _Rotary(config.hidden_dim // config.n_heads, config.rotary_base)
        self.blocks = nn.ModuleList(_DiTBlock(config) for _ in range(config.n_blocks))
        self.output_layer = _FinalLayer(config)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.vocab_embed.embedding)

    def conditioning(self) -> torch.Tensor | None:
        """``c = SiLU(sigma_map(sinusoid(0)))`` in float64: the features of 0 are cos 0 = 1 for
        the first half and sin 0 = 0 for the second."""
        if not self.adaln:
            return None
        mlp = self.sigma_map.mlp
        half = FREQUENCY_EMBEDDING_SIZE // 2
        device = mlp[0].weight.device
        features = torch.cat((torch.ones(half, dtype=torch.float64, device=device),
                              torch.zeros(half, dtype=torch.float64, device=device)))
        hidden = F.silu(mlp[0].weight.double() @ features + mlp[0].bias.double())
        return F.silu(mlp[2].weight.double() @ hidden + mlp[2].bias.double())

    def layer_weights(self) -> list[dict]:
        c = self.conditioning()
        return [block.weights(c) for block in self.blocks]

    def output_weights(self) -> dict:
        final = self.output_layer
        weight = final.norm_final.weight
        if self.adaln:
            c = self.conditioning()
            shift, scale = (final.adaLN_modulation.weight.double() @ c
                            + final.adaLN_modulation.bias.double()).chunk(2)
        else:
            shift = scale = torch.zeros_like(weight, dtype=torch.float64)
        return {"norm.weight": (weight.double() * (1 + scale)).to(weight.dtype),
                "norm.bias": shift.to(weight.dtype),
                "weight": final.linear.weight, "bias": final.linear.bias}


# ---------------------------------------------------------------------------- the model
class BD3LM(PreTrainedModel):
    """A BD3-LM: ``forward`` (training pass over ``[x_t ; x_0]`` or a sampling pass) and
    ``generate_blocks`` (the block-by-block sampler)."""

    config_class = BD3LMConfig
    base_model_prefix = "backbone"
    _supports_sdpa = True

    def __init__(self, config: BD3LMConfig) -> None:
        super().__init__(config)
        if config.weight_layout == "reference":
            self.backbone = DiTBackbone(config)
        else:
            self.backbone = TransformerBackbone(config)
        if config.var_min:
            self.register_buffer("sampling_eps_min", torch.tensor(config.sampling_eps_min))
            self.register_buffer("sampling_eps_max", torch.tensor(config.sampling_eps_max))
        self.kv_cache: KVCache | None = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Every weight comes from the checkpoint; a fresh model gets small random weights.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, _Embedding):
            nn.init.normal_(module.embedding, std=0.02)

    # ------------------------------------------------------------------ the network
    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
             cache: KVCache | None = None, store: bool = False,
             hidden_states: list | None = None) -> torch.Tensor:
        """Logits ``[b, s, V]`` of ``tokens [b, s]`` at ``positions [b|1, s]`` under ``mask``
        (bool ``[b|1, s, kv]``, True = may attend; None = all)."""
        config = self.config
        x = self.backbone.embed(tokens)  # [b, s, d]
        cos, sin = rotary(positions, config.hidden_dim // config.n_heads, config.rotary_base,
                          x.dtype)
        mask = None if mask is None else mask[:, None]  # [b|1, 1, s, kv]
        if hidden_states is not None:
            hidden_states.append(x)
        for i, weights in enumerate(self.backbone.layer_weights()):
            x = transformer_layer(x, weights, config.n_heads, config.n_query_groups,
                                  config.layernorm_eps, cos, sin, mask, cache, i, store)
            if hidden_states is not None:
                hidden_states.append(x)
        out = self.backbone.output_weights()
        x = layer_norm(x, out["norm.weight"], out["norm.bias"], config.layernorm_eps)
        if cache is not None and store:
            cache.length += tokens.shape[1]
        return F.linear(x, out["weight"], out["bias"])

    def reset_kv_cache(self, eval_batch_size: int = 1) -> None:
        """Start an empty key/value cache (``sample_mode`` calls then read and extend it)."""
        del eval_batch_size  # the cache grows with what is stored
        self.kv_cache = KVCache(self.config.n_blocks)

    def forward(self, input_ids: torch.LongTensor = None, timesteps: torch.Tensor | None = None,
                sample_mode: bool | None = None, store_kv: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None):
        """Logits of ``input_ids``.

        Not ``sample_mode``: ``input_ids [b, 2n]`` is ``[x_t ; x_0]`` (n a multiple of the
        block size); returns the logits of the ``x_t`` half ``[b, n, V]``.
        ``sample_mode``: with a cache (``reset_kv_cache``), ``input_ids [b, s]`` are the tokens
        after the cached ones; they see the cache and each other block-causally, and
        ``store_kv`` appends them to the cache. Without a cache, ``input_ids`` is the window
        from position 0, read block-causally. Returns ``[b, s, V]``.
        ``timesteps`` is accepted and unused (no time conditioning). ``return_dict`` (default:
        the config's; the exported configs say false) gives a ``MaskedLMOutput``, else the
        logits tensor (with ``output_hidden_states``, ``(logits, hidden_states)``).
        """
        del timesteps
        config = self.config
        hidden_states = [] if output_hidden_states else None
        device = input_ids.device
        B = config.block_size
        if not sample_mode:
            if input_ids.shape[1] % (2 * B):
                raise ValueError(f"the training pass reads [x_t ; x_0]: input length "
                                 f"{input_ids.shape[1]} must be twice a multiple of block_size "
                                 f"{B}")
            n = input_ids.shape[1] // 2
            positions = torch.arange(n, device=device).repeat(2)[None]
            logits = self._run(input_ids, positions, block_diffusion_mask(n, B, device)[None],
                               hidden_states=hidden_states)[:, :n]
            if hidden_states is not None:
                hidden_states = [h[:, :n] for h in hidden_states]
        else:
            cache = self.kv_cache
            start = cache.length if cache is not None else 0
            s = input_ids.shape[1]
            positions = torch.arange(start, start + s, device=device)[None]  # [1, s]
            key_positions = torch.arange(start + s, device=device)
            # block-causal: a key may be read by every query of its block and of later blocks
            mask = (key_positions[None, :] // B) <= (positions[0, :, None] // B)  # [s, kv]
            logits = self._run(input_ids, positions, mask[None], cache, bool(store_kv),
                               hidden_states)
        return_dict = config.return_dict if return_dict is None else return_dict
        if return_dict:
            return MaskedLMOutput(logits=logits, hidden_states=hidden_states)
        if output_hidden_states:
            return logits, hidden_states
        return logits

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate_blocks(self, num_samples: int = 1, length: int | None = None,
                        prompt_ids: list[int] | None = None, seeds: list[int] | None = None,
                        top_p: float = 1.0, temperature: float = 1.0,
                        use_cache: bool = True) -> torch.LongTensor:
        """``num_samples`` sequences of ``length`` tokens (default and at most
        ``model_length``; prompt included), block by block with the first-hitting sampler.

        ``prompt_ids`` (default ``[bos_token_id]`` when the config has one) start every sample;
        sample ``i`` draws from its own ``torch.Generator`` seeded ``seeds[i]`` (default ``i``):
        per call one ``randint`` over its masked positions, then (temperature > 0) one float64
        uniform for the token, drawn by inverting the cumulative distribution. Probabilities:
        logits / temperature, [MASK] suppressed, softmax in float64, nucleus filter (keep the
        most likely tokens whose cumulative probability is <= top_p, always the first,
        renormalise). ``temperature`` 0 takes the most likely token. ``use_cache=False``
        recomputes the whole context at every call (same tokens, slower).
        Returns ``[num_samples, length]``.
        """
        config = self.config
        B, L, mask_id = config.block_size, config.model_length, config.mask_token_id
        length = L if length is None else length
        if not 1 <= length <= L:
            raise ValueError(f"length {length} must be in [1, model_length {L}]")
        if not 0.0 < top_p <= 1.0 or temperature < 0:
            raise ValueError(f"top_p {top_p} must be in (0, 1] and temperature {temperature} "
                             ">= 0")
        if prompt_ids is None:
            bos = getattr(config, "bos_token_id", None)
            prompt_ids = [] if bos is None else [bos]
        prompt = [int(t) for t in prompt_ids]
        if mask_id in prompt or any(not 0 <= t < config.vocab_size for t in prompt):
            raise ValueError("prompt_ids must be clean tokens of the vocabulary")
        seeds = list(range(num_samples)) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != num_samples:
            raise ValueError(f"{len(seeds)} seeds for {num_samples} samples")
        device = next(self.parameters()).device
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        width = -(-length // B) * B  # the last block is fed whole, its tail stays [MASK]
        tokens = torch.full((num_samples, width), mask_id, dtype=torch.long, device=device)
        tokens[:, :len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
        first = (min(len(prompt), length) // B) * B  # the block holding the prompt's end
        was_training = self.training
        self.eval()
        try:
            if use_cache:
                self.reset_kv_cache(num_samples)
                if first:
                    self(tokens[:, :first], sample_mode=True, store_kv=True, return_dict=False)
            for start in range(first, length, B):
                masked = [list(range(max(start, len(prompt)), min(start + B, length)))
                          for _ in range(num_samples)]
                while masked[0]:
                    picks = [m[int(torch.randint(len(m), (1,), generator=g))]
                             for m, g in zip(masked, generators, strict=True)]
                    if use_cache:
                        logits = self(tokens[:, start:start + B], sample_mode=True,
                                      return_dict=False)
                        offset = start
                    else:
                        logits = self(tokens[:, :start + B], sample_mode=True, return_dict=False)
                        offset = 0
                    rows = torch.stack([logits[i, p - offset] for i, p in enumerate(picks)])
                    drawn = self._draw(rows, generators, top_p, temperature)
                    for i, (p, token) in enumerate(zip(picks, drawn, strict=True)):
                        tokens[i, p] = token
                        masked[i].remove(p)
                if use_cache and start + B < length:
                    self(tokens[:, start:start + B], sample_mode=True, store_kv=True,
                         return_dict=False)
        finally:
            self.kv_cache = None
            self.train(was_training)
        return tokens[:, :length]

    def _draw(self, logits: torch.Tensor, generators: list, top_p: float,
              temperature: float) -> list[int]:
        """One token per row of ``logits [n, V]`` (see ``generate_blocks``)."""
        rows = logits.double().cpu()
        if temperature > 0:
            rows = rows / temperature
        suppress = torch.zeros(rows.shape[-1], dtype=torch.float64)
        suppress[self.config.mask_token_id] = MASK_LOGIT
        probs = torch.log_softmax(rows + suppress, dim=-1).exp()
        if top_p < 1.0:
            ordered, order = probs.sort(dim=-1, descending=True)
            keep = ordered.cumsum(dim=-1) <= top_p
            keep[:, 0] = True
            probs = torch.zeros_like(probs).scatter_(-1, order, ordered * keep)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        if temperature == 0:
            return probs.argmax(dim=-1).tolist()
        uniform = torch.cat([torch.rand(1, dtype=torch.float64, generator=g)
                             for g in generators])  # [n]
        cumulative = probs.cumsum(dim=-1)
        total = cumulative[:, -1:]
        # the first index whose cumulative probability exceeds u * total (kept below total, so a
        # zero-probability tail is never chosen)
        target = torch.minimum(uniform[:, None] * total,
                               torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cumulative, target, right=True).squeeze(-1).tolist()
