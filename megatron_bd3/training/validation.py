"""Validation (NELBO perplexity, docs/method.md §6.1) and the clip-range search (§2.4), with EMA weights.

Per validation batch: one Monte-Carlo t per (sequence, block), stratified over the batch, on the
ELBO interval (1e-3, 1), no resampling; per-token loss -(1/t) log p at masked positions. Position 0
is excluded from masking and from the token count when ignore_bos. NLL = sum of losses / counted
tokens over the whole set (token-weighted, summed over data-parallel ranks); PPL = exp(NLL).

Clip search (unless the range is fixed): for the first `num_batches` validation batches, every
candidate of `clip_search_grid()` is evaluated on the same batch with the same random numbers
(common random numbers: only the clip range differs), with resampling as in training, and the
per-(sequence, block) losses go to `ClipSearchAccumulator`. The ELBO candidate reuses the NELBO
pass. The candidate with the least variance becomes the training clip range.
"""

from __future__ import annotations

import contextlib
import math
import time
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from megatron_bd3.diffusion import ClipRange, clip_search_grid
from megatron_bd3.model.context_parallel import current_layout
from megatron_bd3.parallel.runtime import all_reduce_host
from megatron_bd3.training.batches import NoiseSettings, make_batch
from megatron_bd3.training.clip_search import ClipSearchAccumulator, select_clip_range
from megatron_bd3.training.step import eval_step

ELBO = ClipRange(1e-3, 1.0)


def eval_loss(count_mask: torch.Tensor, block_size: int, output_tensor: torch.Tensor):
    """loss_func for forward-only passes: the sum and count of the counted token losses, the
    [b, N_b] block means of the token losses (the clip search's values) and the per-sequence sums
    and counts (the evaluation's values)."""
    token_loss = output_tensor.float()  # [b, L], 0 at unmasked positions
    counted = token_loss * count_mask  # [b, L]
    total = counted.sum()
    count = count_mask.sum()
    b, seq_len = token_loss.shape
    block_loss = token_loss.reshape(b, seq_len // block_size, block_size).mean(dim=-1)
    report = {
        "sum_count": torch.stack([total.detach(), count.detach()]),
        "block_loss": block_loss.detach(),
        "sequence_loss": counted.sum(dim=-1).detach(),  # [b]
        "sequence_tokens": count_mask.sum(dim=-1).detach(),  # [b]
    }
    return total, count.to(torch.int), report


def count_mask_for(x_0: torch.Tensor, ignore_bos: bool) -> torch.Tensor:
    """The tokens an evaluation counts [b, L]: all, but position 0 with ignore_bos (§6.1)."""
    count_mask = torch.ones_like(x_0, dtype=torch.float32)
    if ignore_bos:
        count_mask[:, 0] = 0.0
    return count_mask


def eval_forward_step(ignore_bos: bool, block_size: int, data_iterator, model):
    """forward_step of forward-only passes; a batch may carry its own "count_mask" [b, L]."""
    from megatron_bd3.model import BD3LossInputs

    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    loss_inputs = BD3LossInputs(masked=batch["masked"], loss_weight=batch["loss_weight"])
    output = model(batch["x_t"], batch["x_0"], loss_inputs,
                   document_ids=batch.get("document_ids"))
    count_mask = batch.get("count_mask")
    if count_mask is None:
        count_mask = count_mask_for(batch["x_0"], ignore_bos)
    layout = current_layout(count_mask.size(1), block_size)
    if layout is not None:  # context parallelism: the output holds this rank's positions
        count_mask = layout.local(count_mask)
    return output, partial(eval_loss, count_mask, block_size)


def _reports(models, microbatches, *, ignore_bos, block_size, stream_length, micro_batch_size):
    return eval_step(
        models,
        partial(eval_forward_step, ignore_bos, block_size),
        microbatches,
        seq_length=stream_length,
        micro_batch_size=micro_batch_size,
    )


def run_validation(
    *,
    models: list,
    loader,
    settings: NoiseSettings,
    seed: int,
    num_batches: int | None,
    stream_length: int,
    clip_search: bool,
    clip_widths: list[float],
    clip_delta: float,
    clip_num_batches: int,
    contributes: bool,
) -> dict[str, Any]:
    """One validation pass. Returns {"nll", "ppl", "tokens", "batches"} and, with the clip search,
    {"clip_range": ClipRange, "clip_variances": {(beta, omega): var}}.

    `contributes` is True on ranks whose reports count (last pipeline stage, TP rank 0); sums
    are all-reduced over the world so every rank returns the same numbers.
    """
    loader.reset(epoch=0)  # the same (seed-shuffled) batches at every validation
    total = torch.zeros(2, dtype=torch.float64)
    candidates = clip_search_grid(tuple(clip_widths), clip_delta) if clip_search else []
    accumulator = ClipSearchAccumulator(candidates) if clip_search else None
    batches = 0
    global_batch = loader.global_batch_size
    per_batch = loader.layout.num_microbatches  # micro-batches of one global batch per rank
    iterator = iter(loader)

    def noised(group, index, clip_range, resample=None):
        return [
            make_batch(mb, settings=settings, clip_range=clip_range, seed=seed, step=index,
                       global_batch_size=global_batch, resample=resample)
            for mb in group
        ]

    def block_losses(reports):
        return torch.cat([r["block_loss"] for r in reports]) if reports else None

    index = 0
    while num_batches is None or index < num_batches:
        group = []
        for _ in range(per_batch):
            try:
                group.append(next(iterator))
            except StopIteration:
                break
        if len(group) < per_batch:
            break
        common = dict(
            ignore_bos=settings.ignore_bos,
            block_size=settings.block_size,
            stream_length=stream_length,
            micro_batch_size=group[0]["tokens"].shape[0],
        )
        reports = _reports(models, noised(group, index, ELBO, resample=False), **common)
        if contributes:
            for report in reports:
                total += report["sum_count"].double().cpu()
        if accumulator is not None and index < clip_num_batches:
            for c, candidate in enumerate(candidates):
                if c == 0 and candidate == ELBO:
                    block = block_losses(reports)
                else:
                    block = block_losses(
                        _reports(models, noised(group, index, candidate), **common)
                    )
                accumulator.add(c, block if contributes and block is not None else torch.empty(0))
        batches += 1
        index += 1
    if dist.is_initialized():
        all_reduce_host(total)
    nll = float(total[0] / total[1]) if total[1] > 0 else math.nan
    out: dict[str, Any] = {
        "nll": nll,
        "ppl": math.exp(nll) if math.isfinite(nll) else math.nan,
        "tokens": int(total[1]),
        "batches": batches,
    }
    if accumulator is not None and accumulator.num_batches:
        group = dist.group.WORLD if dist.is_initialized() else None
        variances = accumulator.variances(group=group)
        out["clip_range"] = select_clip_range(candidates, variances)
        out["clip_variances"] = {
            (c.eps_min, c.eps_max): v for c, v in zip(candidates, variances, strict=True)
        }
    return out


class Validator:
    """Validation as a trainer component: when it runs, with which weights, what it reports.

    Built from the run config; `run` evaluates the stepper's models (EMA weights swapped in when
    `validation.use_ema`) and returns run_validation's result plus the wall time. The clip search
    runs only for a BD3 model whose time range may move (not fixed, no fixed t).
    """

    def __init__(self, run_config, settings: NoiseSettings, stream_length: int, loader,
                 *, reports_loss: bool) -> None:
        self.config = run_config.validation
        self.settings = settings
        self.stream_length = stream_length
        self.loader = loader
        self.reports_loss = reports_loss
        self.clip_search = (
            self.config.clip_search.enabled
            and not run_config.training.fix_clipping
            and settings.fixed_t is None
            and run_config.model.preset == "bd3"
        )

    def due(self, step: int, done: bool) -> bool:
        """Periodic validation, or the final one."""
        v = self.config
        return (bool(v.interval) and step % v.interval == 0) or (done and v.at_end)

    def run(self, models: list, ema=None) -> dict[str, Any]:
        v = self.config
        use_ema = ema is not None and v.use_ema
        start = time.perf_counter()
        with ema.swap_in() if use_ema else contextlib.nullcontext():
            result = run_validation(
                models=models,
                loader=self.loader,
                settings=self.settings,
                seed=v.seed,
                num_batches=v.num_batches,
                stream_length=self.stream_length,
                clip_search=self.clip_search,
                clip_widths=v.clip_search.widths,
                clip_delta=v.clip_search.delta,
                clip_num_batches=v.clip_search.num_batches,
                contributes=self.reports_loss,
            )
        result["seconds"] = time.perf_counter() - start
        result["weights"] = "EMA" if use_ema else "raw"
        return result

    @staticmethod
    def summary(result: dict[str, Any], step: int) -> str:
        message = (
            f"validation at step {step}: nll {result['nll']:.4f} ppl {result['ppl']:.2f} over "
            f"{result['tokens']} tokens / {result['batches']} batches ({result['seconds']:.1f}s, "
            f"{result['weights']} weights)"
        )
        if "clip_range" in result:
            chosen = result["clip_range"]
            variance = result["clip_variances"][(chosen.eps_min, chosen.eps_max)]
            message += (
                f"; clip search over {len(result['clip_variances'])} ranges -> "
                f"U[{chosen.eps_min:g}, {chosen.eps_max:g}] (var {variance:.4g})"
            )
        return message
