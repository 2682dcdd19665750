"""An independent re-implementation of the reference BD3-LM DiT backbone (method doc §8.1),
used to check that reference weights load into BD3Model exactly.

Forward, with time conditioning off (sigma = 0, so c = SiLU(sigma_map(0)) is a constant):
    h  = x + gate_a * attn_out(Attn(RoPE(attn_qkv(mod(norm1(x), shift_a, scale_a)))))
    x' = h + gate_m * mlp(mod(norm2(h), shift_m, scale_m))
    logits = linear(mod(norm_final(x), shift, scale));  mod(y, s, c) = y * (1 + c) + s
LayerNorm without bias (eps 1e-5); qkv rows ordered (q|k|v, head, head_dim); RoPE rotate-half
over the whole head, base 10000, positions 0..L-1 for each half; no dropout (eval).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_reference_weights(
    vocab: int, hidden: int, layers: int, cond: int = 16, seed: int = 0
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    w = {
        "backbone.vocab_embed.embedding": rand(vocab, hidden, scale=1.0),
        "backbone.sigma_map.mlp.0.weight": rand(cond, 256),
        "backbone.sigma_map.mlp.0.bias": rand(cond),
        "backbone.sigma_map.mlp.2.weight": rand(cond, cond),
        "backbone.sigma_map.mlp.2.bias": rand(cond),
        "backbone.output_layer.norm_final.weight": 1.0 + rand(hidden),
        "backbone.output_layer.adaLN_modulation.weight": rand(2 * hidden, cond),
        "backbone.output_layer.adaLN_modulation.bias": rand(2 * hidden),
        "backbone.output_layer.linear.weight": rand(vocab, hidden),
        "backbone.output_layer.linear.bias": rand(vocab),
    }
    for i in range(layers):
        p = f"backbone.blocks.{i}."
        w[p + "norm1.weight"] = 1.0 + rand(hidden)
        w[p + "attn_qkv.weight"] = rand(3 * hidden, hidden)
        w[p + "attn_out.weight"] = rand(hidden, hidden)
        w[p + "norm2.weight"] = 1.0 + rand(hidden)
        w[p + "mlp.0.weight"] = rand(4 * hidden, hidden)
        w[p + "mlp.0.bias"] = rand(4 * hidden)
        w[p + "mlp.2.weight"] = rand(hidden, 4 * hidden)
        w[p + "mlp.2.bias"] = rand(hidden)
        w[p + "adaLN_modulation.weight"] = rand(6 * hidden, cond)
        w[p + "adaLN_modulation.bias"] = rand(6 * hidden)
    return w


def time_condition(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """c = SiLU(sigma_map(0)); sinusoidal features of 0 are cos = 1 (128), sin = 0 (128)."""
    features = torch.cat([torch.ones(128), torch.zeros(128)]).to(
        w["backbone.sigma_map.mlp.0.weight"]
    )
    h = F.silu(
        features @ w["backbone.sigma_map.mlp.0.weight"].T + w["backbone.sigma_map.mlp.0.bias"]
    )
    h = h @ w["backbone.sigma_map.mlp.2.weight"].T + w["backbone.sigma_map.mlp.2.bias"]
    return F.silu(h)


def _rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [b, s, heads, d]; rotate-half RoPE, base 10000, whole head."""
    d = x.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).to(x.dtype) / d))
    angles = positions.to(x.dtype)[:, None] * inv_freq[None, :]  # [s, d/2]
    angles = torch.cat([angles, angles], dim=-1)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * angles.cos() + rotated * angles.sin()


def _layer_norm(x, weight):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-5) * weight


def reference_logits(
    w: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    positions: torch.Tensor,
    allowed: torch.Tensor,
    heads: int,
    layers: int,
) -> torch.Tensor:
    """Logits [b, s, V] for tokens [b, s] with RoPE positions [s] and mask [s, s] (True = attend)."""
    c = time_condition(w)
    x = w["backbone.vocab_embed.embedding"][tokens]  # [b, s, d]
    b, s, d = x.shape
    hd = d // heads
    for i in range(layers):
        p = f"backbone.blocks.{i}."
        mod = c @ w[p + "adaLN_modulation.weight"].T + w[p + "adaLN_modulation.bias"]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6)
        h = _layer_norm(x, w[p + "norm1.weight"]) * (1 + scale_a) + shift_a
        qkv = (h @ w[p + "attn_qkv.weight"].T).view(b, s, 3, heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [b, s, heads, hd]
        q, k = _rope(q, positions), _rope(k, positions)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, d)
        x = x + gate_a * (attn @ w[p + "attn_out.weight"].T)
        h = _layer_norm(x, w[p + "norm2.weight"]) * (1 + scale_m) + shift_m
        h = F.gelu(h @ w[p + "mlp.0.weight"].T + w[p + "mlp.0.bias"], approximate="tanh")
        x = x + gate_m * (h @ w[p + "mlp.2.weight"].T + w[p + "mlp.2.bias"])
    mod = c @ w["backbone.output_layer.adaLN_modulation.weight"].T
    shift, scale = (mod + w["backbone.output_layer.adaLN_modulation.bias"]).chunk(2)
    h = _layer_norm(x, w["backbone.output_layer.norm_final.weight"]) * (1 + scale) + shift
    return h @ w["backbone.output_layer.linear.weight"].T + w["backbone.output_layer.linear.bias"]


def fold_into_megatron(
    w: dict[str, torch.Tensor], heads: int, layers: int, padded_vocab: int
) -> dict[str, torch.Tensor]:
    """Reference keys -> BD3Model keys, folding the constant adaLN terms (method doc §8.1)."""
    c = time_condition(w)

    def pad(t):
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])

    out = {"embedding.word_embeddings.weight": pad(w["backbone.vocab_embed.embedding"])}
    d = w["backbone.vocab_embed.embedding"].shape[1]
    hd = d // heads
    for i in range(layers):
        p, m = f"backbone.blocks.{i}.", f"decoder.layers.{i}."
        mod = c @ w[p + "adaLN_modulation.weight"].T + w[p + "adaLN_modulation.bias"]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6)
        out[m + "input_layernorm.weight"] = w[p + "norm1.weight"] * (1 + scale_a)
        out[m + "input_layernorm.bias"] = shift_a
        # (q|k|v, head, hd) rows -> megatron's per-head [q_h; k_h; v_h] rows.
        qkv = w[p + "attn_qkv.weight"].view(3, heads, hd, d).permute(1, 0, 2, 3)
        out[m + "self_attention.linear_qkv.weight"] = qkv.reshape(3 * d, d)
        out[m + "self_attention.linear_proj.weight"] = gate_a[:, None] * w[p + "attn_out.weight"]
        out[m + "pre_mlp_layernorm.weight"] = w[p + "norm2.weight"] * (1 + scale_m)
        out[m + "pre_mlp_layernorm.bias"] = shift_m
        out[m + "mlp.linear_fc1.weight"] = w[p + "mlp.0.weight"]
        out[m + "mlp.linear_fc1.bias"] = w[p + "mlp.0.bias"]
        out[m + "mlp.linear_fc2.weight"] = gate_m[:, None] * w[p + "mlp.2.weight"]
        out[m + "mlp.linear_fc2.bias"] = gate_m * w[p + "mlp.2.bias"]
    mod = c @ w["backbone.output_layer.adaLN_modulation.weight"].T
    shift, scale = (mod + w["backbone.output_layer.adaLN_modulation.bias"]).chunk(2)
    out["decoder.final_layernorm.weight"] = w["backbone.output_layer.norm_final.weight"] * (
        1 + scale
    )
    out["decoder.final_layernorm.bias"] = shift
    out["output_layer.weight"] = pad(w["backbone.output_layer.linear.weight"])
    out["output_layer.bias"] = pad(w["backbone.output_layer.linear.bias"])
    return out
