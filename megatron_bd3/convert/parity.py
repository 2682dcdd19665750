"""Numerical parity checks run after every conversion (torch only).

A conversion is accepted when the converted model's two-stream training logits on a random noisy
batch match the original model's: ``max |converted - original| <= tolerance * max(1, max
|original|)``. The default tolerance 1e-4 covers fp32 kernels that sum in different orders
(megatron's layers vs the standalone network); pure re-layouts of the same fp32 tensors give 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_TOLERANCE", "ParityError", "ParityReport", "compare_logits",
           "random_noisy_batch"]

DEFAULT_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """The converted model computes different logits than the original."""


@dataclass(frozen=True)
class ParityReport:
    """What the parity check measured."""

    what: str
    max_abs_diff: float
    logit_scale: float  # max |original logit|
    tolerance: float  # relative: the bound is tolerance * max(1, logit_scale)

    @property
    def bound(self) -> float:
        return self.tolerance * max(1.0, self.logit_scale)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.bound

    def describe(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"parity {self.what}: max abs diff {self.max_abs_diff:.3e} (logit scale "
                f"{self.logit_scale:.3e}, bound {self.bound:.3e} = {self.tolerance:g} x "
                f"max(1, scale)) {verdict}")


def random_noisy_batch(
    vocab_size: int,
    mask_token_id: int,
    seq_length: int,
    block_size: int,
    batch_size: int = 2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, x_0), both ``[batch, seq_length]``: x_0 uniform over the non-[MASK] tokens, x_t with
    each block masked at its own rate t ~ U(0, 1) (every rate from nearly clean to fully masked
    appears, so both the carry-over and the masked positions are exercised)."""
    generator = torch.Generator().manual_seed(seed)
    x_0 = torch.randint(0, vocab_size - 1, (batch_size, seq_length), generator=generator)
    x_0 = x_0 + (x_0 >= mask_token_id).long()  # skip the [MASK] id
    num_blocks = seq_length // block_size
    rates = torch.rand(batch_size, num_blocks, generator=generator)
    rates = rates.repeat_interleave(block_size, dim=1)  # [b, L]
    masked = torch.rand(batch_size, seq_length, generator=generator) < rates
    x_t = torch.where(masked, torch.full_like(x_0, mask_token_id), x_0)
    return x_t, x_0


def compare_logits(
    original: torch.Tensor,
    converted: torch.Tensor,
    what: str,
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Compare two ``[b, L, V]`` logit tensors; raise ParityError (with the numbers) on failure."""
    if tuple(original.shape) != tuple(converted.shape):
        raise ParityError(f"parity {what}: logits have shape {list(converted.shape)}, the "
                          f"original {list(original.shape)}")
    original = original.detach().double().cpu()
    converted = converted.detach().double().cpu()
    if not torch.isfinite(converted).all():
        raise ParityError(f"parity {what}: the converted model produced non-finite logits")
    report = ParityReport(
        what=what,
        max_abs_diff=float((original - converted).abs().max()),
        logit_scale=float(original.abs().max()),
        tolerance=tolerance,
    )
    if raise_on_failure and not report.ok:
        raise ParityError(report.describe())
    return report
