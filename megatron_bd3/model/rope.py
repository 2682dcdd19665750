"""Rotary position embedding (rotate-half layout) as one autograd function.

Same numbers as megatron-core's unfused `_apply_rotary_pos_emb_bshd` (non-interleaved, mscale 1):
    out = t * cos + rotate_half(t) * sin,   rotate_half([x1, x2]) = [-x2, x1]
with the angle table `freqs = cat(f, f)` that megatron's RotaryEmbedding builds, i.e.
    out[..., :d/2] = x1 * cos(f) - x2 * sin(f),   out[..., d/2:] = x2 * cos(f) + x1 * sin(f).

Why not megatron's: on CPU its unfused path evaluates cos/sin of the table in every call and makes
about ten full passes over q (and again over k) per layer, forward and backward — halves sliced,
negated, concatenated, multiplied, concatenated again with the empty pass-through part — which
cost ~15 % of a small model's training step. This function writes the rotated halves straight
into one output (three passes) and its backward is the inverse rotation (three passes), with
cos/sin computed once per call over the [s, 1, 1, d/2] table, not over the activations.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_cos_sin(freqs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of the first half of megatron's angle table ([s, ..., rot] -> [s, ..., rot/2]).

    megatron's non-interleaved table is cat(f, f), so the first half holds every angle once."""
    half = freqs.size(-1) // 2
    angles = freqs[..., :half]
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """[x1, x2] -> [x1 cos - sign x2 sin, x2 cos + sign x1 sin] over the first 2·cos.size(-1)
    channels; channels beyond them (rotary_percent < 1) are copied unchanged."""
    half = cos.size(-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, layout of x
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    o1, o2 = out[..., :half], out[..., half : 2 * half]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=sign)
    if x.size(-1) > 2 * half:
        out[..., 2 * half :].copy_(x[..., 2 * half :])
    return out


class _RotaryEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        # The rotation is orthogonal: its vector-Jacobian product is the inverse rotation.
        return _rotate(grad, cos, sin, -1.0), None, None


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [s, b, heads, d] by the angles whose cos/sin are [s, 1 or b, 1, rot/2].

    Returns a new contiguous tensor; gradients flow to x only (the angles are constants)."""
    if cos.shape != sin.shape or 2 * cos.size(-1) > x.size(-1):
        raise ValueError(
            f"rotary cos/sin {tuple(cos.shape)}/{tuple(sin.shape)} do not fit x {tuple(x.shape)}"
        )
    return _RotaryEmbedding.apply(x, cos, sin)
