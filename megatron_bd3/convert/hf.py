"""Hugging Face model directories: what makes an export load with ``AutoConfig``,
``AutoModelForMaskedLM`` (``trust_remote_code=True``) and ``AutoTokenizer``, offline.

Every Hugging Face directory megatron_bd3 writes (``--to hf`` and ``--to reference``) carries

    config.json                 model_type "bd3lm", auto_map, return_dict false, the tokenizer
                                fingerprint
    model.safetensors           fp32 weights under ``backbone.*``
    configuration_bd3lm.py      copied from megatron_bd3/convert/hf_files (the one source)
    modeling_bd3lm.py
    tokenizer files             bd3_tokenizer.json + tokenizer.model (with tokenization_bd3lm.py)
                                or tokenizer.json, tokenizer_config.json, special_tokens_map.json
    README.md                   the model card (megatron_bd3.convert.model_card)
    bd3_training.json           the training record, when the weights came from a checkpoint

``--to hf`` stores megatron_bd3's own network (any architecture the standalone network runs:
grouped-query attention, biases, tied embeddings) under its standalone names
(``weight_layout: "megatron_bd3"``); ``--to reference`` stores the reference DiT layout
(megatron_bd3.convert.reference). The parity check of ``--to hf`` loads the written directory
through the Auto classes, so it needs transformers (the ``[hf]`` extra). docs/convert.md,
"Hugging Face".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_bd3.convert.hf_files import (
    CONFIGURATION_FILE,
    HF_FILES_DIR,
    MODELING_FILE,
    TOKENIZATION_FILE,
)
from megatron_bd3.convert.model_card import copy_training_record, write_model_card
from megatron_bd3.convert.output import ConversionResult, staged_output
from megatron_bd3.convert.parity import (
    DEFAULT_TOLERANCE,
    ParityReport,
    compare_logits,
    random_noisy_batch,
)
from megatron_bd3.standalone.model import CONFIG_FILE, WEIGHTS_FILE, BD3Network, NetworkConfig

__all__ = ["AUTO_MAP", "HF_WEIGHT_PREFIX", "hf_config", "load_auto_model", "model_tokenizer",
           "standalone_to_hf", "write_hf_support", "write_tokenizer"]

AUTO_MAP = {"AutoConfig": "configuration_bd3lm.BD3LMConfig",
            "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM"}
HF_WEIGHT_PREFIX = "backbone."

def hf_config(config: NetworkConfig) -> dict:
    """config.json of a ``--to hf`` directory: the reference's field names where the reference
    has the field, the standalone network's extra choices beside them."""
    out = {
        "model_type": "bd3lm",
        "architectures": ["BD3LM"],
        "auto_map": dict(AUTO_MAP),
        "weight_layout": "megatron_bd3",
        "block_size": config.block_size,
        "vocab_size": config.vocab_size,
        "model_length": config.seq_length,
        "cross_attn": True,
        "adaln": False,
        "attn_backend": "sdpa",
        "causal": False,
        "hidden_dim": config.hidden_size,
        "n_blocks": config.num_layers,
        "n_heads": config.num_heads,
        "n_query_groups": config.num_query_groups,
        "ffn_hidden_dim": config.ffn_hidden_size,
        "dropout": 0.0,
        "time_conditioning": False,
        "var_min": True,
        "sampling_eps_min": config.sampling_eps_min,
        "sampling_eps_max": config.sampling_eps_max,
        "mask_token_id": config.mask_token_id,
        "qkv_bias": config.qkv_bias,
        "attn_out_bias": config.attn_out_bias,
        "mlp_bias": config.mlp_bias,
        "output_bias": config.output_bias,
        "tie_embeddings": config.tie_embeddings,
        "rotary_base": config.rotary_base,
        "layernorm_eps": config.layernorm_eps,
        "tokenizer_fingerprint": config.tokenizer_fingerprint,
        "return_dict": False,
        "torch_dtype": "float32",
    }
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, name) is not None:
            out[name] = getattr(config, name)
    return out


def model_tokenizer(directory: Path, config: NetworkConfig):
    """The tokenizer saved with a model directory (None if it has none), refused when its
    fingerprint is not the one ``config`` records."""
    from megatron_bd3.data.tokenizer import find_model_tokenizer

    return find_model_tokenizer(directory, None, config.tokenizer_fingerprint)


def write_tokenizer(tokenizer, directory: Path) -> list[str]:
    """megatron_bd3's tokenizer files plus what ``AutoTokenizer`` reads; returns the names."""
    from megatron_bd3.data.tokenizer import SentencePieceTokenizer

    tokenizer.save(directory)
    written = tokenizer.save_for_transformers(directory)
    if isinstance(tokenizer, SentencePieceTokenizer):
        shutil.copyfile(HF_FILES_DIR / TOKENIZATION_FILE, directory / TOKENIZATION_FILE)
        written.append(TOKENIZATION_FILE)
    return written


def write_hf_support(directory: Path, network: BD3Network, tokenizer, *, layout: str,
                     source: Path, eval_report: str | Path | None) -> list[str]:
    """Everything of a Hugging Face directory besides config.json and the weights: the code
    files, the tokenizer, the training record and the model card. Returns notes."""
    notes = []
    for name in (CONFIGURATION_FILE, MODELING_FILE):
        shutil.copyfile(HF_FILES_DIR / name, directory / name)
    if tokenizer is not None:
        write_tokenizer(tokenizer, directory)
        notes.append(f"tokenizer from {source} (fingerprint {tokenizer.fingerprint()[:16]}...), "
                     "with the files AutoTokenizer reads")
    else:
        notes.append(f"no tokenizer in {source}: the directory carries none")
    write_model_card(directory, network, hugging_face=True, layout=layout,
                     record=copy_training_record(source, directory), eval_report=eval_report)
    return notes


def load_auto_model(directory: str | Path):
    """The directory loaded as a user loads it: ``AutoModelForMaskedLM`` with the directory's
    own code, offline, fp32, in eval mode."""
    try:
        from transformers import AutoModelForMaskedLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ImportError("loading a Hugging Face directory needs transformers: pip install "
                          "'megatron_bd3[hf]' (or skip the check with --no-check)") from None
    hf_logging.disable_progress_bar()  # a per-tensor loading bar says nothing here
    try:
        model = AutoModelForMaskedLM.from_pretrained(str(directory), trust_remote_code=True,
                                                     local_files_only=True, dtype=torch.float32)
    finally:
        hf_logging.enable_progress_bar()
    return model.eval()


def check_auto_parity(network: BD3Network, directory: Path, tolerance: float,
                      seed: int) -> list[ParityReport]:
    """The written directory, loaded through the Auto classes, against ``network``: the
    two-stream training logits on a random noisy batch, and a cached sampling call (two clean
    blocks stored, then a noisy block) against one block-causal pass."""
    c = network.config
    model = load_auto_model(directory)
    x_t, x_0 = random_noisy_batch(c.vocab_size, c.mask_token_id, c.seq_length, c.block_size,
                                  seed=seed)
    reports = []
    with torch.no_grad():
        reports.append(compare_logits(network.forward_train(x_t, x_0),
                                      model(torch.cat((x_t, x_0), dim=1), return_dict=False),
                                      "standalone vs AutoModelForMaskedLM (two-stream)",
                                      tolerance))
        blocks = min(3, c.seq_length // c.block_size)
        tokens = x_0[:, :blocks * c.block_size].clone()
        tokens[:, -c.block_size:] = x_t[:, (blocks - 1) * c.block_size:blocks * c.block_size]
        index = torch.arange(tokens.shape[1]) // c.block_size
        full = network.forward(tokens, attn_mask=index[None, :] <= index[:, None])
        model.reset_kv_cache(tokens.shape[0])
        stored = (blocks - 1) * c.block_size
        if stored:
            model(tokens[:, :stored], sample_mode=True, store_kv=True, return_dict=False)
        cached = model(tokens[:, stored:], sample_mode=True, return_dict=False)
        reports.append(compare_logits(full[:, stored:], cached,
                                      "standalone vs AutoModelForMaskedLM (cached sampling call)",
                                      tolerance))
    return reports


def standalone_to_hf(
    standalone_dir: str | Path,
    output_dir: str | Path,
    *,
    eval_report: str | Path | None = None,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    overwrite: bool = False,
) -> ConversionResult:
    """Standalone directory -> Hugging Face directory in megatron_bd3's own weight layout."""
    from safetensors.torch import save_file

    source = Path(standalone_dir)
    network = BD3Network.from_pretrained(source)
    tokenizer = model_tokenizer(source, network.config)
    result = ConversionResult(Path(output_dir), source)
    with staged_output(output_dir, overwrite) as tmp:
        tensors = {HF_WEIGHT_PREFIX + name: t.detach().to(torch.float32).contiguous()
                   for name, t in network.state_dict().items()}
        tensors["sampling_eps_min"] = torch.tensor(float(network.config.sampling_eps_min))
        tensors["sampling_eps_max"] = torch.tensor(float(network.config.sampling_eps_max))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(network.config), indent=2) + "\n")
        result.notes += write_hf_support(tmp, network, tokenizer, layout="megatron_bd3 layout",
                                         source=source, eval_report=eval_report)
        if check:
            result.parity += check_auto_parity(network, tmp, tolerance, seed)
    return result
