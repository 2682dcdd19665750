"""The NELBO perplexity bound of a dataset, with Monte-Carlo repeats and a standard error.

Protocol (docs/evaluation.md; the paper's, docs/method.md §6.1): the set is cut into global
batches of G sequences in order (the last one may be short); for each batch and each repeat
k = 0..K-1, one t per (sequence, block) is drawn on the ELBO interval [1e-3, 1], stratified over
the global batch (AR models: t = 1), no resampling, keyed by (seed, k * num_batches + batch,
position in the batch) exactly as training keys its noise. So the numbers depend on the seed, G
and K only: not on the number of processes, their TP/PP/DP layout or the micro-batch size.
Position 0 is masked and counted never when ignore_bos.

Per sequence i and repeat k, s_ki is the sum of its counted per-token terms -(1/t) log p and c_i
its counted tokens. The bound is NLL = sum_i mean_k s_ki / sum_i c_i (token-weighted over the
whole set, as the paper aggregates); PPL = exp(NLL). Its Monte-Carlo standard error, for this
fixed set, is sqrt(sum_i var_k(s_ki) / K) / sum_i c_i (the repeats are independent; var_k is the
unbiased variance over the K repeats), so it shrinks like 1/sqrt(K); the 95% interval is
NLL +- 1.96 SE, and exp of its ends for PPL. K = 1 (the paper's single sample) has no SE.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from megatron_bd3.diffusion import ClipRange, noise_batch
from megatron_bd3.evaluation.data import EvalDataset
from megatron_bd3.evaluation.source import EvalInputError
from megatron_bd3.training.batches import NoiseSettings
from megatron_bd3.training.validation import count_mask_for

ELBO = ClipRange(1e-3, 1.0)
Z_95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def check_batching(global_batch_size: int, micro_batch_size: int, dp_size: int) -> None:
    """G must split into equal micro-batches on every data-parallel rank."""
    if global_batch_size % dp_size:
        raise EvalInputError(f"--batch-size {global_batch_size} is not a multiple of the "
                             f"data-parallel size {dp_size}")
    per_rank = global_batch_size // dp_size
    if per_rank % micro_batch_size:
        raise EvalInputError(f"--batch-size {global_batch_size} / data-parallel size {dp_size} = "
                             f"{per_rank} is not a multiple of --micro-batch-size "
                             f"{micro_batch_size}")


def _rank_batch(dataset: EvalDataset, start: int, count: int, global_batch_size: int,
                dp_rank: int, dp_size: int):
    """(indices [n], positions [n], real [n]) of this rank's share of one global batch. Rows past
    the end of a short last batch repeat its first sequence and are not counted."""
    per_rank = global_batch_size // dp_size
    positions = torch.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    real = positions < count
    indices = start + torch.where(real, positions, torch.zeros_like(positions))
    return indices, positions, real


def evaluate_likelihood(
    loss_model,
    dataset: EvalDataset,
    *,
    global_batch_size: int,
    seed: int,
    **kwargs,
) -> dict[str, Any]:
    """NELBO bound of `dataset` (see the module docstring); the same dict on every rank.
    Keyword arguments as `sequence_sums`."""
    sums, tokens = sequence_sums(loss_model, dataset, global_batch_size=global_batch_size,
                                 seed=seed, **kwargs)
    if dist.is_initialized():  # each sequence by one rank (its CP ranks: a part each)
        from megatron_bd3.parallel import all_reduce_host

        all_reduce_host(sums)
        all_reduce_host(tokens)
    return summarize(dataset, sums, tokens, global_batch_size=global_batch_size, seed=seed)


def sequence_sums(
    loss_model,
    dataset: EvalDataset,
    *,
    noise: NoiseSettings,
    ignore_bos: bool,
    global_batch_size: int,
    micro_batch_size: int,
    samples: int,
    seed: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of s_ki [K, N] and c_i [N] (zeros for the sequences other ranks
    report): summed over ranks they are the whole set's."""
    if samples < 1:
        raise EvalInputError(f"--nelbo-samples must be >= 1, got {samples}")
    check_batching(global_batch_size, micro_batch_size, dp_size)
    n = dataset.num_sequences
    num_batches = math.ceil(n / global_batch_size)
    sums = torch.zeros(samples, n, dtype=torch.float64)  # s_ki
    tokens = torch.zeros(n, dtype=torch.float64)  # c_i
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=samples * num_batches, desc=f"NELBO {dataset.name}", leave=False)
    for k in range(samples):
        for batch in range(num_batches):
            start = batch * global_batch_size
            count = min(global_batch_size, n - start)
            indices, positions, real = _rank_batch(dataset, start, count, global_batch_size,
                                                   dp_rank, dp_size)
            x_0 = torch.from_numpy(dataset.read(indices.numpy()))  # [b, L]
            noised = noise_batch(
                x_0, positions, global_batch_size, seed, k * num_batches + batch,
                noise.block_size, noise.mask_token_id, schedule=noise.schedule,
                clip_range=ELBO, ignore_bos=ignore_bos, resample=False,
                antithetic=noise.antithetic, fixed_t=noise.fixed_t,
            )
            count_mask = count_mask_for(x_0, ignore_bos) * real[:, None]
            rows = {"x_0": x_0, "x_t": noised.x_t, "masked": noised.masked,
                    "loss_weight": noised.loss_weight, "count_mask": count_mask}
            if dataset.has_document_ids:  # a document-masked model (docs/method.md §1.4)
                rows["document_ids"] = torch.from_numpy(dataset.read_document_ids(indices.numpy()))
            microbatches = [{key: value[i:i + micro_batch_size] for key, value in rows.items()}
                            for i in range(0, len(x_0), micro_batch_size)]
            reports = loss_model.reports(microbatches, ignore_bos)
            if reports:
                sequence_loss = torch.cat([r["sequence_loss"] for r in reports]).double().cpu()
                sequence_tokens = torch.cat([r["sequence_tokens"] for r in reports]).double().cpu()
                sums[k, indices[real]] = sequence_loss[real]
                tokens[indices[real]] = sequence_tokens[real]
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return sums, tokens


def summarize(dataset: EvalDataset, sums: torch.Tensor, tokens: torch.Tensor, *,
              global_batch_size: int, seed: int) -> dict[str, Any]:
    """The bound, its standard error and intervals from s_ki [K, N] and c_i [N]."""
    samples = sums.shape[0]
    total_tokens = float(tokens.sum())
    if total_tokens <= 0:
        raise EvalInputError(f"--data {dataset.name}: no token is counted")
    nll = float(sums.mean(dim=0).sum() / total_tokens)
    out: dict[str, Any] = {
        "name": dataset.name,
        "source": dataset.source,
        "nll": nll,
        "ppl": math.exp(nll),
        "bpd": nll / math.log(2.0),
        "nelbo_samples": samples,
        "repeat_nll": [float(s) for s in sums.sum(dim=1) / total_tokens],
        "tokens": int(total_tokens),
        "sequences": dataset.num_sequences,
        "batch_size": global_batch_size,
        "seed": seed,
        "data": dataset.stats,
        "se": None,
        "nll_ci95": None,
        "ppl_ci95": None,
    }
    if samples >= 2:
        se = math.sqrt(float(sums.var(dim=0, unbiased=True).sum()) / samples) / total_tokens
        low, high = nll - Z_95 * se, nll + Z_95 * se
        out.update(se=se, nll_ci95=[low, high], ppl_ci95=[math.exp(low), math.exp(high)])
    return out
