"""Every random number generator a rank uses, captured and restored exactly.

Python `random`, numpy's global generator, torch's CPU generator, every CUDA device's generator
and megatron's model-parallel RNG tracker (its named "CUDA" streams; on CPU the compatibility
layer backs them with CPU generator states). Stored per rank: TP ranks differ in the tracker,
PP stages in every seed.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "megatron_tracker": None,
    }
    try:
        from megatron.core import tensor_parallel

        tracker = tensor_parallel.get_cuda_rng_tracker()
        states = tracker.get_states()
        state["megatron_tracker"] = {k: v.clone() for k, v in states.items()}
    except (ImportError, AttributeError, RuntimeError):
        pass
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if state.get("cuda") is not None:
        if not torch.cuda.is_available():
            raise RuntimeError("checkpoint holds CUDA RNG states but CUDA is not available")
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("megatron_tracker"):
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def step_seed(seed: int, step: int) -> int:
    """A seed derived from (seed, step), for RNG streams re-derived at an elastic resume."""
    digest = hashlib.sha256(f"megatron_bd3 rng {seed} {step}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
