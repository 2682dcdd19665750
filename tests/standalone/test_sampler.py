"""The block sampler against a brute-force sampler written here (full recomputation at every
call, no cache, one sample at a time), plus batching, stopping and the ancestral schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_bd3.standalone import SamplerConfig, generate, nucleus_filter
from megatron_bd3.standalone.sampler import categorical_by_inversion
from tests.standalone.helpers import block_causal_mask, tiny_network

B, L, V, MASK, EOS = 4, 16, 64, 63, 1
LOGIT_TOLERANCE = 1e-5  # cached vs recomputed logits, fp32


# ----------------------------------------------------------------------------- brute force
def sliding_window_mask(length: int) -> torch.Tensor:
    """Query in block b sees positions [max(end_b - L, 0), end_b) (the cached semantics)."""
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    end = (q // B + 1) * B
    return (k < end) & (k >= (end - L).clamp(min=0))


def brute_logits(network, x: list[int], end: int, semantics: str) -> torch.Tensor:
    """Logits [end, V] for tokens x[:end] by one full pass."""
    if semantics == "window":  # recompute the window; positions relative to its start
        start = max(end - L, 0)
        tokens = torch.tensor([x[start:end]])
        logits = network(tokens, torch.arange(end - start), block_causal_mask(end - start, B))
        return torch.cat((torch.zeros(start, V), logits[0]))
    tokens = torch.tensor([x[:end]])
    return network(tokens, torch.arange(end), sliding_window_mask(end))[0]


def brute_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    out = torch.zeros_like(probs)
    total = 0.0
    for rank, token in enumerate(torch.argsort(probs, descending=True).tolist()):
        total += float(probs[token])
        if top_p < 1.0 and rank > 0 and total > top_p:
            break
        out[token] = probs[token]
    return out / out.sum()


def inverse_cdf_draw(probs: list[float], u: float) -> int:
    """The first token whose running probability sum exceeds u times the total."""
    target = u * math.fsum(probs)
    running = 0.0
    for token, p in enumerate(probs):
        running += p
        if p > 0 and running > target:
            return token
    return max(token for token, p in enumerate(probs) if p > 0)


def brute_first_hitting(network, prompt, length, seed, semantics, temperature=1.0, top_p=1.0):
    """First-hitting sampler, documented RNG protocol: per call one randint over the masked
    positions of the block, then one float64 uniform for the draw by inversion."""
    g = torch.Generator().manual_seed(seed)
    end = (len(prompt) // B + 1) * B
    x = list(prompt) + [MASK] * (end - len(prompt))
    while True:
        masked = [p for p in range(end - B, min(end, length)) if x[p] == MASK]
        while masked:
            position = masked.pop(int(torch.randint(len(masked), (1,), generator=g)))
            logits = brute_logits(network, x, end, semantics)[position].double()
            logits[MASK] = -math.inf
            probs = brute_nucleus(torch.softmax(logits / temperature, dim=-1), top_p)
            u = float(torch.rand(1, dtype=torch.float64, generator=g))
            x[position] = inverse_cdf_draw(probs.tolist(), u)
        if end >= length:
            return x[:length]
        end += B
        x += [MASK] * B


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def network():
    return tiny_network(seed=11)


def _tokens(samples):
    return [s.tokens for s in samples]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("length", [14, 3 * L + 6])
def test_first_hitting_equals_brute_force(network, length):
    """Within the context all modes equal the recomputation; beyond it the cache follows the
    sliding-window semantics, no-cache and window_refresh the recomputed window."""
    prompts, seeds = [[0], [0, 5, 6, 7, 8, 9]], [3, 4]
    modes = {"cache": SamplerConfig(use_cache=True),
             "no_cache": SamplerConfig(use_cache=False),
             "refresh": SamplerConfig(use_cache=True, window_refresh=True),
             "nucleus": SamplerConfig(use_cache=True, top_p=0.8, temperature=0.7)}
    semantics = {"cache": "sliding", "no_cache": "window", "refresh": "window",
                 "nucleus": "sliding"}
    with torch.no_grad():
        for name, config in modes.items():
            got = generate(network, length, prompts=prompts, seeds=seeds, config=config)
            for prompt, seed, sample in zip(prompts, seeds, got, strict=True):
                extra = dict(temperature=0.7, top_p=0.8) if name == "nucleus" else {}
                expected = brute_first_hitting(network, prompt, length, seed,
                                               semantics[name], **extra)
                assert sample.tokens == expected, name
                assert sample.nfe == length - len(prompt)
                assert sample.stop_reason == "length"
    if length > L:  # the two context semantics really differ past L
        a = generate(network, length, prompts=prompts, seeds=seeds)
        b = generate(network, length, prompts=prompts, seeds=seeds,
                     config=SamplerConfig(use_cache=False))
        assert _tokens(a) != _tokens(b)


@pytest.mark.parametrize("sampler", ["first_hitting", "ancestral"])
def test_cache_and_no_cache_agree(network, sampler):
    """Same tokens, and the logits of every call agree to LOGIT_TOLERANCE."""
    seen = {}

    def observer(mode):
        def record(index, positions, logits):
            seen.setdefault((mode, index), []).append((positions, logits.clone()))
        return record

    results = {}
    for use_cache in (True, False):
        config = SamplerConfig(sampler=sampler, steps=7, use_cache=use_cache)
        results[use_cache] = generate(network, L, num_samples=3, seeds=[1, 2, 3], config=config,
                                      observer=observer(use_cache))
    assert _tokens(results[True]) == _tokens(results[False])
    assert [s.nfe for s in results[True]] == [s.nfe for s in results[False]]
    for index in range(3):
        cached, uncached = seen[(True, index)], seen[(False, index)]
        assert len(cached) == len(uncached) == results[True][index].nfe
        for (pos_a, logits_a), (pos_b, logits_b) in zip(cached, uncached, strict=True):
            assert pos_a == pos_b
            torch.testing.assert_close(logits_a, logits_b, atol=LOGIT_TOLERANCE,
                                       rtol=LOGIT_TOLERANCE)


@pytest.mark.parametrize("sampler", ["first_hitting", "ancestral"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_batch_equals_single_runs(network, sampler, use_cache):
    """Prompts of different lengths put the samples at different blocks; each sample still gets
    exactly the tokens it gets alone with its seed."""
    prompts = [[0], [0, 4, 5], [0, 7, 8, 9, 10, 11], [0] + list(range(10, 30))]
    seeds = [10, 11, 12, 13]
    config = SamplerConfig(sampler=sampler, steps=5, use_cache=use_cache, top_p=0.9)
    batch = generate(network, 2 * L + 3, prompts=prompts, seeds=seeds, config=config)
    for prompt, seed, sample in zip(prompts, seeds, batch, strict=True):
        alone = generate(network, 2 * L + 3, prompts=[prompt], seeds=[seed], config=config)[0]
        assert sample.tokens == alone.tokens
        assert sample.nfe == alone.nfe
        assert sample.tokens[: len(prompt)] == prompt


def test_rotary_on_absolute_positions_equals_window_relative(network):
    """The cache keeps keys rotated at absolute positions; the reference re-rotates its cache
    relative to the window start on every call. Written out by hand here: per query block,
    rotate keys and queries relative to that block's window start."""
    length = 3 * L
    tokens = torch.randint(0, 63, (1, length), generator=torch.Generator().manual_seed(4))
    cfg = network.config
    h, g, hd = cfg.num_heads, cfg.num_query_groups, cfg.head_dim

    def rope(x, positions):
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = positions.double()[:, None] * inv[None]
        cos, sin = torch.cat((ang, ang), -1).cos().float(), torch.cat((ang, ang), -1).sin().float()
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]

    with torch.no_grad():
        x = network.embedding(tokens)[0]  # [s, d]
        for layer in network.layers:
            y = F.layer_norm(x, (cfg.hidden_size,), layer.attn_norm.weight, layer.attn_norm.bias)
            q, k, v = (y @ layer.attn.qkv.weight.T).split([h * hd, g * hd, g * hd], -1)
            q, k, v = q.view(-1, h, hd), k.view(-1, g, hd), v.view(-1, g, hd)
            k, v = k.repeat_interleave(h // g, 1), v.repeat_interleave(h // g, 1)
            out = torch.zeros(length, h, hd)
            for block_end in range(B, length + 1, B):
                start = max(block_end - L, 0)
                rel = torch.arange(block_end - start)
                qs = rope(q[block_end - B:block_end], rel[-B:])
                ks = rope(k[start:block_end], rel)
                att = torch.einsum("qhd,khd->hqk", qs, ks) / math.sqrt(hd)
                out[block_end - B:block_end] = torch.einsum(
                    "hqk,khd->qhd", att.softmax(-1), v[start:block_end])
            x = x + layer.attn.out(out.reshape(length, h * hd))
            x = x + layer.mlp(F.layer_norm(x, (cfg.hidden_size,), layer.mlp_norm.weight,
                                           layer.mlp_norm.bias))
        expected = network.logits(x)
        ours = network(tokens, torch.arange(length), sliding_window_mask(length))[0]
    torch.testing.assert_close(ours, expected, atol=LOGIT_TOLERANCE, rtol=LOGIT_TOLERANCE)


def test_eos_stop_truncates_after_the_counted_eos(network):
    """With the EOS logit raised, EOS appears early; the stopped sample is the unstopped one cut
    right after its second generated EOS (stopping changes nothing before it)."""
    biased = tiny_network(seed=11)
    with torch.no_grad():
        biased.output.bias[EOS] += 3.0
    config = SamplerConfig(stop_eos_count=2)
    stopped = generate(biased, 3 * L, num_samples=4, seeds=range(4), config=config)
    full = generate(biased, 3 * L, num_samples=4, seeds=range(4))
    reasons = set()
    for s, f in zip(stopped, full, strict=True):
        reasons.add(s.stop_reason)
        generated = f.tokens[1:]
        eos_at = [i for i, t in enumerate(generated) if t == EOS]
        if len(eos_at) >= 2:
            assert s.stop_reason == "eos"
            assert s.tokens == f.tokens[: 1 + eos_at[1] + 1]
            assert s.nfe <= f.nfe
        else:
            assert s.stop_reason == "length" and s.tokens == f.tokens
    assert "eos" in reasons


def test_low_entropy_stop(network):
    degenerate = tiny_network(seed=11)
    with torch.no_grad():
        degenerate.output.bias[7] += 50.0  # every token is 7: entropy 0
    config = SamplerConfig(stop_on_low_entropy=True, entropy_window=8, entropy_threshold=1.0)
    sample = generate(degenerate, 3 * L, num_samples=1, config=config)[0]
    # checked once the sequence (BOS included) is longer than the window: after block 3 (12
    # tokens), whose last 8 tokens are all 7; the reference then cuts those 8 tokens
    assert sample.stop_reason == "low_entropy"
    assert sample.tokens == [0] + [7] * 3
    assert sample.nfe == 11


def test_length_prompt_and_partial_last_block(network):
    prompt = [0, 9, 8, 7, 6, 5]  # ends inside block 1
    sample = generate(network, 13, prompts=[prompt], seeds=[1])[0]
    assert len(sample.tokens) == 13 and sample.tokens[:6] == prompt
    assert sample.nfe == 7 and MASK not in sample.tokens
    done = generate(network, 4, prompts=[prompt])[0]  # prompt already long enough
    assert done.tokens == prompt[:4] and done.nfe == 0


def test_block_size_one_is_autoregressive(network):
    """B = 1: one token per call, each call feeding the previous token and the new [MASK]."""
    sample = generate(network, 10, num_samples=1, config=SamplerConfig(block_size=1))[0]
    assert sample.nfe == 9 and len(sample.tokens) == 10
    assert sample.tokens_processed == 2 * 9  # every call: the previous token and the new [MASK]


def test_ancestral_calls_per_block_match_the_schedule(network):
    """With the linear schedule and T steps, every step reveals each masked token with
    probability 1/T (telescoping), so the expected number of network calls for a block of n
    masked tokens is T * (1 - (1 - 1/T)^n)."""
    T, n_blocks, samples = 3, 4, 60
    config = SamplerConfig(sampler="ancestral", steps=T)
    results = generate(network, n_blocks * B, prompts=[[]] * samples, seeds=range(samples),
                       config=config)
    mean_calls_per_block = sum(s.nfe for s in results) / (samples * n_blocks)
    expected = T * (1 - (1 - 1 / T) ** B)
    # calls per block is in {1, 2, 3}: std <= 1, over 240 blocks
    assert abs(mean_calls_per_block - expected) < 4 * 1.0 / math.sqrt(samples * n_blocks)
    assert all(MASK not in s.tokens for s in results)
    many = generate(network, 2 * B, prompts=[[]] * 4, seeds=range(4),
                    config=SamplerConfig(sampler="ancestral", steps=10_000))
    assert all(s.nfe == 2 * B for s in many)  # fine grid: one token per change


def test_nucleus_filter_matches_brute_force():
    probs = torch.softmax(torch.randn(5, 30, generator=torch.Generator().manual_seed(0),
                                      dtype=torch.float64) * 2, dim=-1)
    for top_p in (0.05, 0.5, 0.9, 1.0):
        expected = torch.stack([brute_nucleus(row, top_p) for row in probs])
        torch.testing.assert_close(nucleus_filter(probs, top_p), expected)


def test_draw_by_inversion_boundaries_and_frequencies():
    """Boundaries by hand (zero-probability tokens are never chosen, u -> 1 gives the last
    possible token, unnormalised rows), then the empirical frequencies of many draws against
    the probabilities (4 standard deviations)."""
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.5, 0.25, 0.0]] * 5, dtype=torch.float64)
    below_one = math.nextafter(1.0, 0.0)  # dyadic values: every sum below is exact
    uniform = torch.tensor([0.0, math.nextafter(0.25, 0.0), 0.25, 0.75, below_one],
                           dtype=torch.float64)
    assert categorical_by_inversion(probs, uniform).tolist() == [1, 1, 3, 4, 4]
    assert categorical_by_inversion(probs * 7.0, uniform).tolist() == [1, 1, 3, 4, 4]
    rows, draws = torch.tensor([[0.05, 0.0, 0.6, 0.25, 0.1]], dtype=torch.float64), 200_000
    uniform = torch.rand(draws, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    choice = categorical_by_inversion(rows.expand(draws, -1), uniform)
    counts = torch.bincount(choice, minlength=5).double() / draws
    std = (rows[0] * (1 - rows[0]) / draws).sqrt()
    assert counts[1] == 0
    assert ((counts - rows[0]).abs() <= 4 * std + 1e-12).all(), counts


def test_bad_options_are_named(network):
    with pytest.raises(ValueError, match="block_size 3 must divide the model's seq_length 16"):
        generate(network, 8, num_samples=1, config=SamplerConfig(block_size=3))
    with pytest.raises(ValueError, match="holds the mask token 63 at position 1"):
        generate(network, 8, prompts=[[0, 63]])
    with pytest.raises(ValueError, match="sampler 'greedy' is not one of"):
        generate(network, 8, num_samples=1, config=SamplerConfig(sampler="greedy"))
    with pytest.raises(ValueError, match="2 seeds for 1 samples"):
        generate(network, 8, prompts=[[0]], seeds=[1, 2])


def test_bfloat16_network(network):
    """Opt-in bfloat16: same function up to bf16 rounding, and the sampler runs on it (cache in
    bf16, sampling math in float64)."""
    bf16 = tiny_network(seed=11).to(torch.bfloat16)
    tokens = torch.randint(0, 63, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = network(tokens)
        torch.testing.assert_close(bf16(tokens).float(), reference, atol=0.2, rtol=0.05)
    samples = generate(bf16, 2 * L + 2, num_samples=2, seeds=[5, 6])
    for sample in samples:
        assert len(sample.tokens) == 2 * L + 2 and MASK not in sample.tokens
        assert sample.nfe == 2 * L + 1
