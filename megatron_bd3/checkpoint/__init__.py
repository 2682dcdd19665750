"""Atomic, resumable checkpoints and resharding of model weights.

atomic    temporary directory -> fsync -> complete.json marker -> rename -> `latest`
rng       every RNG state of a rank (python, numpy, torch CPU/CUDA, megatron tracker)
manager   save/load a training run, in its own layout or onto another (elastic resume); load
          weights into a different TP/PP layout
reshard   the layout-independent optimizer and EMA state an elastic resume loads
"""

from megatron_bd3.checkpoint.atomic import CheckpointError, read_latest, verify_checkpoint
from megatron_bd3.checkpoint.manager import (
    load_model_weights,
    load_training_state,
    resolve_resume,
    save_training_state,
)

__all__ = [
    "CheckpointError",
    "load_model_weights",
    "load_training_state",
    "read_latest",
    "resolve_resume",
    "save_training_state",
    "verify_checkpoint",
]
