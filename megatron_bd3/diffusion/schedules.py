"""Noise schedules and clip ranges (docs/method.md §2.1-§2.4).

A schedule maps diffusion time ``t in [0, 1]`` to the keep probability ``alpha_t``. Everything
the trainer needs follows from it:

* ``move_prob(t) = 1 - alpha_t``: probability that a token is replaced by [MASK];
* ``loss_weight(t) = -alpha'_t / (1 - alpha_t)``: the positive weight multiplying
  ``-log p_theta(x_0)`` at masked positions in the continuous-time NELBO.

The reference returns ``(loss_scale, move_chance)`` with ``loss_scale = -loss_weight``; here the
weight is positive and the sign lives in the ``-log p`` it multiplies.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

__all__ = [
    "ELBO_EPS_MIN",
    "ClipRange",
    "CosineSchedule",
    "DEFAULT_CLIP_RANGE",
    "LinearSchedule",
    "LogSchedule",
    "MDLMLogLinearSchedule",
    "NoiseSchedule",
    "PowerSchedule",
    "clip_search_grid",
    "get_noise_schedule",
    "loss_weight_with_clipping",
]

# Lower end of the unclipped ELBO interval [1e-3, 1]; the resampling rule (§2.2 item 4) treats a
# lower bound equal to this value as "not enforced".
ELBO_EPS_MIN = 1e-3


def _as_float_tensor(t) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


class NoiseSchedule(abc.ABC):
    """``alpha_t`` schedule of the absorbing-state forward process.

    Subclasses give ``move_prob`` (= ``1 - alpha_t``) and ``move_prob_rate`` (= its time derivative
    ``-alpha'_t``); ``loss_weight`` is their ratio. Subclasses override ``loss_weight`` where a
    closed form is exact in floating point (e.g. ``1/t`` for the linear schedule).
    """

    name: str = ""

    @abc.abstractmethod
    def move_prob(self, t: torch.Tensor) -> torch.Tensor:
        """Masking probability ``1 - alpha_t``."""

    @abc.abstractmethod
    def move_prob_rate(self, t: torch.Tensor) -> torch.Tensor:
        """``d/dt (1 - alpha_t) = -alpha'_t`` (non-negative)."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Keep probability ``alpha_t``."""
        return 1.0 - self.move_prob(t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """NELBO weight ``-alpha'_t / (1 - alpha_t)`` (positive)."""
        t = _as_float_tensor(t)
        return self.move_prob_rate(t) / self.move_prob(t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class LinearSchedule(NoiseSchedule):
    """``alpha_t = 1 - t``: mask rate exactly ``t``, weight ``1/t``.

    The reference calls this "loglinear" (``LogLinearNoise``); BD3-LM drops MDLM's ``(1 - eps)``
    factor, so ``move_prob`` is ``t`` bit for bit.
    """

    name = "linear"

    def move_prob(self, t):
        return _as_float_tensor(t)

    def move_prob_rate(self, t):
        return torch.ones_like(_as_float_tensor(t))

    def loss_weight(self, t):
        return 1.0 / _as_float_tensor(t)


class PowerSchedule(NoiseSchedule):
    """``alpha_t = 1 - t**p``: weight ``p/t``. ``p = 2`` is "square", ``p = 0.5`` "square_root".

    The reference (``ExpNoise``) additionally clamps the mask rate at ``eps = 1e-3`` from below
    while keeping the unclamped derivative; that only matters for ``t**p < 1e-3`` and is not
    derived from any ``alpha_t``, so it is not reproduced.
    """

    def __init__(self, exponent: float, name: str):
        if exponent <= 0:
            raise ValueError(f"PowerSchedule exponent must be > 0, got {exponent}")
        self.exponent = float(exponent)
        self.name = name

    def move_prob(self, t):
        return torch.pow(_as_float_tensor(t), self.exponent)

    def move_prob_rate(self, t):
        t = _as_float_tensor(t)
        return self.exponent * torch.pow(t, self.exponent - 1.0)

    def loss_weight(self, t):
        return self.exponent / _as_float_tensor(t)


class CosineSchedule(NoiseSchedule):
    """``alpha_t = (1 - eps) cos(pi t / 2)``.

    The reference (``CosineNoise``) divides by ``move_prob + eps`` instead of ``move_prob``; the
    exact derivative ratio is used here (they differ by a relative ``eps / move_prob``).
    """

    name = "cosine"

    def __init__(self, eps: float = 1e-3):
        self.eps = float(eps)

    def move_prob(self, t):
        t = _as_float_tensor(t)
        return 1.0 - (1.0 - self.eps) * torch.cos(t * (math.pi / 2))

    def move_prob_rate(self, t):
        t = _as_float_tensor(t)
        return (1.0 - self.eps) * (math.pi / 2) * torch.sin(t * (math.pi / 2))


class LogSchedule(NoiseSchedule):
    """``alpha_t = 1 - log2(1 + t)``: weight ``1 / ((1 + t) log(1 + t))`` (reference ``log``)."""

    name = "log"

    def move_prob(self, t):
        return torch.log1p(_as_float_tensor(t)) / math.log(2.0)

    def move_prob_rate(self, t):
        return 1.0 / ((1.0 + _as_float_tensor(t)) * math.log(2.0))

    def loss_weight(self, t):
        t = _as_float_tensor(t)
        return 1.0 / ((1.0 + t) * torch.log1p(t))


class MDLMLogLinearSchedule(NoiseSchedule):
    """MDLM's loss scale (reference ``algo.mdlm_loss_scale=True``), for Sahoo et al. baselines.

    ``sigma = -log(1 - (1 - eps) t)``, ``move_prob = 1 - exp(-sigma)`` (= ``(1 - eps) t``),
    ``loss_weight = sigma' / expm1(sigma)`` (= ``1/t``), evaluated through ``sigma`` exactly as the
    reference does so its float rounding is reproduced.
    """

    name = "mdlm_loglinear"

    def __init__(self, eps: float = 1e-3):
        self.eps = float(eps)

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        """``sigma(t) = -log(1 - (1 - eps) t)``."""
        return -torch.log1p(-(1.0 - self.eps) * _as_float_tensor(t))

    def rate_noise(self, t: torch.Tensor) -> torch.Tensor:
        """``sigma'(t) = (1 - eps) / (1 - (1 - eps) t)``."""
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * _as_float_tensor(t))

    def move_prob(self, t):
        return 1.0 - torch.exp(-self.total_noise(t))

    def move_prob_rate(self, t):
        return torch.full_like(_as_float_tensor(t), 1.0 - self.eps)

    def loss_weight(self, t):
        return self.rate_noise(t) / torch.expm1(self.total_noise(t))


_SCHEDULES = {
    "linear": LinearSchedule,
    "loglinear": LinearSchedule,
    "cosine": CosineSchedule,
    "square": lambda: PowerSchedule(2.0, "square"),
    "square_root": lambda: PowerSchedule(0.5, "square_root"),
    "log": LogSchedule,
    "mdlm_loglinear": MDLMLogLinearSchedule,
}


def get_noise_schedule(name: str, *, mdlm_loss_scale: bool = False) -> NoiseSchedule:
    """Build a schedule by name (reference ``noise.type`` names plus ``linear``).

    ``mdlm_loss_scale=True`` (reference ``algo.mdlm_loss_scale``) is only valid with
    ``linear``/``loglinear`` and returns :class:`MDLMLogLinearSchedule`.
    """
    if name not in _SCHEDULES:
        valid = ", ".join(sorted(_SCHEDULES))
        raise ValueError(f"unknown noise schedule {name!r}; valid names: {valid}")
    if mdlm_loss_scale:
        if name not in ("linear", "loglinear", "mdlm_loglinear"):
            raise ValueError(
                f"mdlm_loss_scale=True needs noise schedule 'linear' or 'loglinear', got {name!r}"
            )
        return MDLMLogLinearSchedule()
    return _SCHEDULES[name]()


@dataclass(frozen=True)
class ClipRange:
    """Clip range ``[eps_min, eps_max]`` of the sampled time (reference ``sampling_eps_min/max``).

    ``t`` is drawn in this range (docs/method.md §2.2 item 2); with the linear schedule it is the mask
    rate. The default ``(1e-3, 1)`` is the unclipped ELBO.
    """

    eps_min: float = ELBO_EPS_MIN
    eps_max: float = 1.0

    def __post_init__(self):
        lo, hi = self.eps_min, self.eps_max
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float))):
            raise ValueError(f"ClipRange bounds must be numbers, got ({lo!r}, {hi!r})")
        if not (0.0 <= lo < hi <= 1.0):
            raise ValueError(
                f"ClipRange needs 0 <= eps_min < eps_max <= 1, got eps_min={lo}, eps_max={hi}"
            )
        object.__setattr__(self, "eps_min", float(lo))
        object.__setattr__(self, "eps_max", float(hi))

    @property
    def is_elbo(self) -> bool:
        """True for the unclipped interval ``(1e-3, 1)``, whose loss is an unbiased NELBO."""
        return _same(self.eps_min, ELBO_EPS_MIN) and _same(self.eps_max, 1.0)


DEFAULT_CLIP_RANGE = ClipRange()


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=0.0, abs_tol=1e-12)


def loss_weight_with_clipping(
    schedule: NoiseSchedule, t: torch.Tensor, t_lower_bound: float
) -> torch.Tensor:
    """Per-token weight used by the trainer: the schedule's weight, or 1 (plain CE) when the
    lower bound of ``t`` exceeds 0.5.

    Reference rule (docs/method.md §2.2 item 8): with ``sampling_eps_min > 0.5`` the loss scale is
    replaced by ones; only reachable for B=1 full masking (``t`` fixed at 1), where it makes the
    loss the exact AR cross-entropy.
    """
    if t_lower_bound > 0.5:
        return torch.ones_like(_as_float_tensor(t))
    return schedule.loss_weight(t)


def clip_search_grid(
    widths: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9), delta: float = 0.05
) -> list[ClipRange]:
    """Candidate clip ranges of the data-driven search (docs/method.md §2.4).

    First the ELBO interval ``(1e-3, 1)``, then for each width ``w`` and each start
    ``s in {0, delta, 2 delta, ..., 1 - w}``: ``(max(s, 1e-3), s + w)``. Starts are computed as
    ``k * delta`` rounded to 10 decimals (no accumulation), so ``1 - w`` is hit exactly. The
    default grid has ``1 + 11 + 9 + 7 + 5 + 3 = 36`` entries (the reference's float32
    ``torch.arange`` gives the same 36 with float32-rounded values like 0.05000000074505806).
    """
    if not delta > 0:
        raise ValueError(f"clip search delta must be > 0, got {delta}")
    grid = [ClipRange(ELBO_EPS_MIN, 1.0)]
    seen = {(grid[0].eps_min, grid[0].eps_max)}
    for width in widths:
        if not 0.0 < width <= 1.0:
            raise ValueError(f"clip search width must be in (0, 1], got {width}")
        num_starts = math.floor(round((1.0 - width) / delta, 9)) + 1
        for k in range(num_starts):
            start = round(k * delta, 10)
            bounds = (max(start, ELBO_EPS_MIN), round(start + width, 10))
            if bounds not in seen:
                seen.add(bounds)
                grid.append(ClipRange(*bounds))
    return grid
