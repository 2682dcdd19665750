"""Data-driven clip-range search (docs/method.md §2.4, reference `_clipped_schedule_search`).

For every candidate interval [beta, omega] the validation loop stores, for each of the first N
validation batches, the per-(sequence, block) losses (token losses averaged within each block,
shape [b, N_b]). Then, per candidate: for each batch, gather the entries of all data-parallel ranks
and take the unbiased variance over all (sequence, block) entries; sum over batches and divide by
the number of batches. The candidate with the smallest value becomes the training clip range
(unless the config fixes the range).

The gather is done with sufficient statistics (count, sum, sum of squares, in float64) reduced
over the data-parallel group, which gives the same variance as gathering the values themselves.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_bd3.parallel.runtime import all_reduce_host


@dataclass
class ClipSearchAccumulator:
    """Collects per-(sequence, block) losses per candidate and batch on one rank."""

    candidates: Sequence[Hashable]
    # candidate index -> list over batches of [count, sum, sum of squares] (float64)
    _stats: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, candidate_index: int, block_loss: torch.Tensor) -> None:
        """Record one batch's [b, N_b] block losses for candidate `candidate_index`.

        Ranks that hold no losses for this batch (not the last pipeline stage, or a TP peer
        whose copy is already counted) add an empty tensor, which contributes nothing to the
        all-reduced statistics.
        """
        values = block_loss.detach().to(torch.float64).reshape(-1).cpu()
        stats = torch.stack(
            [
                torch.tensor(float(values.numel()), dtype=torch.float64),
                values.sum(),
                (values * values).sum(),
            ]
        )
        self._stats.setdefault(candidate_index, []).append(stats)

    @property
    def num_batches(self) -> int:
        return max((len(v) for v in self._stats.values()), default=0)

    def variances(self, group: dist.ProcessGroup | None = None) -> list[float]:
        """Mean over batches of the unbiased variance of all gathered entries, per candidate."""
        counts = {len(v) for v in self._stats.values()}
        if len(self._stats) != len(self.candidates) or len(counts) != 1:
            raise ValueError(
                f"clip search needs the same number of batches for every candidate; got "
                f"{ {i: len(v) for i, v in self._stats.items()} } for "
                f"{len(self.candidates)} candidates"
            )
        # [num_candidates, num_batches, 3]
        table = torch.stack([torch.stack(self._stats[i]) for i in range(len(self.candidates))])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            all_reduce_host(table, dist.ReduceOp.SUM, group)
        n, s1, s2 = table.unbind(-1)
        if bool((n < 2).any()):
            raise ValueError("clip search needs at least 2 (sequence, block) entries per batch")
        var = (s2 - s1 * s1 / n) / (n - 1)  # unbiased, per candidate and batch
        return (var.sum(dim=1) / var.shape[1]).tolist()


def select_clip_range(candidates: Sequence[Hashable], variances: Sequence[float]):
    """The candidate with the smallest variance (the first one on ties, as a strict `<` scan)."""
    if len(candidates) != len(variances) or not candidates:
        raise ValueError(f"{len(candidates)} candidates but {len(variances)} variances")
    best = min(range(len(candidates)), key=lambda i: (variances[i], i))
    return candidates[best]
