"""Shared pieces of the model tests: tiny configs, a reference mask, batches, weight splitting.

Everything numerical here is written independently of megatron_bd3.model (the code under test):
the block-diffusion mask is built from block matrices (docs/method.md §1.1, M_full =
[[M_BD, M_OBC], [0, M_BC]]) rather than from the predicate in megatron_bd3.diffusion.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_bd3.model import reference_architecture
from megatron_bd3.parallel import cpu_safe_config_overrides

SEQ_LENGTH = 16
BLOCK_SIZE = 4
VOCAB_SIZE = 100  # mask id 99; padded to 112 at TP=1 and to 128 at TP=2 (divisible_by 16)
MASK_ID = 99


def tiny_overrides(**extra: Any) -> dict[str, Any]:
    """Small reference-architecture model, no dropout, CPU-safe megatron settings."""
    settings: dict[str, Any] = reference_architecture(dropout=0.0)
    settings.update(
        seq_length=SEQ_LENGTH,
        block_size=BLOCK_SIZE,
        vocab_size=VOCAB_SIZE,
        mask_token_id=MASK_ID,
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        make_vocab_size_divisible_by=16,
        attention_kernel="sdpa",
        init_method_std=0.2,  # large weights so attention patterns matter in the comparisons
    )
    settings.update(cpu_safe_config_overrides())
    settings.update(extra)
    return settings


def reference_bd3_mask(seq_length: int, block_size: int) -> torch.Tensor:
    """[2L, 2L] bool, True = may attend, from block matrices (independent of the predicate)."""
    n = seq_length // block_size
    tile = torch.ones(block_size, block_size)
    block_diagonal = torch.kron(torch.eye(n), tile)
    offset_block_causal = torch.kron(torch.tril(torch.ones(n, n), diagonal=-1), tile)
    block_causal = torch.kron(torch.tril(torch.ones(n, n)), tile)
    zeros = torch.zeros(seq_length, seq_length)
    top = torch.cat([block_diagonal, offset_block_causal], dim=1)
    bottom = torch.cat([zeros, block_causal], dim=1)
    return torch.cat([top, bottom], dim=0).bool()


def block_causal_mask(length: int, block_size: int) -> torch.Tensor:
    """[n, n] True = may attend: key block <= query block (single stream)."""
    n = length // block_size
    return torch.kron(torch.tril(torch.ones(n, n)), torch.ones(block_size, block_size)).bool()


def single_stream_logits(model, tokens, attention_mask, positions=None) -> torch.Tensor:
    """One stream of n tokens through a single-stage BD3Model's modules under a caller's own
    mask (bool, True = may attend, or AttentionPattern.CAUSAL): logits [b, n, vocab_size].

    What a sampler or evaluator does with the network: embedding, the decoder with the mask
    handed down to every core attention, final norm, output layer, padding cut off. positions
    ([n], RoPE) default to 0 .. n-1."""
    n = tokens.size(1)
    if positions is None:
        positions = torch.arange(n)
    table = model.rotary_pos_emb(int(positions.max()) + 1)  # [span, 1, 1, d]
    hidden = model.embedding(input_ids=tokens, position_ids=None)  # [n(/tp), b, h]
    hidden = model.decoder(
        hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=table[positions]
    )
    logits = model._x_t_logits(hidden, n)  # [n, b, V/tp] (gathered over sequence parallel)
    return model._gather_vocab(logits.transpose(0, 1))  # [b, n, vocab_size]


def random_batch(
    batch: int, seed: int, seq_length: int = SEQ_LENGTH, mask_rate: float = 0.5
) -> dict[str, torch.Tensor]:
    """A BD3 batch dict with random clean tokens, Bernoulli masking and positive weights."""
    gen = torch.Generator().manual_seed(seed)
    x_0 = torch.randint(0, MASK_ID, (batch, seq_length), generator=gen)
    masked = torch.rand(batch, seq_length, generator=gen) < mask_rate
    masked[:, 1] = True  # at least one masked token per row
    x_t = torch.where(masked, torch.full_like(x_0, MASK_ID), x_0)
    loss_weight = 1.0 + torch.rand(batch, seq_length, generator=gen)
    loss_mask = torch.ones(batch, seq_length)
    loss_mask[:, 0] = 0.0  # like evaluation with ignore_bos
    return {
        "x_0": x_0,
        "x_t": x_t,
        "masked": masked,
        "loss_weight": loss_weight,
        "loss_mask": loss_mask,
    }


# -- tensor-parallel splitting of a full (TP=1) state dict, written from megatron's layouts -----

COLUMN_PARALLEL = ("linear_qkv.weight", "linear_fc1.weight", "linear_fc1.bias", "output_layer.")
ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def tp_partition_dim(name: str) -> int | None:
    """Dimension a parameter is split on under TP (None = replicated)."""
    if name.startswith("embedding.word_embeddings.") or any(k in name for k in COLUMN_PARALLEL):
        return 0
    if any(k in name for k in ROW_PARALLEL):
        return 1
    return None


def pad_vocab(name: str, tensor: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """Zero-pad the vocab rows of embedding/output tensors to `padded_vocab`."""
    if name.startswith("embedding.word_embeddings.") or name.startswith("output_layer."):
        extra = padded_vocab - tensor.shape[0]
        if extra > 0:
            tensor = torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])], dim=0)
    return tensor


def tp_shard(name: str, tensor: torch.Tensor, rank: int, size: int, padded_vocab: int):
    tensor = pad_vocab(name, tensor, padded_vocab)
    dim = tp_partition_dim(name)
    if dim is None:
        return tensor.clone()
    return tensor.chunk(size, dim=dim)[rank].clone()
