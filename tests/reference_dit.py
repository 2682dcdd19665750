"""A brute-force re-implementation of the reference BD3LM DiT forward, for the tests.

Written plainly from docs/method.md (§4.1 backbone, §8.1 reference weights by name, §1.1 mask),
not from our model code, and kept in the reference's own adaLN form:
    c  = SiLU(sigma_map(0))      time conditioning is off, so sigma = 0 and c is a constant
    h  = x + gate_a * attn_out(Attn(RoPE(attn_qkv(mod(norm1(x), shift_a, scale_a)))))
    x' = h + gate_m * mlp(mod(norm2(h), shift_m, scale_m))
    logits = linear(mod(norm_final(x), shift, scale));   mod(y, shift, scale) = y * (1 + scale) + shift
LayerNorm without bias (eps 1e-5, fp32); qkv rows ordered (q|k|v, head, head_dim); RoPE
rotate-half over the whole head, base 10000, fp32 tables; attention written out by hand with
scale 1/sqrt(head_dim); MLP d -> 4d -> d with GELU (tanh); eval mode (no dropout).

`cfg` is a reference `config.json` dict; the keys used are hidden_dim, vocab_size, cond_dim,
n_blocks, n_heads (and block_size for the training pass).

Users: tests/model (reference weights folded into BD3Model load exactly) and tests/standalone
(import/export of the reference layout). megatron_bd3/convert/reference_dit.py is the runtime
copy the converter's parity check uses; this one stays independent of it on purpose.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "fold_into_megatron",
    "random_reference_weights",
    "reference_forward",
    "reference_training_logits",
    "reference_training_mask",
    "time_condition",
]


def reference_training_mask(length: int, block_size: int) -> torch.Tensor:
    """M_BD | M_OBC | M_BC over the 2L positions of [x_t ; x_0] (§1.1); True = may attend."""
    idx = torch.arange(2 * length)
    q, k = idx[:, None], idx[None, :]
    q_clean, k_clean = q >= length, k >= length
    q_block = torch.where(q_clean, q - length, q) // block_size
    k_block = torch.where(k_clean, k - length, k) // block_size
    diagonal = (q_block == k_block) & (q_clean == k_clean)
    offset_causal = (q_block > k_block) & k_clean & ~q_clean
    causal = (q_block >= k_block) & k_clean & q_clean
    return diagonal | offset_causal | causal


def random_reference_weights(cfg: dict, seed: int = 0,
                             scale: float = 0.3) -> dict[str, torch.Tensor]:
    """Random reference-layout weights (§8.1 names and shapes) with non-trivial adaLN,
    sigma_map and norm weights, so every term of the forward matters. `scale` is the std of
    most weights (the embedding has std 1): smaller keeps the logits, and so the fp32 rounding
    differences between two exact forwards, smaller."""
    g = torch.Generator().manual_seed(seed)
    d, v, cond, n = cfg["hidden_dim"], cfg["vocab_size"], cfg["cond_dim"], cfg["n_blocks"]
    default_scale = scale

    def rnd(*shape, scale=default_scale):
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


def time_condition(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """c = SiLU(sigma_map(0)) [cond]: the sinusoidal features of sigma = 0 (cos half then sin
    half, 128 each, max_period 10000) through Linear-SiLU-Linear, then SiLU."""
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.zeros(1) * freqs  # sigma = 0
    features = torch.cat([torch.cos(args), torch.sin(args)])  # [256]
    hidden = F.silu(features @ w["backbone.sigma_map.mlp.0.weight"].T
                    + w["backbone.sigma_map.mlp.0.bias"])
    return F.silu(hidden @ w["backbone.sigma_map.mlp.2.weight"].T
                  + w["backbone.sigma_map.mlp.2.bias"])


def _layer_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), [x.shape[-1]], eps=1e-5) * weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_forward(w: dict[str, torch.Tensor], cfg: dict, tokens: torch.Tensor,
                      positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Logits [b, s, V] of the reference backbone for tokens [b, s].

    positions [s]: rotary position of each token; mask [s, s] bool (True = attend) or None."""
    d, heads = cfg["hidden_dim"], cfg["n_heads"]
    hd = d // heads
    c = time_condition(w)
    x = w["backbone.vocab_embed.embedding"][tokens]  # [b, s, d]
    b, s = tokens.shape
    # rotary tables in fp32, as the reference's Rotary module builds them
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    angles = torch.einsum("i,j->ij", positions.float(), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]  # [1, s, 1, hd]
    for i in range(cfg["n_blocks"]):
        p = f"backbone.blocks.{i}."
        mod = c @ w[p + "adaLN_modulation.weight"].T + w[p + "adaLN_modulation.bias"]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6)  # each [d]
        y = _layer_norm(x, w[p + "norm1.weight"]) * (1 + scale_a) + shift_a
        qkv = (y @ w[p + "attn_qkv.weight"].T).view(b, s, 3, heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [b, s, h, hd]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        if mask is not None:
            scores = scores.masked_fill(~mask[None, None], float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v).reshape(b, s, d)
        x = x + gate_a * (attn @ w[p + "attn_out.weight"].T)
        y = _layer_norm(x, w[p + "norm2.weight"]) * (1 + scale_m) + shift_m
        m = F.gelu(y @ w[p + "mlp.0.weight"].T + w[p + "mlp.0.bias"], approximate="tanh")
        x = x + gate_m * (m @ w[p + "mlp.2.weight"].T + w[p + "mlp.2.bias"])
    mod = (c @ w["backbone.output_layer.adaLN_modulation.weight"].T
           + w["backbone.output_layer.adaLN_modulation.bias"])
    shift, scale = mod.chunk(2)
    y = _layer_norm(x, w["backbone.output_layer.norm_final.weight"]) * (1 + scale) + shift
    return y @ w["backbone.output_layer.linear.weight"].T + w["backbone.output_layer.linear.bias"]


def reference_training_logits(w: dict[str, torch.Tensor], cfg: dict, x_t: torch.Tensor,
                              x_0: torch.Tensor) -> torch.Tensor:
    """The reference training pass (§1): [x_t ; x_0], positions 0..L-1 twice, the three-term
    mask; logits [b, L, V] of the noisy half."""
    length = x_t.shape[1]
    positions = torch.cat((torch.arange(length), torch.arange(length)))
    mask = reference_training_mask(length, cfg["block_size"])
    return reference_forward(w, cfg, torch.cat((x_t, x_0), dim=1), positions, mask)[:, :length]


def fold_into_megatron(w: dict[str, torch.Tensor], cfg: dict,
                       padded_vocab: int) -> dict[str, torch.Tensor]:
    """Reference keys -> BD3Model (megatron, TP=1) keys, folding the constant adaLN terms (§8.1):
    (1 + scale) into the LayerNorm weight, shift into a LayerNorm bias, gate into the rows of
    attn_out / mlp.2; vocabulary rows zero-padded to `padded_vocab`."""
    c = time_condition(w)
    d, heads = cfg["hidden_dim"], cfg["n_heads"]
    hd = d // heads

    def pad(t):
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])

    out = {"embedding.word_embeddings.weight": pad(w["backbone.vocab_embed.embedding"])}
    for i in range(cfg["n_blocks"]):
        p, m = f"backbone.blocks.{i}.", f"decoder.layers.{i}."
        mod = c @ w[p + "adaLN_modulation.weight"].T + w[p + "adaLN_modulation.bias"]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6)
        out[m + "input_layernorm.weight"] = w[p + "norm1.weight"] * (1 + scale_a)
        out[m + "input_layernorm.bias"] = shift_a
        # (q|k|v, head, hd) rows -> megatron's per-head [q_h; k_h; v_h] rows
        qkv = w[p + "attn_qkv.weight"].view(3, heads, hd, d).permute(1, 0, 2, 3)
        out[m + "self_attention.linear_qkv.weight"] = qkv.reshape(3 * d, d)
        out[m + "self_attention.linear_proj.weight"] = gate_a[:, None] * w[p + "attn_out.weight"]
        out[m + "pre_mlp_layernorm.weight"] = w[p + "norm2.weight"] * (1 + scale_m)
        out[m + "pre_mlp_layernorm.bias"] = shift_m
        out[m + "mlp.linear_fc1.weight"] = w[p + "mlp.0.weight"]
        out[m + "mlp.linear_fc1.bias"] = w[p + "mlp.0.bias"]
        out[m + "mlp.linear_fc2.weight"] = gate_m[:, None] * w[p + "mlp.2.weight"]
        out[m + "mlp.linear_fc2.bias"] = gate_m * w[p + "mlp.2.bias"]
    mod = (c @ w["backbone.output_layer.adaLN_modulation.weight"].T
           + w["backbone.output_layer.adaLN_modulation.bias"])
    shift, scale = mod.chunk(2)
    out["decoder.final_layernorm.weight"] = (
        w["backbone.output_layer.norm_final.weight"] * (1 + scale))
    out["decoder.final_layernorm.bias"] = shift
    out["output_layer.weight"] = pad(w["backbone.output_layer.linear.weight"])
    out["output_layer.bias"] = pad(w["backbone.output_layer.linear.bias"])
    return out
