"""Generation quality: sample N sequences with the standalone sampler, sharded over data-parallel
ranks, and report generative perplexity, entropy, NFE, lengths, stop reasons and throughput
(docs/method.md §3, §6.2).

Which rank generates what. Samples are generated in batches of consecutive indices,
``[k·batch_size, (k+1)·batch_size)``, and batch ``k`` runs on rank ``k % world_size``; sample
``i`` draws all its randomness from its own generator seeded with ``seed + i`` (as
``bd3-sample --seed``). Both the seed and the batch a sample shares are functions of the sample
index and ``batch_size`` alone, so every sample is generated exactly once and the set is the same
for any number of ranks; it also equals ``bd3-sample --seed S --batch-size B``'s samples.

Why the batch is fixed and not only the seed: the sampler's per-sample generators make a sample's
random draws independent of its batch, but the network's floating-point results are not. Feeding
more rows changes the summation order of the matmuls (e.g. oneDNN's packed path up to 128 rows,
MKL above), so logits differ in the last bits. Measured on CPU, 24 samples of 40 tokens, seeds
1000+i, batch 24 against each sample alone: a 2-layer d=32 model gave identical samples for both
samplers (logit differences up to 8e-6); a 3-layer d=256 model gave logit differences up to 7e-4
and, with the ancestral sampler (7 steps, top-p 0.9), 1 of 24 samples changed from one token on.
Such a flip is a fair draw either way, but it would make the sampled set depend on the number of
ranks; with the batches fixed by index it does not.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from megatron_bd3.evaluation.scorers import Scorer, generative_perplexity, unigram_entropy
from megatron_bd3.standalone import BD3Network, SamplerConfig, generate

__all__ = [
    "SampleRecord",
    "shard_batches",
    "generate_samples",
    "gather_samples",
    "generation_report",
]


@dataclass
class SampleRecord:
    """One generated sample (keys as ``bd3-sample``'s JSONL lines, plus rank and batch)."""

    index: int
    seed: int
    rank: int
    batch: int  # index of the batch of batch_size consecutive samples it was generated in
    token_ids: list[int]  # prompt included
    prompt_length: int
    text: str | None  # decoded with the model's tokenizer (None without one)
    num_tokens: int
    num_generated: int
    nfe: int
    stop_reason: str  # "length" | "eos" | "low_entropy"
    seconds: float  # from the start of its batch until it finished

    def to_dict(self) -> dict:
        return asdict(self)


def shard_batches(num_samples: int, batch_size: int, rank: int,
                  world_size: int) -> list[list[int]]:
    """The sample indices ``rank`` generates, batch by batch: batch ``k`` holds samples
    ``[k·batch_size, (k+1)·batch_size)`` and goes to rank ``k % world_size``."""
    if num_samples < 0 or batch_size < 1:
        raise ValueError(f"need num_samples >= 0 and batch_size >= 1, got {num_samples} and "
                         f"{batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size {world_size})")
    starts = range(0, num_samples, batch_size)
    return [list(range(s, min(s + batch_size, num_samples)))
            for k, s in enumerate(starts) if k % world_size == rank]


def generate_samples(
    network: BD3Network,
    tokenizer,
    sampler_config: SamplerConfig,
    *,
    num_samples: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    length: int | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> list[SampleRecord]:
    """This rank's share of samples ``0 … num_samples − 1`` (module docstring), in index order.

    ``length``: tokens per sample, prompt included (default: the model's ``seq_length``; longer
    runs use the sliding window). ``prompts``: one token list for every sample, or one per
    sample (default: the model's BOS, as ``generate``). ``tokenizer`` (or None) decodes the text.
    """
    length = network.config.seq_length if length is None else length
    if prompts is not None:
        prompts = [list(map(int, p)) for p in prompts]
        if len(prompts) not in (1, num_samples):
            raise ValueError(f"{len(prompts)} prompts for {num_samples} samples (give one for "
                             "all or one per sample)")
    batches = shard_batches(num_samples, batch_size, rank, world_size)
    from tqdm import tqdm

    def prompt_of(index: int) -> list[int] | None:
        if prompts is None:
            return None
        return prompts[0] if len(prompts) == 1 else prompts[index]

    default_prompt = [] if network.config.bos_token_id is None else [network.config.bos_token_id]
    total = sum(max(length - len(prompt_of(i) or default_prompt), 0)
                for batch in batches for i in batch)
    records = []
    with tqdm(total=total, unit="tok", desc=f"sampling (rank {rank})",
              disable=not progress) as bar:
        for batch in batches:
            batch_prompts = None if prompts is None else [prompt_of(i) for i in batch]
            samples = generate(network, length, prompts=batch_prompts, num_samples=len(batch),
                               seeds=[seed + i for i in batch], config=sampler_config,
                               progress=bar.update)
            for index, sample in zip(batch, samples, strict=True):
                records.append(SampleRecord(
                    index=index, seed=seed + index, rank=rank, batch=index // batch_size,
                    token_ids=sample.tokens, prompt_length=sample.prompt_length,
                    text=None if tokenizer is None else tokenizer.decode(sample.tokens),
                    num_tokens=len(sample.tokens), num_generated=len(sample.generated),
                    nfe=sample.nfe, stop_reason=sample.stop_reason, seconds=sample.seconds,
                ))
    return records


def gather_samples(records: Sequence[SampleRecord],
                   num_samples: int | None = None) -> list[SampleRecord]:
    """Every rank's records, ordered by sample index (``all_gather_object`` when
    torch.distributed is initialised, else this process's). With ``num_samples`` the result
    must hold each index ``0 … num_samples − 1`` exactly once."""
    gathered = list(records)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, list(records))
        gathered = [record for part in parts for record in part]
    gathered.sort(key=lambda record: record.index)
    indices = [record.index for record in gathered]
    if num_samples is not None and indices != list(range(num_samples)):
        counts = Counter(indices)
        duplicated = sorted(i for i, c in counts.items() if c > 1)
        missing = sorted(set(range(num_samples)) - set(counts))
        raise RuntimeError(f"gathered samples are not 0..{num_samples - 1} exactly once: "
                           f"missing {missing[:10]}, duplicated {duplicated[:10]}")
    return gathered


def generation_seconds(records: Sequence[SampleRecord]) -> float:
    """Wall time of the generation: per rank the sum over its batches of the batch's time (its
    slowest sample), the ranks running in parallel (the slowest rank)."""
    batch_time: dict[tuple[int, int], float] = {}
    for record in records:
        key = (record.rank, record.batch)
        batch_time[key] = max(batch_time.get(key, 0.0), record.seconds)
    per_rank: Counter = Counter()
    for (rank, _), seconds in batch_time.items():
        per_rank[rank] += seconds
    return max(per_rank.values(), default=0.0)


def generation_report(samples: Sequence[SampleRecord], scorer: Scorer | None = None, *,
                      max_length: int | None = None, progress: bool = False) -> dict:
    """Metrics of a gathered sample set (docs/method.md §6.2), as top-level scalars (what
    ``report.log_wandb`` logs) plus ``stop_reasons`` and one ``samples`` entry per sample (what
    ``report.plot_generation`` plots):

    * ``gen_ppl``: mean over samples of each sample's generative perplexity (the paper's number)
      under ``scorer``, ``gen_ppl_token_weighted``, ``scored_tokens``, ``unscored_samples``
      (None/0 without a scorer or without texts). A sample's text includes its prompt;
      ``max_length`` cuts the re-tokenised samples as the reference does (to its generation
      length);
    * ``entropy``: mean unigram entropy (nats) of each sample's token ids, prompt included, as
      the reference's ``record_entropy``;
    * ``nfe``, ``num_tokens`` (prompt included) and ``num_generated``: means, ``num_tokens_min``
      and ``num_tokens_max``;
    * ``stop_reasons``: count per reason;
    * ``tokens_per_second``: generated tokens over the generation's wall time
      (:func:`generation_seconds`), and ``generation_seconds``.
    """
    samples = list(samples)
    texts = [s.text for s in samples]
    scored = None
    if scorer is not None and samples and all(t is not None for t in texts):
        scored = generative_perplexity(texts, scorer, max_length=max_length, progress=progress)
    entropies = [unigram_entropy(s.token_ids) for s in samples]
    lengths = [s.num_tokens for s in samples]
    seconds = generation_seconds(samples)
    generated = sum(s.num_generated for s in samples)
    per_sample = []
    for i, (sample, entropy) in enumerate(zip(samples, entropies, strict=True)):
        per_sample.append({
            "index": sample.index, "seed": sample.seed, "num_tokens": sample.num_tokens,
            "num_generated": sample.num_generated, "nfe": sample.nfe,
            "stop_reason": sample.stop_reason, "entropy": entropy,
            "gen_ppl": None if scored is None else scored.per_sample[i],
            "scored_tokens": None if scored is None else scored.per_sample_tokens[i],
        })
    return {
        "num_samples": len(samples),
        "scorer": None if scored is None else scored.scorer,
        "gen_ppl": None if scored is None else scored.mean_per_sample,
        "gen_ppl_token_weighted": None if scored is None else scored.token_weighted,
        "scored_tokens": 0 if scored is None else scored.scored_tokens,
        "unscored_samples": 0 if scored is None else scored.unscored_samples,
        "entropy": _mean(entropies),
        "nfe": _mean([s.nfe for s in samples]),
        "num_tokens": _mean(lengths),
        "num_tokens_min": min(lengths, default=None),
        "num_tokens_max": max(lengths, default=None),
        "num_generated": _mean([s.num_generated for s in samples]),
        "stop_reasons": dict(sorted(Counter(s.stop_reason for s in samples).items())),
        "generation_seconds": seconds,
        "tokens_per_second": generated / seconds if seconds > 0 else None,
        "samples": per_sample,
    }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None

