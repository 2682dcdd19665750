"""The NELBO bound of bd3-eval: equal to a brute-force per-block loop, deterministic, with a
standard error that shrinks like 1/sqrt(K)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_bd3.diffusion import noise_batch
from megatron_bd3.evaluation.data import EvalDataset
from megatron_bd3.evaluation.likelihood import (
    ELBO,
    check_batching,
    evaluate_likelihood,
    sequence_sums,
    summarize,
)
from megatron_bd3.evaluation.loss_model import StandaloneLossModel
from megatron_bd3.evaluation.source import EvalInputError
from megatron_bd3.training.batches import NoiseSettings
from tests.standalone.helpers import tiny_network

L, B, VOCAB, MASK = 16, 4, 64, 63


def dataset(n: int, seed: int = 0) -> EvalDataset:
    tokens = torch.randint(0, MASK, (n, L), generator=torch.Generator().manual_seed(seed))
    array = tokens.numpy()
    return EvalDataset("random", "in memory", L, n, {"sequences": n}, lambda i: array[i])


def settings(fixed_t=None) -> NoiseSettings:
    return NoiseSettings(block_size=B, mask_token_id=MASK, schedule="loglinear", ignore_bos=True,
                         resample=False, antithetic=True, fixed_t=fixed_t)


def brute_force(network, data: EvalDataset, *, global_batch, samples, seed, ignore_bos,
                fixed_t=None) -> float:
    """Sum over repeats, sequences, blocks and tokens of -(1/t) log p(x_0) at masked counted
    positions, divided by K x the counted tokens: written from the definition, one block at a
    time, with log p from an explicit log-softmax over the non-[MASK] vocabulary."""
    n = data.num_sequences
    num_batches = math.ceil(n / global_batch)
    total, counted = 0.0, 0
    for k in range(samples):
        for batch in range(num_batches):
            start = batch * global_batch
            rows = list(range(start, min(start + global_batch, n)))
            x_0 = torch.from_numpy(data.read(np.array(rows)))
            noised = noise_batch(x_0, torch.arange(len(rows)), global_batch, seed,
                                 k * num_batches + batch, B, MASK, schedule="loglinear",
                                 clip_range=ELBO, ignore_bos=ignore_bos, fixed_t=fixed_t)
            with torch.no_grad():
                logits = network.forward_train(noised.x_t, x_0).double()  # [b, L, V]
            for row in range(len(rows)):
                for block in range(L // B):
                    for pos in range(block * B, (block + 1) * B):
                        if ignore_bos and pos == 0:
                            continue
                        if k == 0:
                            counted += 1
                        if not noised.masked[row, pos]:
                            continue
                        t = float(noised.t_blocks[row, block])
                        scores = logits[row, pos].clone()
                        scores[MASK] = -math.inf
                        log_p = scores[x_0[row, pos]] - torch.logsumexp(scores, dim=0)
                        total += -float(log_p) / t
    return total / samples / counted


@pytest.mark.parametrize("fixed_t", [None, 1.0])
def test_bound_equals_a_per_block_loop(fixed_t):
    network = tiny_network(seed=3)
    data = dataset(10)
    result = evaluate_likelihood(
        StandaloneLossModel(network), data, noise=settings(fixed_t), ignore_bos=True,
        global_batch_size=4, micro_batch_size=2, samples=2, seed=7)
    expected = brute_force(network, data, global_batch=4, samples=2, seed=7, ignore_bos=True,
                           fixed_t=fixed_t)
    assert result["nll"] == pytest.approx(expected, rel=1e-5)
    assert result["tokens"] == 10 * (L - 1) and result["sequences"] == 10
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]))
    assert len(result["repeat_nll"]) == 2
    assert sum(result["repeat_nll"]) / 2 == pytest.approx(result["nll"])


def test_split_into_ranks_and_micro_batches_changes_nothing():
    network = StandaloneLossModel(tiny_network(seed=1))
    data = dataset(11)  # the last global batch is short: 11 = 2 x 4 + 3
    common = dict(noise=settings(), ignore_bos=True, global_batch_size=4, samples=3, seed=2)
    whole = evaluate_likelihood(network, data, micro_batch_size=4, **common)
    sums = torch.zeros(3, 11, dtype=torch.float64)
    tokens = torch.zeros(11, dtype=torch.float64)
    for rank in range(2):  # two data-parallel ranks, one after the other: what all-reduce adds
        part_sums, part_tokens = sequence_sums(network, data, micro_batch_size=1, dp_rank=rank,
                                               dp_size=2, **common)
        assert ((part_sums != 0).any(dim=0) & (sums != 0).any(dim=0)).sum() == 0  # disjoint
        sums += part_sums
        tokens += part_tokens
    split = summarize(data, sums, tokens, global_batch_size=4, seed=2)
    assert split["nll"] == pytest.approx(whole["nll"], rel=1e-6)
    assert split["se"] == pytest.approx(whole["se"], rel=1e-6)
    assert split["tokens"] == whole["tokens"] == 11 * (L - 1)


def test_deterministic_for_a_seed_and_the_standard_error_shrinks_like_one_over_sqrt_k():
    network = StandaloneLossModel(tiny_network(seed=5))
    data = dataset(48, seed=4)
    common = dict(noise=settings(), ignore_bos=True, global_batch_size=8, micro_batch_size=8)
    first = evaluate_likelihood(network, data, samples=4, seed=1, **common)
    again = evaluate_likelihood(network, data, samples=4, seed=1, **common)
    other = evaluate_likelihood(network, data, samples=4, seed=2, **common)
    assert first["nll"] == again["nll"] and first["se"] == again["se"]
    assert first["nll"] != other["nll"]
    many = evaluate_likelihood(network, data, samples=16, seed=1, **common)
    ratio = first["se"] / many["se"]
    assert 1.6 < ratio < 2.5, ratio  # sqrt(16 / 4) = 2
    low, high = many["nll_ci95"]
    assert high - low == pytest.approx(2 * 1.959963984540054 * many["se"])
    assert many["ppl_ci95"] == pytest.approx([math.exp(low), math.exp(high)])
    single = evaluate_likelihood(network, data, samples=1, seed=1, **common)
    assert single["se"] is None and single["ppl_ci95"] is None


def test_batching_that_does_not_divide_is_refused():
    check_batching(8, 2, 2)
    with pytest.raises(EvalInputError, match="--batch-size 6 is not a multiple of the "
                                             "data-parallel size 4"):
        check_batching(6, 1, 4)
    with pytest.raises(EvalInputError, match="is not a multiple of --micro-batch-size 3"):
        check_batching(8, 3, 2)
