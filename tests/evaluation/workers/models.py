"""Tiny models for the evaluation tests: a sentencepiece tokenizer trained on the embedded corpus,
a BD3 network that samples with it, and an AR scorer (block size 1) that shares it. Each model
directory holds its tokenizer in ``tokenizer/``, as bd3-convert writes it."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_bd3.data.corpus import default_corpus_path
from megatron_bd3.data.tokenizer_training import SentencePieceOptions, train_sentencepiece
from tests.standalone.helpers import tiny_network

VOCAB_SIZE = 300


def corpus_tokenizer():
    lines = default_corpus_path().read_text(encoding="utf-8").splitlines()
    return train_sentencepiece([line for line in lines if line.strip()][:200],
                               SentencePieceOptions(vocab_size=VOCAB_SIZE))


def special_ids(tokenizer) -> dict:
    ids = tokenizer.special_ids
    return dict(vocab_size=tokenizer.vocab_size, mask_token_id=ids["mask_id"],
                bos_token_id=ids["bos_id"], eos_token_id=ids["eos_id"],
                pad_token_id=ids["pad_id"])


def save_model_dir(directory: Path, tokenizer, seed: int, eos_boost: float = 0.0,
                   **overrides) -> Path:
    """A tiny network with the tokenizer's ids, saved with its tokenizer; ``eos_boost`` raises
    the EOS logit so that EOS stops happen."""
    network = tiny_network(seed=seed, **special_ids(tokenizer), **overrides)
    with torch.no_grad():
        network.output.bias[tokenizer.eos_id] += eos_boost
    network.save_pretrained(directory)
    tokenizer.save(Path(directory) / "tokenizer")
    return Path(directory)


def sampler_model_dir(directory: Path, tokenizer) -> Path:
    """Block size 4, context 16: samples of 40 tokens cross the context; with top-p 0.9 and
    the EOS stop, some samples stop at an EOS and some run to the length."""
    return save_model_dir(directory, tokenizer, seed=11, eos_boost=7.5)


def ar_scorer_dir(directory: Path, tokenizer) -> Path:
    """Block size 1 (the AR preset's network), context 16."""
    return save_model_dir(directory, tokenizer, seed=12, block_size=1)
