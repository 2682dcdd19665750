"""Data for BD3-LM: tokenizers, input documents, token shards, the resumable loader, the corpus.

Modules, one job each:
    tokenizer           BD3Tokenizer over sentencepiece / HF tokenizer.json; load_tokenizer
    tokenizer_training  train a sentencepiece model with the BD3 special ids
    corpus              the embedded default corpus (real text shipped inside gensim's wheel)
    sources             input files (text / jsonl(.gz) / parquet) -> documents, skip counts
    packing             train/validation split by document; EOS + wrapping into L-token sequences
    shards              deterministic webdataset tar shards, random access by sample index
    manifest            manifest.json: what the shards hold; checks against tokenizer, L, sha256
    writer              prepare_shards: the pipeline behind bd3-prepare-data
    layout              epoch permutations and global-batch positions (pure index arithmetic)
    loader              BD3DataLoader (imports torch; the other modules do not)
"""

from __future__ import annotations

import importlib
from typing import Any

# Public names -> defining module. Imported on first use: `import megatron_bd3.data.corpus` stays
# stdlib-only, the data tools' worker processes do not import torch, and nothing pays for numpy,
# sentencepiece or torch it does not use.
_EXPORTS = {
    "BD3DataLoader": "loader",
    "BD3Tokenizer": "tokenizer",
    "TokenizerError": "tokenizer",
    "load_tokenizer": "tokenizer",
    "Manifest": "manifest",
    "ManifestError": "manifest",
    "load_manifest": "manifest",
    "default_corpus_documents": "corpus",
    "default_corpus_path": "corpus",
    "write_default_corpus": "corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"megatron_bd3.data.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'megatron_bd3.data' has no attribute {name!r}")
