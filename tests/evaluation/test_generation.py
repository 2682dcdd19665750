"""Sharded generation (exactly once, the same set for any number of ranks) and the report."""

from __future__ import annotations

import json

import pytest

from megatron_bd3.data.tokenizer import load_tokenizer
from megatron_bd3.evaluation.generation import (
    SampleRecord,
    gather_samples,
    generate_samples,
    generation_report,
    generation_seconds,
    shard_batches,
)
from megatron_bd3.evaluation.scorers import OurARScorer, generative_perplexity, unigram_entropy
from megatron_bd3.standalone import BD3Network, SamplerConfig, generate
from tests.dist_launcher import REPO_ROOT, run_distributed
from tests.evaluation.workers.models import ar_scorer_dir, corpus_tokenizer, sampler_model_dir
from tests.evaluation.workers.sample_settings import LENGTH, sampler_config

WORKER = REPO_ROOT / "tests" / "evaluation" / "workers" / "sample_ranks.py"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return sampler_model_dir(tmp_path_factory.mktemp("model"), corpus_tokenizer())


@pytest.fixture(scope="module")
def network(model_dir):
    return BD3Network.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir / "tokenizer")


def _key(record: SampleRecord):
    return (record.index, record.seed, record.token_ids, record.prompt_length, record.text,
            record.nfe, record.stop_reason)


def test_shard_batches_cover_each_sample_once():
    for num_samples in (0, 1, 7, 12):
        for batch_size in (1, 3, 5):
            single = shard_batches(num_samples, batch_size, 0, 1)
            for world_size in (1, 2, 3, 5):
                shards = [shard_batches(num_samples, batch_size, r, world_size)
                          for r in range(world_size)]
                batches = sorted(b for shard in shards for b in shard)
                assert batches == single  # the same batches, whatever the world size
                assert sum(batches, []) == list(range(num_samples))
    assert shard_batches(7, 2, 1, 2) == [[2, 3], [6]]
    with pytest.raises(ValueError, match="rank 2 is outside"):
        shard_batches(4, 1, 2, 2)


@pytest.mark.parametrize("config", [
    sampler_config(),
    SamplerConfig(sampler="ancestral", steps=5, use_cache=False, stop_on_low_entropy=True,
                  entropy_window=8, entropy_threshold=1.5),
], ids=["first_hitting_eos", "ancestral_no_cache"])
def test_any_world_size_gives_the_same_set(network, tokenizer, config):
    common = dict(num_samples=7, seed=5, length=LENGTH, batch_size=2)
    single = generate_samples(network, tokenizer, config, **common)
    assert [r.index for r in single] == list(range(7))
    for world_size in (2, 3):
        shards = [generate_samples(network, tokenizer, config, rank=r, world_size=world_size,
                                   **common) for r in range(world_size)]
        merged = sorted((r for shard in shards for r in shard), key=lambda r: r.index)
        assert [_key(r) for r in merged] == [_key(r) for r in single]
        assert all(r.rank == r.batch % world_size for r in merged)
    # sample i is bd3-sample's sample i: seed + i, batches of consecutive indices
    direct = generate(network, LENGTH, num_samples=2, seeds=[7, 8], config=config)
    assert [s.tokens for s in direct] == [r.token_ids for r in single[2:4]]
    for record in single:
        assert record.text == tokenizer.decode(record.token_ids)
        assert record.num_tokens == len(record.token_ids) <= LENGTH
        assert record.num_generated == record.num_tokens - record.prompt_length


def test_prompts(network, tokenizer):
    bos = network.config.bos_token_id
    prompt = [bos] + tokenizer.encode("The government said")
    shared = generate_samples(network, tokenizer, SamplerConfig(), num_samples=3, seed=0,
                              length=24, prompts=[prompt], batch_size=2)
    assert all(r.token_ids[: len(prompt)] == prompt and r.prompt_length == len(prompt)
               for r in shared)
    own = [[bos, 10 + i] for i in range(3)]
    per_sample = generate_samples(network, tokenizer, SamplerConfig(), num_samples=3, seed=0,
                                  length=24, prompts=own, batch_size=3)
    assert [r.token_ids[:2] for r in per_sample] == own
    with pytest.raises(ValueError, match="2 prompts for 3 samples"):
        generate_samples(network, tokenizer, SamplerConfig(), num_samples=3, seed=0,
                         prompts=own[:2])


@pytest.mark.distributed
def test_two_ranks_equal_the_single_process_set(model_dir, network, tokenizer, tmp_path):
    out = tmp_path / "samples.jsonl"
    run_distributed(WORKER, 2, model_dir, out, 7, 2, 5, timeout=300)
    gathered = [json.loads(line) for line in out.read_text().splitlines()]
    single = generate_samples(network, tokenizer, sampler_config(), num_samples=7, seed=5,
                              length=LENGTH, batch_size=2)
    assert [g["index"] for g in gathered] == list(range(7))
    for record, expected in zip(gathered, single, strict=True):
        assert _key(SampleRecord(**record)) == _key(expected)
        assert record["rank"] == record["batch"] % 2


def test_gather_checks_exactly_once(network, tokenizer):
    records = generate_samples(network, tokenizer, SamplerConfig(), num_samples=3, seed=0,
                               length=8, batch_size=2)
    assert gather_samples(records[::-1], num_samples=3) == records  # ordered by index
    with pytest.raises(RuntimeError, match=r"missing \[1\], duplicated \[2\]"):
        gather_samples([records[0], records[2], records[2]], num_samples=3)


def test_generation_report(model_dir, network, tokenizer, tmp_path, capsys):
    samples = generate_samples(network, tokenizer, sampler_config(), num_samples=6, seed=1,
                               length=LENGTH, batch_size=4)
    scorer = OurARScorer.from_directory(ar_scorer_dir(tmp_path / "ar", tokenizer))
    report = generation_report(samples, scorer)
    assert capsys.readouterr().err == ""  # progress=False is quiet
    expected = generative_perplexity([s.text for s in samples], scorer)
    assert report["gen_ppl"] == expected.mean_per_sample > 1
    assert report["gen_ppl_token_weighted"] == expected.token_weighted
    assert report["scored_tokens"] == expected.scored_tokens
    assert report["unscored_samples"] == 0 and report["scorer"] == scorer.name
    assert [s["gen_ppl"] for s in report["samples"]] == expected.per_sample
    entropies = [unigram_entropy(s.token_ids) for s in samples]
    assert [s["entropy"] for s in report["samples"]] == entropies
    assert report["entropy"] == pytest.approx(sum(entropies) / 6)
    assert report["num_samples"] == 6 and [s["index"] for s in report["samples"]] == list(range(6))
    assert report["nfe"] == pytest.approx(sum(s.nfe for s in samples) / 6)
    assert report["num_tokens_max"] == max(s.num_tokens for s in samples) <= LENGTH
    assert report["num_tokens_min"] == min(s.num_tokens for s in samples)
    assert sum(report["stop_reasons"].values()) == 6
    assert set(report["stop_reasons"]) == {"length", "eos"}  # the EOS stop fires on some
    seconds = generation_seconds(samples)
    assert report["generation_seconds"] == seconds > 0
    assert report["tokens_per_second"] == pytest.approx(
        sum(s.num_generated for s in samples) / seconds)
    json.dumps(report)  # plain JSON for eval.json
    without = generation_report(samples, None)  # no scorer: the rest only
    assert without["gen_ppl"] is None and without["samples"][0]["gen_ppl"] is None
