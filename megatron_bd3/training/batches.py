"""Turn loader micro-batches into model batches: the forward process applied by the trainer.

The noise is keyed by (seed, step, global_batch_position): a sample gets the same t and the
same masks whatever the data-parallel size, micro-batch size or TP/PP layout, and every TP/PP
peer of a data-parallel rank computes identical x_t (megatron_bd3.diffusion.noise_batch). The
batch also carries the DropoutKey under which `dropout_rng: keyed` draws its masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_bd3.diffusion import ClipRange, noise_batch
from megatron_bd3.model.keyed_dropout import DropoutKey


@dataclass(frozen=True)
class NoiseSettings:
    """Everything besides the data that decides x_t (fixed for a run, except the clip range)."""

    block_size: int
    mask_token_id: int
    schedule: str
    ignore_bos: bool
    resample: bool
    antithetic: bool
    fixed_t: float | None

    @classmethod
    def from_model_config(cls, config) -> NoiseSettings:
        """The forward-process settings a BD3Config carries (built by
        megatron_bd3.training.model_config.build_model_config)."""
        return cls(
            block_size=config.block_size,
            mask_token_id=config.mask_token_id,
            schedule=config.noise_schedule,
            ignore_bos=config.ignore_bos,
            resample=config.resample,
            antithetic=config.antithetic_sampling,
            fixed_t=config.fixed_t,
        )


def make_batch(
    loader_batch: dict[str, torch.Tensor],
    *,
    settings: NoiseSettings,
    clip_range: ClipRange,
    seed: int,
    step: int,
    global_batch_size: int,
    resample: bool | None = None,
) -> dict[str, Any]:
    """{"tokens" [b, L], "global_batch_position" [b], ...} -> the model's batch dict.

    The loader's per-token "document_ids" [b, L] (data.document_mask) pass through unchanged:
    the noise does not depend on them (docs/method.md §1.4)."""
    x_0 = loader_batch["tokens"].long()  # [b, L]
    noised = noise_batch(
        x_0,
        loader_batch["global_batch_position"],
        global_batch_size,
        seed,
        step,
        settings.block_size,
        settings.mask_token_id,
        schedule=settings.schedule,
        clip_range=clip_range,
        ignore_bos=settings.ignore_bos,
        resample=settings.resample if resample is None else resample,
        antithetic=settings.antithetic,
        fixed_t=settings.fixed_t,
    )
    batch = {
        "x_0": x_0,
        "x_t": noised.x_t,
        "masked": noised.masked,
        "loss_weight": noised.loss_weight,
        # the dropout masks are keyed like the noise (model/keyed_dropout.py)
        "dropout_key": DropoutKey(seed, step, loader_batch["global_batch_position"]),
    }
    if "document_ids" in loader_batch:
        batch["document_ids"] = loader_batch["document_ids"]  # [b, L]
    return batch
