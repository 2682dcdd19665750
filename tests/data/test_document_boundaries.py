"""Document boundaries for document masking: the packer's document starts, their storage in the
shards, and the loader's per-token document ids across sequence and shard edges."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from megatron_bd3.data.loader import BD3DataLoader
from megatron_bd3.data.manifest import ManifestError, load_manifest
from megatron_bd3.data.packing import TRAIN, SequencePacker, document_split
from megatron_bd3.data.sources import SourceOptions
from megatron_bd3.data.tokenizer import load_tokenizer
from megatron_bd3.data.writer import PrepareOptions, prepare_shards

BOS, EOS = 1, 2


def expected_ids(documents, seq_length, insert_eos, insert_special):
    """Per-sequence document ids written out plainly: label every token of the stream with its
    document's index, cut as the reference wraps, then renumber each sequence's labels from 0
    (BOS/EOS framing joins the first/last document of its sequence)."""
    labels: list[int] = []
    for index, doc in enumerate(documents):
        labels += [index] * (len(doc) + (1 if insert_eos else 0))
    size = seq_length - 2 if insert_special else seq_length
    out = []
    for start in range(0, len(labels) - size + 1, size):
        chunk = labels[start:start + size]
        if insert_special:
            chunk = [chunk[0], *chunk, chunk[-1]]
        out.append([sorted(set(chunk)).index(label) for label in chunk])
    return out


@pytest.mark.parametrize("insert_eos", [True, False])
@pytest.mark.parametrize("insert_special", [False, True])
def test_packer_document_starts_follow_the_documents_not_the_tokens(insert_eos, insert_special):
    rng = np.random.default_rng(3)
    # Token ids include EOS and BOS inside the text: boundaries must not come from token values.
    documents = [list(rng.integers(0, 6, size=rng.integers(0, 30))) for _ in range(50)]
    packer = SequencePacker(
        11, bos_id=BOS, eos_id=EOS, insert_eos=insert_eos, insert_special=insert_special
    )
    produced = []
    for doc in documents:
        sequences, starts = packer.add_with_document_starts(np.array(doc))
        assert sequences.shape == starts.shape and starts.dtype == np.uint8
        produced += [(np.cumsum(row) - row[0]).tolist() for row in starts]
    assert produced == expected_ids(documents, 11, insert_eos, insert_special)
    assert len(produced) > 10


@pytest.fixture(scope="module")
def boundary_shards(tmp_path_factory, tokenizer_dir, small_corpus):
    """The small corpus at L = 32 with document boundaries, 7 samples per shard (many shard
    edges inside documents)."""
    directory = tmp_path_factory.mktemp("boundary_shards")
    options = PrepareOptions(
        seq_length=32, samples_per_shard=7, val_fraction=0.1, document_boundaries=True,
        source=SourceOptions(text_mode="paragraph"), progress=False,
    )
    prepare_shards([str(small_corpus[0])], tokenizer_dir, directory, options)
    return directory, options


def train_document_starts(documents, tokenizer, options) -> np.ndarray:
    """Flags over the whole train stream, from the documents themselves: 1 at the first token
    of each train document (its tokens, then EOS)."""
    flags = []
    for text in documents:
        if document_split(text, options.val_fraction, options.split_seed) != TRAIN:
            continue
        length = len(tokenizer.encode(text)) + 1
        flags += [1] + [0] * (length - 1)
    return np.array(flags)


def test_loader_document_ids_across_sequence_and_shard_edges(boundary_shards, tokenizer_dir,
                                                             small_corpus):
    directory, options = boundary_shards
    manifest = load_manifest(directory)
    assert manifest.document_starts and len(manifest.split("train")["shards"]) > 3
    starts = train_document_starts(small_corpus[1], load_tokenizer(tokenizer_dir), options)
    loader = BD3DataLoader(directory, "train", micro_batch_size=5, dp_rank=0, dp_size=1, seed=3,
                           max_epochs=1, document_ids=True, num_workers=2)
    seen = 0
    for batch in loader:
        assert batch["document_ids"].shape == batch["tokens"].shape
        for index, ids in zip(batch["sample_index"].tolist(), batch["document_ids"].tolist(),
                              strict=True):
            flags = starts[index * 32:(index + 1) * 32]
            assert ids == (np.cumsum(flags) - flags[0]).tolist(), index
            seen += 1
    assert seen == loader.num_samples - loader.samples_dropped_per_epoch
    # Some samples begin inside a document, some have a document edge inside.
    rows = [starts[i * 32:(i + 1) * 32] for i in range(loader.num_samples)]
    assert any(row[0] == 0 for row in rows) and any(row[1:].any() for row in rows)


def test_stored_members_are_webdataset_pairs(boundary_shards):
    directory, _ = boundary_shards
    with tarfile.open(sorted(directory.glob("train-*.tar"))[0]) as tar:
        names = tar.getnames()
        starts = np.load(io.BytesIO(tar.extractfile(names[1]).read()))
    assert names[:4] == ["000000000000.tokens.npy", "000000000000.document_starts.npy",
                         "000000000001.tokens.npy", "000000000001.document_starts.npy"]
    assert starts.dtype == np.uint8 and starts.shape == (32,)


def test_document_ids_need_shards_with_boundaries(shards_dir):
    with pytest.raises(ManifestError, match="--document-boundaries"):
        BD3DataLoader(shards_dir, "train", micro_batch_size=4, dp_rank=0, dp_size=1, seed=1,
                      document_ids=True)
    plain = BD3DataLoader(shards_dir, "train", micro_batch_size=4, dp_rank=0, dp_size=1, seed=1)
    assert "document_ids" not in next(iter(plain))
