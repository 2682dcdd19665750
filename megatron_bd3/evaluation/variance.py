"""Gradient variance of the training loss per clip range (paper eq. 10, docs/method.md §2.4).

For M minibatches X^1..X^M of G sequences and one clip range [beta, omega],

    Var = 1/(M-1) * sum_m || grad l(X^m) - mean_m grad l(X^m) ||^2

where l is the training loss of one minibatch exactly as the trainer computes it: x_t from
megatron_bd3.training.batches.make_batch with that clip range and the run's resampling, the model's
per-token NELBO summed over every token of a micro-batch and divided by b * L, averaged over the
micro-batches (megatron's schedule with calculate_per_token_loss off). This is the quantity the
clipped schedules are meant to reduce; the clip search only looks at a proxy, the variance of the
per-(sequence, block) NELBO terms, which is reported next to it (`loss_variance`).

Streaming, without storing M gradients: per parameter S = sum_m g_m, and Q = sum_m ||g_m||^2,
then Var = (Q - ||S||^2 / M) / (M - 1). S, Q and all norms are float64 whatever the parameter
dtype (the gradients themselves are in the model's parameter dtype).

Layout independence. Minibatch m is sequences [m G, (m + 1) G) of the dataset, its noise keyed
by (seed, step = m, position in the minibatch) as the likelihood keys its own; the whole minibatch
is processed by data-parallel rank m mod DP (split into micro-batches there), so each g_m is the
gradient a one-rank trainer step would see. Norms follow the trainer's rule
(training.parallelize.grad_norm_model_parallel): TP-split parameters count on every TP rank,
TP-replicated ones on TP rank 0 only, megatron's `shared` tied-embedding copies not at all,
summed over the model-parallel group; S is all-reduced over the data-parallel group before its
norm, Q summed over every rank. One process, DP, TP and PP therefore give the same numbers up to
float rounding (tests/evaluation/test_variance.py).

What this is not: the paper's Table 2 NELBO column is the perplexity of a model *trained* with
each clip range. With one checkpoint only the estimator under each range can be measured: its
mean loss, the variance of its NELBO terms and the variance of its gradient.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from megatron_bd3.diffusion import ELBO_EPS_MIN, ClipRange, check_fraction_reachable
from megatron_bd3.evaluation.data import EvalDataset
from megatron_bd3.evaluation.source import EvalInputError
from megatron_bd3.training.batches import NoiseSettings, make_batch

# Paper Table 2 (LM1B): U[0, 1] (lower bound 1e-3, where the 1/t weight is finite), then the
# best ranges it found for B = 128, 16 and 4.
PAPER_CLIP_RANGES = (
    ClipRange(ELBO_EPS_MIN, 1.0),
    ClipRange(ELBO_EPS_MIN, 0.5),
    ClipRange(0.3, 0.8),
    ClipRange(0.5, 1.0),
)


def parse_clip_range(text: str) -> ClipRange:
    """`LOW,HIGH` -> ClipRange; a lower bound below 1e-3 (0, as the paper writes U[0, x]) becomes
    1e-3, where the 1/t weight is finite and resampling does not enforce it."""
    parts = text.replace(":", ",").split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise EvalInputError(f"--clip-ranges {text!r}: expected LOW,HIGH such as 0.3,0.8") from None
    low = max(low, ELBO_EPS_MIN) if low >= 0 else low
    try:
        return ClipRange(low, high)
    except ValueError as error:
        raise EvalInputError(f"--clip-ranges {text!r}: {error}") from None


def sweep_clip_ranges(learned: ClipRange | None) -> list[ClipRange]:
    """The paper's Table 2 ranges, then the model's learned range unless it is one of them."""
    ranges = list(PAPER_CLIP_RANGES)
    if learned is not None and learned not in ranges:
        ranges.append(learned)
    return ranges


def clip_range_label(clip_range) -> str:
    low, high = (clip_range.eps_min, clip_range.eps_max) if isinstance(clip_range, ClipRange) \
        else clip_range
    return f"U[{low:g}, {high:g}]"


# ------------------------------------------------------------------ per-minibatch gradients


class MegatronGradients:
    """Minibatch gradients of megatron BD3Model chunks (any TP/PP layout) through megatron's
    schedule (forward_only=False), chunks in eval mode (no dropout), plain `.grad` tensors."""

    def __init__(self, loss_model) -> None:
        from megatron.core import parallel_state

        self.loss_model = loss_model
        self.chunks = loss_model.chunks
        self.config = loss_model.config
        self.reports_loss = loss_model.reports_loss
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.counted = [
            p for chunk in self.chunks for p in chunk.parameters()
            if p.requires_grad and not getattr(p, "shared", False)
            and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))
        ]
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.model_parallel_group = (parallel_state.get_model_parallel_group()
                                     if world > 1 else None)
        self.data_parallel_group = (parallel_state.get_data_parallel_group()
                                    if world > 1 else None)

    def clear(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad(set_to_none=True)

    def minibatch(self, microbatches: list[dict[str, Any]]) -> dict | None:
        """Zero the gradients, forward and backward every micro-batch of one minibatch; the
        gradients are left in `.grad`. Returns {"loss_sum", "tokens", "block_loss" [G, N_b]} on
        the ranks whose reports count, else None."""
        from megatron_bd3.training.parallelize import finalize_model_parallel_grads
        from megatron_bd3.training.step import forward_backward

        self.clear()
        for chunk in self.chunks:
            chunk.eval()
        reports = forward_backward(
            self.chunks,
            partial(_forward_step_with_blocks, self.config.block_size),
            microbatches,
            seq_length=self.config.stream_length,
            micro_batch_size=microbatches[0]["x_0"].shape[0],
            forward_only=False,
        )
        # what megatron DDP's finalize would add: SP layer norms over TP, tied copies over PP
        finalize_model_parallel_grads(self.chunks, self.config)
        if not self.reports_loss:
            return None
        sum_count = torch.stack([r["lm loss"].double().cpu() for r in reports]).sum(dim=0)
        return {"loss_sum": float(sum_count[0]), "tokens": float(sum_count[1]),
                "block_loss": torch.cat([r["block_loss"].double().cpu() for r in reports])}


def _forward_step_with_blocks(block_size: int, data_iterator, model):
    """The trainer's forward_step; its loss_func also reports the per-(sequence, block) means."""
    from megatron_bd3.model import forward_step

    output, loss_fn = forward_step(data_iterator, model)
    return output, partial(_loss_with_blocks, loss_fn, block_size)


def _loss_with_blocks(loss_fn, block_size: int, output_tensor: torch.Tensor):
    loss_sum, num_tokens, report = loss_fn(output_tensor)
    b, seq_len = output_tensor.shape  # [b, L] per-token NELBO terms
    block_loss = output_tensor.detach().float().reshape(b, seq_len // block_size, block_size)
    return loss_sum, num_tokens, {**report, "block_loss": block_loss.mean(dim=-1)}


class StandaloneGradients:
    """Minibatch gradients of the torch-only network (one replica per rank, data parallel only):
    forward_train, SUBS cross-entropy and the trainer's NELBO normalisation from
    megatron_bd3.diffusion, plain autograd."""

    reports_loss = True
    model_parallel_group = None

    def __init__(self, loss_model) -> None:
        self.loss_model = loss_model
        self.network = loss_model.network.eval()
        self.counted = [p for p in self.network.parameters() if p.requires_grad]
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.data_parallel_group = dist.group.WORLD if world > 1 else None

    def clear(self) -> None:
        self.network.zero_grad(set_to_none=True)

    def minibatch(self, microbatches: list[dict[str, Any]]) -> dict:
        self.clear()
        device = next(self.network.parameters()).device
        loss_sum, tokens, blocks = 0.0, 0.0, []
        for batch in microbatches:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = self.loss_model.nelbo(batch)
            # megatron's schedule: per-micro-batch token mean, averaged over micro-batches
            (out.loss / len(microbatches)).backward()
            loss_sum += float(out.token_loss.detach().double().sum())
            tokens += float(out.num_tokens)
            blocks.append(out.block_loss.detach().double().cpu())
        return {"loss_sum": loss_sum, "tokens": tokens, "block_loss": torch.cat(blocks)}


def gradient_model(loss_model):
    """The gradient side of a likelihood loss model (MegatronLossModel or StandaloneLossModel)."""
    from megatron_bd3.evaluation.loss_model import MegatronLossModel, StandaloneLossModel

    if isinstance(loss_model, MegatronLossModel):
        return MegatronGradients(loss_model)
    if isinstance(loss_model, StandaloneLossModel):
        return StandaloneGradients(loss_model)
    return loss_model  # already a gradient model (tests, other backends)


# ----------------------------------------------------------------------- streaming statistics


class GradientMoments:
    """S = sum_m g_m (one float64 buffer, a view per counted parameter) and Q = sum_m ||g_m||^2
    over this rank's minibatches."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        device = params[0].device if params else torch.device("cpu")
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64,
                                device=device)
        self.sums = []
        offset = 0
        for p in params:
            self.sums.append(self.flat[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        self.squares = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0

    def add(self) -> None:
        """Add the gradients now in `.grad` as one g_m (a parameter without one counts 0)."""
        for p, s in zip(self.params, self.sums, strict=True):
            if p.grad is not None:
                g = p.grad.detach().to(torch.float64)
                s.add_(g)
                self.squares += torch.dot(g.reshape(-1), g.reshape(-1))
        self.count += 1

    def variance(self, num_minibatches: int, *, data_parallel_group, model_parallel_group
                 ) -> dict[str, float]:
        """Var over all ranks' minibatches (collective over the world when distributed)."""
        squares = self.squares.clone().reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            if data_parallel_group is not None:
                _all_reduce_host(self.flat, data_parallel_group)
            _all_reduce_host(squares)  # every rank's minibatches, each parameter counted once
        sum_norm2 = torch.dot(self.flat, self.flat).reshape(1)
        if model_parallel_group is not None and dist.get_world_size(model_parallel_group) > 1:
            _all_reduce_host(sum_norm2, model_parallel_group)
        q, s2, m = float(squares), float(sum_norm2), num_minibatches
        return {"grad_variance": (q - s2 / m) / (m - 1),
                "grad_mean_sq_norm": s2 / m ** 2,  # ||mean_m g_m||^2
                "grad_sq_norm": q / m}  # mean_m ||g_m||^2


def _all_reduce_host(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over `group` (the world by default) wherever the tensor lives: the standalone network
    stays on the CPU even under NCCL."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron_bd3.parallel import all_reduce_host

        all_reduce_host(tensor, group=group)
    return tensor


# ------------------------------------------------------------------------------ the measurement


def check_variance_request(dataset: EvalDataset, *, minibatches: int, global_batch_size: int,
                           micro_batch_size: int, clip_ranges: list[ClipRange],
                           noise: NoiseSettings) -> None:
    """Refuse upfront what cannot be measured, naming the option."""
    if minibatches < 2:
        raise EvalInputError(f"--variance-minibatches must be >= 2 (a variance over M "
                             f"minibatches), got {minibatches}")
    if global_batch_size % micro_batch_size:
        raise EvalInputError(f"--batch-size {global_batch_size} is not a multiple of "
                             f"--micro-batch-size {micro_batch_size} (a minibatch is split into "
                             "micro-batches on one data-parallel rank)")
    needed = minibatches * global_batch_size
    if needed > dataset.num_sequences:
        raise EvalInputError(
            f"--variance-minibatches {minibatches} x --batch-size {global_batch_size} = {needed} "
            f"sequences, but --data {dataset.name} holds {dataset.num_sequences}; lower either")
    if noise.resample and noise.fixed_t is None:
        for clip_range in clip_ranges:
            try:
                check_fraction_reachable(clip_range, noise.block_size)
            except ValueError as error:
                raise EvalInputError(f"clip range {clip_range_label(clip_range)}: {error}") \
                    from None


def evaluate_variance(
    loss_model,
    dataset: EvalDataset,
    *,
    noise: NoiseSettings,
    clip_ranges: list[ClipRange],
    minibatches: int,
    global_batch_size: int,
    micro_batch_size: int,
    seed: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    learned: ClipRange | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One row per clip range (see the module docstring); the same rows on every rank.

    Every clip range sees the same minibatches and the same random numbers (only the range
    differs), as in the clip search. Row keys: clip_range, learned, loss (mean training loss over
    the minibatches), loss_variance (mean over minibatches of the unbiased variance of the
    [G, N_b] per-(sequence, block) NELBO terms: the clip search's statistic),
    minibatch_loss_variance (unbiased variance of l(X^m) over m), grad_variance (eq. 10),
    grad_sq_norm (mean ||g_m||^2), grad_mean_sq_norm (||mean g_m||^2), minibatches, batch_size,
    dataset, seed, seconds.
    """
    check_variance_request(dataset, minibatches=minibatches, global_batch_size=global_batch_size,
                           micro_batch_size=micro_batch_size, clip_ranges=clip_ranges,
                           noise=noise)
    grads = gradient_model(loss_model)
    mine = list(range(dp_rank, minibatches, dp_size))
    positions = torch.arange(global_batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(clip_ranges) * len(mine), desc=f"grad variance {dataset.name}",
                   leave=False)
    rows = []
    for clip_range in clip_ranges:
        start = time.perf_counter()
        moments = GradientMoments(grads.counted)
        # per minibatch: loss sum, token count, variance of the block terms (reporting ranks)
        stats = torch.zeros(3, minibatches, dtype=torch.float64)
        for m in mine:
            x_0 = torch.from_numpy(dataset.read(
                (m * global_batch_size + positions).numpy()))  # [G, L]
            loader_batch = {"tokens": x_0, "global_batch_position": positions}
            if dataset.has_document_ids:  # a document-masked model (docs/method.md §1.4)
                loader_batch["document_ids"] = torch.from_numpy(dataset.read_document_ids(
                    (m * global_batch_size + positions).numpy()))
            batch = make_batch(loader_batch, settings=noise, clip_range=clip_range, seed=seed,
                               step=m, global_batch_size=global_batch_size)
            microbatches = [{key: value[i:i + micro_batch_size] for key, value in batch.items()}
                            for i in range(0, global_batch_size, micro_batch_size)]
            report = grads.minibatch(microbatches)
            moments.add()
            if report is not None:
                stats[0, m] = report["loss_sum"]
                stats[1, m] = report["tokens"]
                stats[2, m] = report["block_loss"].reshape(-1).var(unbiased=True)
            if bar is not None:
                bar.update(1)
        _all_reduce_host(stats)  # each minibatch is reported by exactly one rank
        row = moments.variance(minibatches, data_parallel_group=grads.data_parallel_group,
                               model_parallel_group=grads.model_parallel_group)
        losses = stats[0] / stats[1]  # l(X^m)
        rows.append({
            "clip_range": [clip_range.eps_min, clip_range.eps_max],
            "label": clip_range_label(clip_range),
            "learned": learned is not None and clip_range == learned,
            "loss": float(losses.mean()),
            "loss_variance": float(stats[2].mean()),
            "minibatch_loss_variance": float(losses.var(unbiased=True)),
            **row,
            "minibatches": minibatches,
            "batch_size": global_batch_size,
            "dataset": dataset.name,
            "seed": seed,
            "seconds": time.perf_counter() - start,
        })
    if bar is not None:
        bar.close()
    grads.clear()
    for row in rows:
        if not math.isfinite(row["grad_variance"]):
            raise EvalInputError(f"clip range {row['label']}: the gradient variance is "
                                 f"{row['grad_variance']} (non-finite gradients)")
    return rows


# ------------------------------------------------------------------------------- bd3-eval glue


def requested_clip_ranges(args, source) -> list[ClipRange]:
    """The clip ranges `bd3-eval` is asked to measure (empty: no variance). --variance-sweep:
    the paper's Table 2 ranges and the learned one, then any --clip-ranges; --clip-ranges: those;
    --grad-variance alone: the model's learned range."""
    sweep, texts = getattr(args, "variance_sweep", False), getattr(args, "clip_ranges", None)
    if not (getattr(args, "grad_variance", False) or sweep or texts):
        return []
    if not args.data:
        raise EvalInputError("--grad-variance needs minibatches: give --data")
    if args.variance_minibatches < 2:
        raise EvalInputError(f"--variance-minibatches must be >= 2, got "
                             f"{args.variance_minibatches}")
    learned = ClipRange(*source.clip_range)
    if source.preset == "ar" and (sweep or texts):
        raise EvalInputError(f"{source.path} is an AR model (t fixed at 1): a clip range does "
                             "not change its noise; use --grad-variance alone")
    ranges = sweep_clip_ranges(learned) if sweep else []
    for text in texts or []:
        clip_range = parse_clip_range(text)
        if clip_range not in ranges:
            ranges.append(clip_range)
    return ranges or [learned]


def variance_for_cli(args, source, loss_model, noise: NoiseSettings, datasets, clip_ranges,
                     info, *, progress: bool) -> list[dict[str, Any]]:
    """`bd3-eval --grad-variance`: rows of evaluate_variance on the chosen --data set, with the
    minibatch = --batch-size sequences on one data-parallel rank (micro-batches of
    --micro-batch-size, default the whole minibatch)."""
    import dataclasses

    names = [d.name for d in datasets]
    if args.variance_data is None:
        dataset = datasets[0]
    elif args.variance_data in names:
        dataset = datasets[names.index(args.variance_data)]
    else:
        raise EvalInputError(f"--variance-data {args.variance_data!r} is not a --data set; the "
                             f"sets are {names}")
    # the training loss: the run's resampling (a standalone directory does not record it; every
    # BD3 recipe resamples) and ignore_bos as evaluated
    noise = dataclasses.replace(noise, ignore_bos=source.ignore_bos,
                                resample=True if source.kind == "standalone" else noise.resample)
    return evaluate_variance(
        loss_model, dataset, noise=noise, clip_ranges=clip_ranges,
        minibatches=args.variance_minibatches, global_batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size or args.batch_size, seed=args.seed,
        dp_rank=info.dp_rank, dp_size=info.dp_size, learned=ClipRange(*source.clip_range),
        progress=progress)
