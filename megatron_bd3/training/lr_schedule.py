"""Learning-rate schedule as a pure function of the step.

docs/method.md §4.3: linear warm-up from 0 over `warmup_steps` (2 500), then constant
(`transformers.get_constant_schedule_with_warmup`). A cosine decay to `min_lr` is the optional
alternative. Being a pure function of the step, the schedule needs no state in a checkpoint:
resuming at step s gives exactly lr(s).
"""

from __future__ import annotations

import math


def learning_rate(
    step: int,
    *,
    peak_lr: float,
    warmup_steps: int,
    decay: str = "constant",
    decay_steps: int | None = None,
    min_lr: float = 0.0,
) -> float:
    """LR used for the optimizer update number `step` (0-based).

    Warm-up matches the reference: lr(step) = peak * step / warmup for step < warmup (so the
    very first update uses lr 0, as `LambdaLR(step / warmup)` does), then peak (constant) or a
    cosine from peak to `min_lr` over `decay_steps` updates, staying at `min_lr` after that.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * step / warmup_steps
    if decay == "constant":
        return peak_lr
    if decay == "cosine":
        if decay_steps is None or decay_steps <= 0:
            raise ValueError(f"cosine decay needs decay_steps > 0, got {decay_steps}")
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown LR decay {decay!r}; expected 'constant' or 'cosine'")


def lr_from_config(step: int, optimizer_config, schedule_config, train_iters: int) -> float:
    """`learning_rate` with the values of a RunConfig's optimizer and schedule sections."""
    decay_steps = schedule_config.decay_steps
    if decay_steps is None:
        decay_steps = max(1, train_iters - schedule_config.warmup_steps)
    return learning_rate(
        step,
        peak_lr=optimizer_config.lr,
        warmup_steps=schedule_config.warmup_steps,
        decay=schedule_config.decay,
        decay_steps=decay_steps,
        min_lr=schedule_config.min_lr,
    )
