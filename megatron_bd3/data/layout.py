"""Which samples go into which global batch, micro-batch and rank: pure index arithmetic.

Epoch e visits the split in the order of a permutation drawn from (seed, e) alone (identity when
shuffle is off): samples sorted by splitmix64(i + key(seed, e)). splitmix64 is a bijection of
64-bit integers, so the keys are distinct and the order is fully specified by this file — unlike
numpy's Generator streams, it cannot change with a numpy upgrade in the middle of a run, which
would break exact resume. Global batch k of the epoch is the slice order[k*G : (k+1)*G], G =
micro_batch_size x num_microbatches x dp_size; position p in 0..G-1 of a sample inside its global
batch is its offset in that slice. Positions are handed out like megatron's pretraining sampler:
micro-batch m of rank r holds positions (m*dp_size + r)*micro_batch_size + 0..micro_batch_size-1.
So a global batch (its samples and their positions) depends only on (seed, epoch, k, G): the
same for dp_size 1, 2 or 4 at equal G — the trainer derives layout-invariant noise from it.

Remainder (N not a multiple of G), identical on every rank so step counts stay equal under DDP:
  "drop" (default): steps_per_epoch = N // G; the last N mod G samples of each epoch's permutation
          are not visited that epoch (a different set every epoch when shuffled). Counted.
  "wrap": steps_per_epoch = ceil(N / G); the last global batch is filled by continuing from the
          start of the same epoch's permutation, so G*steps - N samples are visited twice. Counted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

REMAINDER_POLICIES = ("drop", "wrap")
_MASK64 = (1 << 64) - 1


def epoch_key(seed: int, epoch: int) -> int:
    """A 64-bit key per (seed, epoch)."""
    payload = int(seed).to_bytes(8, "little") + int(epoch).to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser over uint64 (wrapping arithmetic), a bijection of 64-bit ints."""
    z = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z


def permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of epoch `epoch`: indices sorted by splitmix64(index + key)."""
    indices = np.arange(num_samples, dtype=np.uint64)
    with np.errstate(over="ignore"):
        keys = splitmix64(indices + np.uint64(epoch_key(seed, epoch)))
    return np.argsort(keys).astype(np.int64)  # keys are distinct: any sort gives one order


@dataclass(frozen=True)
class BatchLayout:
    num_samples: int
    micro_batch_size: int
    num_microbatches: int
    dp_size: int
    seed: int
    shuffle: bool = True
    remainder: str = "drop"

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "num_microbatches", "dp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")
        if self.seed < 0:
            raise ValueError(f"seed {self.seed} must be >= 0")
        if self.remainder not in REMAINDER_POLICIES:
            raise ValueError(
                f"remainder {self.remainder!r} is not one of {', '.join(REMAINDER_POLICIES)}"
            )
        if self.num_samples < 1:
            raise ValueError("the split holds no samples")
        if self.remainder == "drop" and self.num_samples < self.global_batch_size:
            raise ValueError(
                f"the split holds {self.num_samples} samples, fewer than one global batch of "
                f"{self.global_batch_size} (micro_batch_size {self.micro_batch_size} x "
                f"num_microbatches {self.num_microbatches} x dp_size {self.dp_size}); use a "
                f"smaller batch, more data, or remainder='wrap'"
            )

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.dp_size

    @property
    def steps_per_epoch(self) -> int:
        """Global batches (optimizer steps) per epoch."""
        if self.remainder == "drop":
            return self.num_samples // self.global_batch_size
        return -(-self.num_samples // self.global_batch_size)

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches each rank yields per epoch."""
        return self.steps_per_epoch * self.num_microbatches

    @property
    def samples_dropped_per_epoch(self) -> int:
        return max(0, self.num_samples - self.steps_per_epoch * self.global_batch_size)

    @property
    def samples_repeated_per_epoch(self) -> int:
        return max(0, self.steps_per_epoch * self.global_batch_size - self.num_samples)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample indices of epoch `epoch` in visiting order, length steps_per_epoch * G."""
        if self.shuffle:
            order = permutation(self.num_samples, self.seed, epoch)
        else:
            order = np.arange(self.num_samples, dtype=np.int64)
        visited = self.steps_per_epoch * self.global_batch_size
        if visited <= self.num_samples:
            return order[:visited]
        return np.resize(order, visited)  # "wrap": continue from the start of this epoch's order

    def positions(self, dp_rank: int, microbatch: int) -> np.ndarray:
        """Positions in the global batch of rank `dp_rank`'s micro-batch `microbatch`, [mb]."""
        first = (microbatch * self.dp_size + dp_rank) * self.micro_batch_size
        return np.arange(first, first + self.micro_batch_size, dtype=np.int64)

    def locate(self, micro_step: int) -> tuple[int, int, int]:
        """(epoch, global batch in the epoch, micro-batch in the global batch) of a rank's
        `micro_step`-th micro-batch since the start of training."""
        epoch, within = divmod(micro_step, self.micro_batches_per_epoch)
        step, microbatch = divmod(within, self.num_microbatches)
        return epoch, step, microbatch
