"""Torch-only BD3-LM: the network, block-by-block sampling with a KV cache, and conversion to
and from the reference (kuleshov-group/bd3lms) Hugging Face weight layout.

Nothing here imports megatron or deepspeed: a trained model exported to a standalone directory
(``config.json`` + ``model.safetensors``) samples with torch alone.
"""

from megatron_bd3.standalone.model import BD3Network, KVCache, NetworkConfig
from megatron_bd3.standalone.sampler import Sample, SamplerConfig, generate, nucleus_filter

__all__ = [
    "NetworkConfig",
    "BD3Network",
    "KVCache",
    "Sample",
    "SamplerConfig",
    "generate",
    "nucleus_filter",
]
