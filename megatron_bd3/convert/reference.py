"""Standalone model directory <-> reference BD3LM Hugging Face directory, with a parity check
against the reference network evaluated directly from its (unfolded, adaLN) weights.

The folding itself is megatron_bd3.standalone.reference_format's; this module adds directory
handling (staged output, tokenizer files) and the check. Torch only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_bd3.convert.output import TOKENIZER_METADATA, ConversionResult, staged_output
from megatron_bd3.convert.parity import DEFAULT_TOLERANCE, compare_logits, random_noisy_batch
from megatron_bd3.convert.reference_dit import reference_training_logits
from megatron_bd3.standalone.model import BD3Network
from megatron_bd3.standalone.reference_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_reference,
    save_reference,
)

__all__ = ["reference_to_standalone", "standalone_to_reference"]


def _read_reference(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (a reference checkpoint directory needs it)")
    return load_file(str(weights_path)), json.loads(config_path.read_text())


def copy_tokenizer(source: Path, destination: Path) -> str | None:
    """Re-save the megatron_bd3 tokenizer of `source` (if it has one) into `destination`."""
    if not (source / TOKENIZER_METADATA).is_file():
        return None
    from megatron_bd3.data import load_tokenizer

    load_tokenizer(source).save(destination)
    return f"tokenizer copied from {source}"


def _batch_for(network: BD3Network, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = network.config
    return random_noisy_batch(c.vocab_size, c.mask_token_id, c.seq_length, c.block_size,
                              seed=seed)


def standalone_to_reference(
    standalone_dir: str | Path,
    output_dir: str | Path,
    *,
    cond_dim: int = 128,
    dropout: float = 0.1,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    overwrite: bool = False,
) -> ConversionResult:
    """Standalone directory -> reference HF directory (config.json with model_type "bd3lm",
    model.safetensors with `backbone.*` keys). `cond_dim` and `dropout` only fill the reference
    config (the adaLN weights are written as zeros with the folded constants as biases)."""
    source = Path(standalone_dir)
    network = BD3Network.from_pretrained(source)
    result = ConversionResult(Path(output_dir), source)
    with staged_output(output_dir, overwrite) as tmp:
        save_reference(network, tmp, cond_dim=cond_dim, dropout=dropout)
        note = copy_tokenizer(source, tmp)
        if note:
            result.notes.append(note)
        if check:
            tensors, config = _read_reference(tmp)
            x_t, x_0 = _batch_for(network, seed)
            with torch.no_grad():
                original = network.forward_train(x_t, x_0)
                converted = reference_training_logits(tensors, config, x_t, x_0)
            result.parity.append(compare_logits(
                original, converted, "standalone vs reference DiT (written weights)", tolerance))
    return result


def reference_to_standalone(
    reference_dir: str | Path,
    output_dir: str | Path,
    *,
    mask_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    overwrite: bool = False,
) -> ConversionResult:
    """Reference HF directory -> standalone directory (adaLN folded; the learned clip range is
    taken from the checkpoint's sampling_eps buffers). Special ids default to the reference
    config's (mask: its mask_token_id, else the last id, as in the released OWT models)."""
    source = Path(reference_dir)
    network = load_reference(source, mask_token_id=mask_token_id, bos_token_id=bos_token_id,
                             eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    result = ConversionResult(Path(output_dir), source)
    with staged_output(output_dir, overwrite) as tmp:
        network.save_pretrained(tmp)
        note = copy_tokenizer(source, tmp)
        if note:
            result.notes.append(note)
        if check:
            tensors, config = _read_reference(source)
            written = BD3Network.from_pretrained(tmp)
            x_t, x_0 = _batch_for(written, seed)
            with torch.no_grad():
                original = reference_training_logits(tensors, config, x_t, x_0)
                converted = written.forward_train(x_t, x_0)
            result.parity.append(compare_logits(
                original, converted, "reference DiT vs standalone (written weights)", tolerance))
    return result
