"""Conversion between the trainer's checkpoints, the standalone model and the reference format.

    weights             the exact TP=1 megatron <-> standalone tensor mapping (torch only)
    config_map          megatron BD3Config <-> standalone NetworkConfig
    trainer_checkpoint  checkpoint_to_standalone / standalone_to_checkpoint (megatron in-process,
                        one rank, any saved TP/PP layout)
    reference           standalone <-> reference BD3LM Hugging Face directories
    reference_dit       the reference DiT evaluated from its own weights (for parity checks)
    parity              random noisy batches and the logits comparison every conversion runs

Chains: reference HF -> standalone -> checkpoint (fine-tune a released model with the trainer),
checkpoint -> standalone -> reference HF (publish in the reference layout). The CLI is
`bd3-convert` (megatron_bd3/cli/convert.py); see docs/convert.md.

Importing this package does not import megatron-core; `trainer_checkpoint` does on first use.
"""

from megatron_bd3.convert.parity import (
    DEFAULT_TOLERANCE,
    ParityError,
    ParityReport,
    compare_logits,
    random_noisy_batch,
)
from megatron_bd3.convert.weights import (
    MappingError,
    megatron_shapes,
    megatron_to_standalone,
    qkv_megatron_to_standalone,
    qkv_standalone_to_megatron,
    standalone_shapes,
    standalone_to_megatron,
)

__all__ = [
    "DEFAULT_TOLERANCE",
    "MappingError",
    "ParityError",
    "ParityReport",
    "checkpoint_to_standalone",
    "compare_logits",
    "megatron_shapes",
    "megatron_to_standalone",
    "qkv_megatron_to_standalone",
    "qkv_standalone_to_megatron",
    "random_noisy_batch",
    "reference_to_standalone",
    "standalone_shapes",
    "standalone_to_checkpoint",
    "standalone_to_megatron",
    "standalone_to_reference",
]


def __getattr__(name: str):
    # The conversions that need megatron (or import the module that does) load lazily.
    if name in ("checkpoint_to_standalone", "standalone_to_checkpoint"):
        from megatron_bd3.convert import trainer_checkpoint

        return getattr(trainer_checkpoint, name)
    if name in ("reference_to_standalone", "standalone_to_reference"):
        from megatron_bd3.convert import reference

        return getattr(reference, name)
    raise AttributeError(f"module 'megatron_bd3.convert' has no attribute {name!r}")
