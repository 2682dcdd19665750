"""An independent re-implementation of the reference BD3LM forward (method doc §8.1), in its own
adaLN form, for the conversion tests. Written from the description, not from our model code:
reference key names, LayerNorm without bias then ``* weight``, adaLN chunks (shift, scale, gate)
applied as ``y * (1 + scale) + shift`` and ``x + gate * f(...)``, packed qkv rearranged
``(three h d)``, fp32 rotary tables as the reference builds them, attention written out by hand,
and the three-term training mask over ``[x_t ; x_0]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_training_mask(length: int, block_size: int) -> torch.Tensor:
    """M_BD | M_OBC | M_BC over 2L positions (True = attend)."""
    idx = torch.arange(2 * length)
    q, k = idx[:, None], idx[None, :]
    q_clean, k_clean = q >= length, k >= length
    q_block = torch.where(q_clean, q - length, q) // block_size
    k_block = torch.where(k_clean, k - length, k) // block_size
    diagonal = (q_block == k_block) & (q_clean == k_clean)
    offset_causal = (q_block > k_block) & k_clean & ~q_clean
    causal = (q_block >= k_block) & k_clean & q_clean
    return diagonal | offset_causal | causal


def random_reference_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random reference-layout weights with non-trivial adaLN, sigma_map and norm weights."""
    g = torch.Generator().manual_seed(seed)
    d, v, cond, n = cfg["hidden_dim"], cfg["vocab_size"], cfg["cond_dim"], cfg["n_blocks"]

    def rnd(*shape, scale=0.3):
        return scale * torch.randn(*shape, generator=g)

    w = {
        "backbone.vocab_embed.embedding": rnd(v, d, scale=1.0),
        "backbone.sigma_map.mlp.0.weight": rnd(cond, 256, scale=0.2),
        "backbone.sigma_map.mlp.0.bias": rnd(cond),
        "backbone.sigma_map.mlp.2.weight": rnd(cond, cond),
        "backbone.sigma_map.mlp.2.bias": rnd(cond),
        "backbone.output_layer.norm_final.weight": 1 + rnd(d),
        "backbone.output_layer.adaLN_modulation.weight": rnd(2 * d, cond),
        "backbone.output_layer.adaLN_modulation.bias": rnd(2 * d),
        "backbone.output_layer.linear.weight": rnd(v, d),
        "backbone.output_layer.linear.bias": rnd(v),
    }
    for i in range(n):
        p = f"backbone.blocks.{i}."
        w.update({
            p + "norm1.weight": 1 + rnd(d), p + "norm2.weight": 1 + rnd(d),
            p + "attn_qkv.weight": rnd(3 * d, d), p + "attn_out.weight": rnd(d, d),
            p + "mlp.0.weight": rnd(4 * d, d), p + "mlp.0.bias": rnd(4 * d),
            p + "mlp.2.weight": rnd(d, 4 * d), p + "mlp.2.bias": rnd(d),
            p + "adaLN_modulation.weight": rnd(6 * d, cond),
            p + "adaLN_modulation.bias": rnd(6 * d),
        })
    return w


def _layer_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), [x.shape[-1]]) * weight[None, None, :]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_forward(w: dict[str, torch.Tensor], cfg: dict, tokens: torch.Tensor,
                      positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Logits ``[b, s, V]`` of the reference backbone (sigma = 0, eval mode).

    ``positions [s]``: rotary position of each token; ``mask [s, s]`` bool (True = attend)."""
    d, heads = cfg["hidden_dim"], cfg["n_heads"]
    hd = d // heads
    x = w["backbone.vocab_embed.embedding"][tokens]
    # TimestepEmbedder at sigma = 0, then SiLU
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.zeros(1, 1) * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    hidden = F.silu(t_freq @ w["backbone.sigma_map.mlp.0.weight"].T
                    + w["backbone.sigma_map.mlp.0.bias"])
    c = F.silu(hidden @ w["backbone.sigma_map.mlp.2.weight"].T + w["backbone.sigma_map.mlp.2.bias"])
    # rotary tables (float32, as the reference's Rotary module builds them)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.einsum("i,j->ij", positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]  # [1, s, 1, hd]
    b, s = tokens.shape
    for i in range(cfg["n_blocks"]):
        p = f"backbone.blocks.{i}."
        mod = c @ w[p + "adaLN_modulation.weight"].T + w[p + "adaLN_modulation.bias"]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod[:, None].chunk(6, dim=2)
        x_skip = x
        y = _layer_norm(x, w[p + "norm1.weight"]) * (1 + scale_a) + shift_a
        qkv = (y @ w[p + "attn_qkv.weight"].T).view(b, s, 3, heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [b, s, h, hd]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        if mask is not None:
            scores = scores.masked_fill(~mask[None, None], float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v).reshape(b, s, d)
        x = x_skip + gate_a * (attn @ w[p + "attn_out.weight"].T)
        y = _layer_norm(x, w[p + "norm2.weight"]) * (1 + scale_m) + shift_m
        m = F.gelu(y @ w[p + "mlp.0.weight"].T + w[p + "mlp.0.bias"], approximate="tanh")
        x = x + gate_m * (m @ w[p + "mlp.2.weight"].T + w[p + "mlp.2.bias"])
    mod = c @ w["backbone.output_layer.adaLN_modulation.weight"].T + w[
        "backbone.output_layer.adaLN_modulation.bias"]
    shift, scale = mod[:, None].chunk(2, dim=2)
    y = _layer_norm(x, w["backbone.output_layer.norm_final.weight"]) * (1 + scale) + shift
    return y @ w["backbone.output_layer.linear.weight"].T + w["backbone.output_layer.linear.bias"]


def reference_training_logits(w, cfg, x_t: torch.Tensor, x_0: torch.Tensor) -> torch.Tensor:
    """The reference training pass: ``[x_t ; x_0]``, positions 0..L-1 twice, the 3-term mask,
    logits of the first L positions."""
    length = x_t.shape[1]
    positions = torch.cat((torch.arange(length), torch.arange(length)))
    mask = reference_training_mask(length, cfg["block_size"])
    return reference_forward(w, cfg, torch.cat((x_t, x_0), dim=1), positions, mask)[:, :length]
