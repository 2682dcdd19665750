"""BD3DataLoader: exactly once per epoch, equal steps per rank, layout-independent global batches,
exact resume, refusal of mismatched or damaged data."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from megatron_bd3.data.loader import BD3DataLoader
from megatron_bd3.data.manifest import ManifestError
from megatron_bd3.data.shards import ShardError
from megatron_bd3.data.tokenizer import load_tokenizer
from tests.data.conftest import read_tar_samples


def make(shards_dir, **kwargs) -> BD3DataLoader:
    settings = dict(split="train", micro_batch_size=4, dp_rank=0, dp_size=2, seed=7)
    settings.update(kwargs)
    return BD3DataLoader(shards_dir, **settings)


def take(loader, count):
    out = []
    for batch in loader:
        out.append({k: v.tolist() for k, v in batch.items()})
        if len(out) == count:
            break
    return out


@pytest.fixture(scope="module")
def all_samples(shards_dir):
    return read_tar_samples(sorted(shards_dir.glob("train-*.tar")))


def test_batch_format_and_content(shards_dir, all_samples):
    loader = make(shards_dir, num_microbatches=2)
    batch = next(iter(loader))
    assert set(batch) == {"tokens", "sample_index", "global_batch_position"}
    assert batch["tokens"].dtype == batch["sample_index"].dtype == torch.long
    assert batch["global_batch_position"].dtype == torch.long
    assert batch["tokens"].shape == (4, 32) and batch["sample_index"].shape == (4,)
    assert batch["global_batch_position"].tolist() == [0, 1, 2, 3]  # rank 0, micro-batch 0
    for index, row in zip(batch["sample_index"].tolist(), batch["tokens"], strict=True):
        np.testing.assert_array_equal(row.numpy(), all_samples[index])
    assert loader.num_samples == len(all_samples)


def test_exactly_once_across_two_ranks_and_two_workers(shards_dir):
    per_rank = []
    for rank in range(2):
        loader = make(shards_dir, dp_rank=rank, num_workers=2, num_microbatches=2, max_epochs=1)
        per_rank.append(take(loader, 10**9))
        assert loader.micro_step == loader.micro_batches_per_epoch
    n, g = loader.num_samples, loader.global_batch_size
    assert g == 16 and loader.samples_dropped_per_epoch == n % g
    assert len(per_rank[0]) == len(per_rank[1]) == (n // g) * 2  # equal step counts for DDP
    seen = [i for batches in per_rank for b in batches for i in b["sample_index"]]
    assert len(seen) == len(set(seen)) == n - n % g  # no sample twice, the remainder left out
    assert set(seen) <= set(range(n))
    for step in range(n // g):  # the positions of every global batch: 0..G-1, once each
        positions = [
            p
            for batches in per_rank
            for b in batches[2 * step : 2 * step + 2]
            for p in b["global_batch_position"]
        ]
        assert sorted(positions) == list(range(g))
    # Worker processes change nothing about the order.
    assert take(make(shards_dir, dp_rank=1, num_microbatches=2, max_epochs=1), 10**9) == per_rank[1]


def test_epochs_reshuffle_and_each_covers_the_split(shards_dir):
    loader = make(shards_dir, dp_size=1, micro_batch_size=50, max_epochs=3)
    epochs = [[], [], []]
    for batch in loader:
        epoch = (loader.micro_step - 1) // loader.micro_batches_per_epoch  # of the batch just read
        epochs[epoch].extend(batch["sample_index"].tolist())
    n, dropped = loader.num_samples, loader.samples_dropped_per_epoch
    for order in epochs:
        assert len(order) == len(set(order)) == n - dropped
    assert epochs[0] != epochs[1] != epochs[2]
    left_out = [set(range(n)) - set(order) for order in epochs]
    assert all(len(s) == dropped for s in left_out) and left_out[0] != left_out[1]
    assert take(loader, 1) == []  # max_epochs reached
    loader.reset(epoch=1)
    assert [i for b in take(loader, 2) for i in b["sample_index"]] == epochs[1][:100]


def global_batches(shards_dir, dp_size, micro_batch_size, num_microbatches, steps):
    """{(global step, position): sample index} over `steps` global batches, all ranks."""
    table = {}
    for rank in range(dp_size):
        loader = make(
            shards_dir,
            dp_rank=rank,
            dp_size=dp_size,
            micro_batch_size=micro_batch_size,
            num_microbatches=num_microbatches,
        )
        for t, batch in enumerate(take(loader, steps * num_microbatches)):
            for p, i in zip(batch["global_batch_position"], batch["sample_index"], strict=True):
                assert (t // num_microbatches, p) not in table
                table[(t // num_microbatches, p)] = i
    return table


def test_global_batches_do_not_depend_on_the_parallel_layout(shards_dir):
    reference = global_batches(shards_dir, 1, 4, 2, steps=5)  # G = 8 everywhere
    assert len(reference) == 40
    for dp_size, micro, micro_batches in [(2, 2, 2), (4, 2, 1), (2, 4, 1), (1, 1, 8)]:
        assert global_batches(shards_dir, dp_size, micro, micro_batches, steps=5) == reference
    assert global_batches(shards_dir, 2, 2, 4, steps=3) != global_batches(shards_dir, 2, 2, 2, 3)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_the_uninterrupted_stream(shards_dir, workers):
    common = dict(dp_rank=1, num_microbatches=3, num_workers=workers)
    per_epoch = make(shards_dir, **common).micro_batches_per_epoch
    total = per_epoch + 9
    uninterrupted = take(make(shards_dir, **common), total)
    for cut in (5, per_epoch - 2, per_epoch):  # mid-epoch, just before and at the boundary
        first = make(shards_dir, **common)
        head = take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
        resumed = make(shards_dir, **{**common, "num_workers": 2 - workers})
        resumed.load_state_dict(state)
        assert head + take(resumed, total - cut) == uninterrupted, cut
    # Re-iterating the same loader continues where the previous iterator stopped.
    loader = make(shards_dir, **common)
    assert take(loader, 4) + take(loader, 4) == uninterrupted[:8]


def test_resume_under_another_dp_size_at_a_global_batch_boundary(shards_dir):
    reference = global_batches(shards_dir, 2, 2, 2, steps=8)
    old = make(shards_dir, dp_rank=0, dp_size=2, micro_batch_size=2, num_microbatches=2)
    take(old, 5 * 2)  # five global batches
    state = old.state_dict()
    assert (state["global_step"], state["microbatch"]) == (5, 0)
    for rank in range(4):
        new = make(shards_dir, dp_rank=rank, dp_size=4, micro_batch_size=2, num_microbatches=1)
        new.load_state_dict(state)
        for t, batch in enumerate(take(new, 3)):
            for p, i in zip(batch["global_batch_position"], batch["sample_index"], strict=True):
                assert reference[(5 + t, p)] == i
    take(old, 1)
    with pytest.raises(ValueError, match="cannot resume mid-global-batch"):
        make(shards_dir, dp_size=4, micro_batch_size=2).load_state_dict(old.state_dict())
    with pytest.raises(ValueError, match="seed 7 .*this loader: 8"):
        make(shards_dir, seed=8).load_state_dict(make(shards_dir).state_dict())
    with pytest.raises(ValueError, match="global_batch_size 8 .*this loader: 16"):
        make(shards_dir, num_microbatches=2).load_state_dict(make(shards_dir).state_dict())


def test_remainder_wrap_repeats_and_counts(shards_dir):
    loader = make(shards_dir, remainder="wrap", dp_size=3, micro_batch_size=7, max_epochs=1)
    n, g = loader.num_samples, loader.global_batch_size
    assert loader.steps_per_epoch == -(-n // g)
    assert loader.samples_repeated_per_epoch == loader.steps_per_epoch * g - n
    seen = Counter()
    for rank in range(3):
        ranked = make(
            shards_dir, remainder="wrap", dp_size=3, micro_batch_size=7, dp_rank=rank, max_epochs=1
        )
        seen.update(i for b in take(ranked, 10**9) for i in b["sample_index"])
    assert set(seen) == set(range(n))
    assert sum(c - 1 for c in seen.values()) == loader.samples_repeated_per_epoch


def test_validation_split_in_order_and_too_small_splits(shards_dir):
    loader = make(
        shards_dir, split="validation", dp_size=1, micro_batch_size=2, shuffle=False, max_epochs=1
    )
    order = [i for b in take(loader, 10**9) for i in b["sample_index"]]
    assert order == list(range(loader.num_samples - loader.num_samples % 2))
    with pytest.raises(ValueError, match="split 'validation'.*fewer than one global batch"):
        make(shards_dir, split="validation", micro_batch_size=loader.num_samples)
    with pytest.raises(ManifestError, match="no split 'test' \\(splits: train, validation\\)"):
        make(shards_dir, split="test")
    with pytest.raises(ValueError, match="dp_rank 2 is not in"):
        make(shards_dir, dp_rank=2)


def test_stale_iterator_is_refused(shards_dir):
    loader = make(shards_dir)
    first = iter(loader)
    next(first)
    second = iter(loader)
    next(second)
    with pytest.raises(RuntimeError, match="stale"):
        next(first)


def test_tokenizer_and_length_mismatch_are_refused(shards_dir, tokenizer_dir):
    fingerprint = load_tokenizer(tokenizer_dir).fingerprint()
    make(shards_dir, expected_tokenizer_fingerprint=fingerprint, expected_seq_length=32)
    with pytest.raises(
        ManifestError, match="tokenizer fingerprint .* but the tokenizer in use has 0+"
    ):
        make(shards_dir, expected_tokenizer_fingerprint="0" * 64)
    with pytest.raises(ManifestError, match="seq_length 32, but seq_length 64 is expected"):
        make(shards_dir, expected_seq_length=64)


@pytest.fixture
def damaged(tmp_path, shards_dir):
    copy = tmp_path / "shards"
    shutil.copytree(shards_dir, copy)
    return copy


def test_truncated_or_missing_shard_is_refused(damaged):
    shard = damaged / "train-000002.tar"
    original = shard.read_bytes()
    shard.write_bytes(original[:50_000])
    with pytest.raises(
        ManifestError, match=r"train-000002\.tar: shard is 50000 bytes but manifest"
    ):
        make(damaged)
    # Even unverified, reading past the cut names the file instead of returning garbage.
    loader = make(damaged, verify="none", dp_size=1, micro_batch_size=100, shuffle=False)
    with pytest.raises(ShardError, match=r"train-000002\.tar: truncated — sample 2\d\d"):
        take(loader, 3)
    shard.write_bytes(original)
    (damaged / "train-000003.tar").unlink()
    with pytest.raises(ManifestError, match=r"train-000003\.tar: shard listed in .* is missing"):
        make(damaged, verify="size")


def test_corrupt_shard_is_refused(damaged):
    shard = damaged / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01  # inside the first sample's payload
    shard.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"train-000001\.tar: sha256 .* does not match"):
        make(damaged)  # verify="auto" hashes small splits
    data[700] ^= 0x01
    data[5] ^= 0xFF  # inside the first member's tar header name
    shard.write_bytes(bytes(data))
    loader = make(damaged, verify="size", dp_size=1, micro_batch_size=50, shuffle=False)
    with pytest.raises(
        ShardError,
        match=r"train-000001\.tar: corrupt shard — at byte 0 expected "
        r"member '000000000100\.tokens\.npy'",
    ):
        take(loader, 3)


def test_out_of_vocabulary_ids_are_refused(damaged):
    shard = damaged / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[512 + 128 : 512 + 130] = b"\xff\xff"  # first token of sample 0 -> 65535
    shard.write_bytes(bytes(data))
    loader = make(damaged, verify="none", dp_size=1, micro_batch_size=1, shuffle=False)
    with pytest.raises(ShardError, match="token id 65535 >= vocab_size 400"):
        take(loader, 1)


def test_unreadable_manifests(tmp_path, shards_dir):
    with pytest.raises(ManifestError, match="no manifest; write one with bd3-prepare-data"):
        make(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="invalid JSON"):
        make(tmp_path)
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sequences"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ManifestError, match="shard train-000001.tar starts at sample 100, expected 101"
    ):
        make(tmp_path)
