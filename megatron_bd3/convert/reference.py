"""Standalone model directory <-> reference BD3LM Hugging Face directory, with a parity check
against the reference network evaluated directly from its (unfolded, adaLN) weights.

The folding itself is megatron_bd3.standalone.reference_format's; this module adds directory
handling (staged output, tokenizer files, the Hugging Face code files and model card of
megatron_bd3.convert.hf, so the directory loads with the Auto classes) and the check. The
tokenizer travels only when its fingerprint is the one the model records. Torch only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_bd3.convert.hf import model_tokenizer, write_hf_support
from megatron_bd3.convert.model_card import copy_training_record, write_model_card
from megatron_bd3.convert.output import ConversionResult, staged_output
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
    eval_report: str | Path | None = None,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    overwrite: bool = False,
) -> ConversionResult:
    """Standalone directory -> reference HF directory (config.json with model_type "bd3lm",
    model.safetensors with `backbone.*` keys). `cond_dim` and `dropout` only fill the reference
    config (the adaLN weights are written as zeros with the folded constants as biases).
    The directory also loads with transformers' Auto classes (megatron_bd3.convert.hf)."""
    source = Path(standalone_dir)
    network = BD3Network.from_pretrained(source)
    tokenizer = model_tokenizer(source, network.config)
    result = ConversionResult(Path(output_dir), source)
    with staged_output(output_dir, overwrite) as tmp:
        save_reference(network, tmp, cond_dim=cond_dim, dropout=dropout)
        result.notes += write_hf_support(tmp, network, tokenizer, layout="reference DiT layout",
                                         source=source, eval_report=eval_report)
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
    eval_report: str | Path | None = None,
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
    tokenizer = model_tokenizer(source, network.config)
    result = ConversionResult(Path(output_dir), source)
    with staged_output(output_dir, overwrite) as tmp:
        network.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
            result.notes.append(f"tokenizer from {source}")
        write_model_card(tmp, network, hugging_face=False, layout="standalone directory",
                         record=copy_training_record(source, tmp), eval_report=eval_report)
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

