"""Tiny standalone models for the tests (random weights large enough to give peaked, non-trivial
distributions)."""

from __future__ import annotations

import torch

from megatron_bd3.standalone import BD3Network, NetworkConfig


def tiny_config(**overrides) -> NetworkConfig:
    values = dict(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_query_groups=2,
        ffn_hidden_size=64, seq_length=16, block_size=4, mask_token_id=63,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    values.update(overrides)
    return NetworkConfig(**values)


def tiny_network(seed: int = 0, **overrides) -> BD3Network:
    """A random network whose LayerNorms and biases are non-trivial too."""
    generator = torch.Generator().manual_seed(seed)
    network = BD3Network(tiny_config(**overrides))
    with torch.no_grad():
        for name, param in network.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * noise)
            else:
                param.copy_(0.35 * noise)
    return network.eval()


def block_causal_mask(length: int, block_size: int) -> torch.Tensor:
    """Key block <= query block (written here, independently of the package)."""
    blocks = torch.arange(length) // block_size
    return blocks[None, :] <= blocks[:, None]
