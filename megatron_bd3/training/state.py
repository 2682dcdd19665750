"""The small pieces of a run's state that a checkpoint carries, each with state_dict().

The checkpoint manager receives them (with the EMA and the data loader, which have their own
state_dict) as one mapping and stores {name: state_dict()} per rank; see
megatron_bd3.checkpoint.manager.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_bd3.checkpoint.rng import capture_rng_state, restore_rng_state, step_seed
from megatron_bd3.diffusion import ClipRange
from megatron_bd3.parallel import seed_all_rngs


@dataclass
class TrainerState:
    """Where the run is: optimizer steps taken and the last validation result."""

    layout_rule = "replicated"  # the same on every rank (checkpoint.reshard)

    step: int = 0
    global_batch_size: int = 0
    last_validation: dict[str, Any] = field(default_factory=dict)

    @property
    def consumed_samples(self) -> int:
        return self.step * self.global_batch_size

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "last_validation": dict(self.last_validation),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.last_validation = dict(state.get("last_validation", {}))


class ClipRangeState:
    """The clip range [beta, omega] that training draws t from (moved by the clip search)."""

    layout_rule = "replicated"

    def __init__(self, clip_range: ClipRange) -> None:
        self.value = clip_range

    def state_dict(self) -> dict[str, Any]:
        return {"eps_min": self.value.eps_min, "eps_max": self.value.eps_max}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = ClipRange(float(state["eps_min"]), float(state["eps_max"]))


class RNGState:
    """Every RNG of this rank (megatron_bd3.checkpoint.rng).

    Loading does not restore at once: `restore()` puts the states back right before the first
    step of a resumed run, so nothing that runs in between (building metrics, data workers) can
    draw from them.

    The streams are per rank (TP ranks differ in the tracker, PP stages in every seed), so they
    cannot follow a layout change: an elastic resume re-derives them instead (`rederive`), by
    seeding every generator as a run start does, from this rank's seed (training.seed + 100 x
    pipeline stage) mixed with the step. Deterministic, but not the streams the uninterrupted run
    would have continued; the diffusion noise and the data order do not draw from them (they are
    keyed by seed, step and position).
    """

    layout_rule = "per_rank"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed  # this rank's start-up seed (ParallelInfo.seed)
        self._pending: dict[str, Any] | None = None
        self._rederive_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def rederive(self, step: int) -> None:
        self._rederive_step = step

    def restore(self) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending)
            self._pending = None
        if self._rederive_step is not None:
            seed_all_rngs(step_seed(self.seed, self._rederive_step))
            self._rederive_step = None
