"""The reference BD3-LM DiT evaluated directly from its weights, adaLN and all (torch only).

Used by the parity check of the reference-format conversions: the folded standalone network must
compute what the reference network computes from its own, unfolded tensors. Written from the
docs/method.md §1.3, §4.1 and §8.1, not from the standalone code, so that it can disagree:

    c      = SiLU(sigma_map(sinusoid(0)))                   (time conditioning off)
    h      = x + gate_a * attn_out(Attn(RoPE(attn_qkv(LN(x) * w1 * (1 + scale_a) + shift_a))))
    x'     = h + gate_m * mlp(LN(h) * w2 * (1 + scale_m) + shift_m)
    logits = linear(LN(x) * w_f * (1 + scale) + shift)

LayerNorm without bias, eps 1e-5, in fp32; qkv rows (q|k|v, head, head_dim); RoPE rotate-half over
the whole head, base 10000, positions [0..L-1, 0..L-1] for [x_t ; x_0]; attention under the
block-diffusion mask with scale 1/sqrt(head_dim); GELU with the tanh approximation; no dropout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_bd3.diffusion import block_diffusion_mask

__all__ = ["reference_training_logits"]

_LAYER_NORM_EPS = 1e-5
_FREQUENCIES = 256


def _condition(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """c = SiLU(sigma_map(0)): the sinusoidal features of 0 are cos(0) = 1 then sin(0) = 0."""
    half = _FREQUENCIES // 2
    features = torch.cat((torch.ones(half), torch.zeros(half))).to(torch.float32)
    hidden = F.silu(F.linear(features, w["backbone.sigma_map.mlp.0.weight"],
                             w["backbone.sigma_map.mlp.0.bias"]))
    return F.silu(F.linear(hidden, w["backbone.sigma_map.mlp.2.weight"],
                           w["backbone.sigma_map.mlp.2.bias"]))


def _norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:], eps=_LAYER_NORM_EPS) * weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, s, heads, hd]; rotate-half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def reference_training_logits(
    tensors: dict[str, torch.Tensor], reference_config: dict, x_t: torch.Tensor,
    x_0: torch.Tensor,
) -> torch.Tensor:
    """Logits ``[b, L, V]`` of the x_t half for the two-stream input [x_t ; x_0]."""
    w = {k: v.detach().to(torch.float32).cpu() for k, v in tensors.items()}
    d, heads = reference_config["hidden_dim"], reference_config["n_heads"]
    head_dim = d // heads
    adaln = reference_config.get("adaln", True)
    batch, length = x_t.shape
    c = _condition(w) if adaln else None

    positions = torch.arange(length, dtype=torch.float64).repeat(2)  # [2L]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)  # [2L, hd]
    cos = angles.cos().float()[None, :, None, :]  # [1, 2L, 1, hd]
    sin = angles.sin().float()[None, :, None, :]
    mask = block_diffusion_mask(length, reference_config["block_size"])  # [2L, 2L]

    x = w["backbone.vocab_embed.embedding"][torch.cat((x_t, x_0), dim=1)]  # [b, 2L, d]
    for i in range(reference_config["n_blocks"]):
        p = f"backbone.blocks.{i}."
        if adaln:
            modulation = F.linear(c, w[p + "adaLN_modulation.weight"],
                                  w[p + "adaLN_modulation.bias"])
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation.chunk(6)
        else:
            shift_a = shift_m = scale_a = scale_m = torch.zeros(d)
            gate_a = gate_m = torch.ones(d)
        h = _norm(x, w[p + "norm1.weight"]) * (1 + scale_a) + shift_a
        qkv = F.linear(h, w[p + "attn_qkv.weight"]).view(batch, 2 * length, 3, heads, head_dim)
        q, k, v = qkv.unbind(dim=2)  # each [b, 2L, heads, hd]
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        attended = torch.einsum("bhqk,bkhe->bqhe", scores.softmax(dim=-1), v)
        x = x + gate_a * F.linear(attended.reshape(batch, 2 * length, d),
                                  w[p + "attn_out.weight"])
        h = _norm(x, w[p + "norm2.weight"]) * (1 + scale_m) + shift_m
        h = F.gelu(F.linear(h, w[p + "mlp.0.weight"], w[p + "mlp.0.bias"]), approximate="tanh")
        x = x + gate_m * F.linear(h, w[p + "mlp.2.weight"], w[p + "mlp.2.bias"])
    if adaln:
        shift, scale = F.linear(c, w["backbone.output_layer.adaLN_modulation.weight"],
                                w["backbone.output_layer.adaLN_modulation.bias"]).chunk(2)
    else:
        shift, scale = torch.zeros(d), torch.zeros(d)
    h = _norm(x[:, :length], w["backbone.output_layer.norm_final.weight"]) * (1 + scale) + shift
    return F.linear(h, w["backbone.output_layer.linear.weight"],
                    w["backbone.output_layer.linear.bias"])
