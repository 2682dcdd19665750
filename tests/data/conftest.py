"""Shared, session-scoped fixtures of the data tests: a tiny tokenizer and small prepared shards.

Everything is built from the embedded default corpus (no network, no ../shared): a sentencepiece
model with vocab 400 trains in well under a second.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from megatron_bd3.data.corpus import default_corpus_path
from megatron_bd3.data.sources import SourceOptions
from megatron_bd3.data.tokenizer_training import SentencePieceOptions, train_sentencepiece
from megatron_bd3.data.writer import PrepareOptions, prepare_shards

TINY_VOCAB = 400


def lee_documents() -> list[str]:
    """The default corpus read directly from its file (independently of corpus.py)."""
    text = default_corpus_path().read_bytes().decode("utf-8")
    return [line.strip() for line in text.split("\n") if line.strip()]


def write_paragraph_file(path: Path, documents: list[str]) -> Path:
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


def read_tar_samples(paths: list[Path]) -> dict[int, np.ndarray]:
    """Index -> tokens of every sample, read with tarfile + np.load (not the code under test)."""
    import io

    samples: dict[int, np.ndarray] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                assert ext == "tokens.npy", member.name
                data = tar.extractfile(member).read()
                samples[int(key)] = np.load(io.BytesIO(data), allow_pickle=False)
    return samples


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer = train_sentencepiece(
        lee_documents(), SentencePieceOptions(vocab_size=TINY_VOCAB, model_type="bpe")
    )
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """The first 60 Lee documents as a paragraph-mode text file."""
    documents = lee_documents()[:60]
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    return write_paragraph_file(path, documents), documents


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, tokenizer_dir, small_corpus) -> Path:
    """Shards of the small corpus: L=32, 100 samples per shard, 10% validation documents."""
    directory = tmp_path_factory.mktemp("shards")
    prepare_shards(
        [str(small_corpus[0])],
        tokenizer_dir,
        directory,
        PrepareOptions(
            seq_length=32,
            samples_per_shard=100,
            val_fraction=0.1,
            source=SourceOptions(text_mode="paragraph"),
            progress=False,
        ),
    )
    return directory
