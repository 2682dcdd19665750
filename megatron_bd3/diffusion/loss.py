"""SUBS parameterisation and the block-diffusion NELBO (docs/method.md §2.2 items 7-9, §2.3).

Single source: every loss goes through :func:`nelbo_from_token_nll`. The model under tensor
parallelism computes ``token_nll`` itself with vocab-parallel cross-entropy on logits whose
[MASK] logit is suppressed (set to -1e6): at a masked position that cross-entropy equals
``-log p_theta(x_0)`` under SUBS, because SUBS is exactly "log-softmax with the [MASK] logit at
-1e6" there. At unmasked positions SUBS gives ``log p = 0`` (carry-over unmasking), so their
``token_nll`` is ignored whatever its value. :func:`nelbo_loss` is the same computation from full
logits for the unsharded case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_bd3.diffusion.mask import validate_block_layout

__all__ = [
    "NEG_INFINITY",
    "NELBOOutput",
    "nelbo_from_token_nll",
    "nelbo_loss",
    "masked_position_log_probs",
    "subs_log_probs",
    "token_nll_from_logits",
]

# The reference's "-infinity": finite so that 0 * NEG_INFINITY stays 0 and no NaN appears.
NEG_INFINITY = -1_000_000.0


def _check_mask_id(logits: torch.Tensor, mask_token_id: int) -> None:
    vocab = logits.shape[-1]
    if not 0 <= mask_token_id < vocab:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab})")


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    # The reference runs the output layer and SUBS under float32 autocast.
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def masked_position_log_probs(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """SUBS log-probabilities ``[..., V]`` at positions where ``x_t`` is [MASK] (zero-masking
    only: log-softmax with the [MASK] logit at -1e6), float32 or wider. What a sampler needs for
    the positions it reveals, without :func:`subs_log_probs`'s carry-over rows."""
    _check_mask_id(logits, mask_token_id)
    logits = _at_least_float32(logits)
    suppress = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    suppress[mask_token_id] = NEG_INFINITY
    return torch.log_softmax(logits + suppress, dim=-1)


def subs_log_probs(logits: torch.Tensor, x_t: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """SUBS log-probabilities ``[b, L, V]`` (float32 or wider) from raw ``logits [b, L, V]``.

    Zero-masking: -1e6 is added to the [MASK] logit before the log-softmax, so [MASK] is never
    predicted. Carry-over unmasking: where ``x_t != [MASK]`` the row is -1e6 everywhere except 0
    at the observed token, so ``log p(x_0) = 0`` exactly there. Materialises ``[b, L, V]``; the
    training loss uses :func:`token_nll_from_logits` instead.
    """
    log_probs = masked_position_log_probs(logits, mask_token_id)
    carry_over = torch.full_like(log_probs, NEG_INFINITY).scatter_(-1, x_t.unsqueeze(-1), 0.0)
    unmasked = (x_t != mask_token_id).unsqueeze(-1)
    return torch.where(unmasked, carry_over, log_probs)


def token_nll_from_logits(
    logits: torch.Tensor, x_0: torch.Tensor, mask_token_id: int
) -> torch.Tensor:
    """``-log p_theta(x_0)`` ``[b, L]`` under zero-masking: cross-entropy of ``logits [b, L, V]``
    with the [MASK] logit at -1e6, i.e. the SUBS value at masked positions.

    Computed as ``logsumexp over non-mask entries - logit[x_0]`` from two slices of ``logits``
    (views), without writing a modified ``[b, L, V]`` copy.
    """
    _check_mask_id(logits, mask_token_id)
    logits = _at_least_float32(logits)
    vocab = logits.shape[-1]
    parts = []
    if mask_token_id > 0:
        parts.append(torch.logsumexp(logits[..., :mask_token_id], dim=-1))
    if mask_token_id < vocab - 1:
        parts.append(torch.logsumexp(logits[..., mask_token_id + 1 :], dim=-1))
    if not parts:
        raise ValueError("the vocabulary holds only the mask token; nothing can be predicted")
    log_normalizer = torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)  # [b, L]
    target_logit = logits.gather(-1, x_0.unsqueeze(-1)).squeeze(-1)  # [b, L]
    # A target equal to [MASK] (never valid data) gets the suppressed logit, as in the reference.
    target_logit = torch.where(x_0 == mask_token_id, target_logit + NEG_INFINITY, target_logit)
    return log_normalizer - target_logit


@dataclass(frozen=True)
class NELBOOutput:
    """Block-diffusion NELBO of one micro-batch.

    ``loss``: scalar per-token NELBO ``sum(token_loss) / num_tokens``;
    ``token_loss [b, L]``: ``weight * (-log p)`` at counted masked tokens, 0 elsewhere;
    ``block_loss [b, N_b]``: ``token_loss`` averaged over each block's ``B`` tokens (the
    per-(sequence, block) values whose variance the clip search minimises);
    ``num_tokens``: ``sum(loss_mask)``, the denominator (all L tokens per row in training).
    """

    loss: torch.Tensor
    token_loss: torch.Tensor
    block_loss: torch.Tensor
    num_tokens: torch.Tensor


def nelbo_from_token_nll(
    token_nll: torch.Tensor,
    masked: torch.Tensor,
    *,
    loss_weight: torch.Tensor,
    block_size: int,
    loss_mask: torch.Tensor | None = None,
) -> NELBOOutput:
    """The NELBO from per-token ``-log p_theta(x_0)`` ``[b, L]`` (the single loss entry point).

    ``token_nll`` must equal cross-entropy of the logits with the [MASK] logit suppressed at
    masked positions; elsewhere it is ignored (may even be inf/NaN). ``masked [b, L]`` is True
    where ``x_t`` is [MASK]; ``loss_weight [b, L]`` the positive schedule weight (``1/t``
    for the linear schedule); ``loss_mask [b, L]`` selects counted tokens for both numerator and
    denominator (default all ones; evaluation drops position 0). Reference normalisation (§2.2
    item 9): divide by all counted tokens, masked or not.
    """
    if token_nll.dim() != 2:
        raise ValueError(f"token_nll must be [b, L], got shape {tuple(token_nll.shape)}")
    batch, seq_len = token_nll.shape
    validate_block_layout(seq_len, block_size)
    if masked.shape != token_nll.shape:
        raise ValueError(
            f"masked shape {tuple(masked.shape)} != token_nll shape {tuple(token_nll.shape)}"
        )
    if masked.dtype != torch.bool:
        raise ValueError(f"masked must be a bool tensor, got {masked.dtype}")
    counted = masked
    if loss_mask is None:
        num_tokens = torch.tensor(
            float(batch * seq_len), dtype=torch.float32, device=token_nll.device
        )
        weighted = loss_weight * token_nll
    else:
        if loss_mask.shape != token_nll.shape:
            raise ValueError(
                f"loss_mask shape {tuple(loss_mask.shape)} != token_nll shape "
                f"{tuple(token_nll.shape)}"
            )
        loss_mask = loss_mask.to(torch.float32)
        counted = masked & (loss_mask != 0)
        num_tokens = loss_mask.sum()
        weighted = loss_weight * token_nll * loss_mask
    token_loss = torch.where(counted, weighted, torch.zeros_like(weighted))  # [b, L]
    block_loss = token_loss.view(batch, seq_len // block_size, block_size).mean(-1)  # [b, N_b]
    loss = token_loss.sum() / num_tokens
    return NELBOOutput(loss, token_loss, block_loss, num_tokens)


def nelbo_loss(
    logits: torch.Tensor,
    x_0: torch.Tensor,
    x_t: torch.Tensor,
    *,
    loss_weight: torch.Tensor,
    mask_token_id: int,
    block_size: int,
    loss_mask: torch.Tensor | None = None,
) -> NELBOOutput:
    """NELBO from full ``logits [b, L, V]`` of the noisy half: SUBS token NLL, then
    :func:`nelbo_from_token_nll`. Masked positions are where ``x_t == mask_token_id``."""
    if logits.shape[:-1] != x_0.shape or x_t.shape != x_0.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, x_0 {tuple(x_0.shape)} and x_t {tuple(x_t.shape)} "
            "must agree on [b, L]"
        )
    token_nll = token_nll_from_logits(logits, x_0, mask_token_id)
    return nelbo_from_token_nll(
        token_nll,
        x_t == mask_token_id,
        loss_weight=loss_weight,
        block_size=block_size,
        loss_mask=loss_mask,
    )
