"""Which fused kernels megatron-core will use here, found without importing megatron or apex.

megatron-core decides its layer norm with `try: import apex` (models/gpt/gpt_layer_specs.py:59,
models/backends.py:14): *any* importable module named `apex` makes it pick apex's
FusedLayerNorm. The package called `apex` on PyPI is an unrelated web toolkit, and NVIDIA apex
without its CUDA extensions cannot run FusedLayerNorm either, so both break model construction
with an obscure error. `check_apex` turns that into a clear one before megatron is imported.

Everything here inspects import specs and package directories only (`importlib.util.find_spec`
on a top-level name does not execute the package), so it is cheap and has no side effects.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

# Files only NVIDIA apex ships, relative to the apex package directory.
_NVIDIA_APEX_MARKERS = ("normalization/fused_layer_norm.py", "normalization/__init__.py")


class ApexConflictError(RuntimeError):
    """An importable `apex` that megatron-core would pick but cannot use."""


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _apex_package() -> tuple[str, Path | None]:
    """('absent' | 'nvidia' | 'unrelated', location) of the module named `apex`."""
    try:
        spec = importlib.util.find_spec("apex")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "absent", None
    locations = list(spec.submodule_search_locations or [])
    origin = Path(spec.origin) if spec.origin else None
    for location in locations:
        if all((Path(location) / marker).is_file() for marker in _NVIDIA_APEX_MARKERS):
            return "nvidia", Path(location)
    return "unrelated", Path(locations[0]) if locations else origin


def check_apex() -> str:
    """Raise `ApexConflictError` if megatron-core would pick an apex it cannot use.

    Returns 'absent' or 'nvidia' (NVIDIA apex with its fused layer norm extension).
    """
    kind, location = _apex_package()
    if kind == "unrelated":
        raise ApexConflictError(
            f"a package named 'apex' is importable from {location}, but it is not NVIDIA apex "
            f"(no apex/normalization/fused_layer_norm.py). megatron-core imports any module "
            f"called 'apex' and then uses apex's FusedLayerNorm, which fails. Fix: "
            f"`pip uninstall apex` (the PyPI 'apex' is an unrelated web toolkit); on GPU "
            f"machines install NVIDIA apex from https://github.com/NVIDIA/apex if you want its "
            f"fused kernels."
        )
    if kind == "nvidia" and not (
        torch.cuda.is_available() and _has_module("fused_layer_norm_cuda")
    ):
        reason = (
            "torch.cuda.is_available() is False"
            if not torch.cuda.is_available()
            else "its CUDA extension fused_layer_norm_cuda is not built"
        )
        raise ApexConflictError(
            f"NVIDIA apex is importable from {location}, so megatron-core will use apex's "
            f"FusedLayerNorm, but it cannot run here: {reason}. Fix: uninstall apex on machines "
            f"without CUDA, or rebuild it with its CUDA extensions (--cuda_ext)."
        )
    return kind


def detect_fused_kernels() -> dict[str, Any]:
    """Report the kernels megatron-core will use on this machine, or their torch fallbacks.

    Raises `ApexConflictError` when an importable `apex` would break megatron-core.
    Keys: cuda, apex ('absent'|'nvidia'), transformer_engine, fused_layer_norm, fused_adam,
    gradient_accumulation_fusion (bools), and layer_norm / adam (human-readable choices).
    """
    apex = check_apex()
    cuda = torch.cuda.is_available()
    transformer_engine = cuda and _has_module("transformer_engine")
    fused_layer_norm = apex == "nvidia"  # check_apex guarantees the extension and CUDA
    apex_adam = apex == "nvidia" and _has_module("amp_C")
    fused_adam = apex_adam or transformer_engine
    gradient_accumulation_fusion = cuda and _has_module("fused_weight_gradient_mlp_cuda")
    if transformer_engine:
        adam = "Transformer Engine FusedAdam"
    elif apex_adam:
        adam = "apex FusedAdam"
    else:
        adam = "torch Adam/AdamW (megatron's own optimizer needs CUDA; use DeepSpeed on CPU)"
    return {
        "cuda": cuda,
        "apex": apex,
        "transformer_engine": transformer_engine,
        "fused_layer_norm": fused_layer_norm,
        "fused_adam": fused_adam,
        "gradient_accumulation_fusion": gradient_accumulation_fusion,
        "layer_norm": (
            "apex FusedLayerNorm" if fused_layer_norm else "torch LayerNorm (WrappedTorchNorm)"
        ),
        "adam": adam,
    }


def log_kernel_choice(logger: logging.Logger) -> dict[str, Any]:
    """Log which kernels are in use (one line each) and return `detect_fused_kernels()`."""
    kernels = detect_fused_kernels()
    logger.info("kernels: CUDA %s", "available" if kernels["cuda"] else "not available")
    logger.info("kernels: layer norm = %s", kernels["layer_norm"])
    logger.info("kernels: adam = %s", kernels["adam"])
    logger.info(
        "kernels: gradient accumulation fusion %s",
        "available (fused_weight_gradient_mlp_cuda)"
        if kernels["gradient_accumulation_fusion"]
        else "unavailable (keep gradient_accumulation_fusion=False)",
    )
    logger.info(
        "kernels: Transformer Engine %s",
        "available" if kernels["transformer_engine"] else "not used",
    )
    return kernels
