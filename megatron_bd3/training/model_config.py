"""The one mapping from a run config to the model: megatron BD3Config, noise settings, identity.

A run's YAML describes the network in `model`, its parallel layout in `parallel` and the
diffusion objective in `training`; the vocabulary size and [MASK] id come from the data manifest.
`build_model_config` folds all of that into one megatron `BD3Config`, which from then on is the
only description of the network and of its noise (docs/method.md §2): the trainer, validation,
the FLOP count, the checkpoint identity and the converters all read it, and
`NoiseSettings.from_model_config` takes the forward-process settings from it alone.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_bd3.training.config import ParallelSection, RunConfig

# ModelConfig fields that refine an architecture -> the BD3Config field each one sets.
REFINEMENTS = {
    "layernorm_epsilon": "layernorm_epsilon",
    "rotary_base": "rotary_base",
    "output_layer_bias": "output_layer_bias",
    "tie_embeddings": "share_embeddings_and_output_weights",
    "init_method_std": "init_method_std",
}


def build_model_config(
    config: RunConfig,
    *,
    vocab_size: int,
    mask_token_id: int,
    precision: str,
    parallel: ParallelSection | None = None,
):
    """The BD3Config of this run: model section + parallel sizes (`parallel` replaces the run's
    own, e.g. TP = PP = 1 for conversion) + the diffusion keys of `training` + CPU-safe settings.
    A value the model refuses raises ValueError naming the run config."""
    from megatron_bd3.model import ar_config, bd3_config, mdlm_config, reference_architecture
    from megatron_bd3.parallel import cpu_safe_config_overrides

    m, t = config.model, config.training
    p = parallel or config.parallel
    overrides: dict[str, Any] = {}
    if m.architecture == "reference":
        overrides.update(reference_architecture(dropout=m.dropout))
    else:
        overrides.update(hidden_dropout=m.dropout, attention_dropout=0.0)
    overrides.update(cpu_safe_config_overrides())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    overrides.update(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        context_parallel_size=p.context_parallel_size,
        cp_comm_type=p.context_parallel_comm,
        bf16=precision == "bf16",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        attention_kernel=m.attention_kernel,
        single_stream_mdlm=m.single_stream_mdlm,
        dropout_rng=m.dropout_rng,
        init_rng=m.init_rng,
        init_seed=t.seed,
        noise_schedule=t.noise_schedule,
        clip_min=t.clip_eps_min,
        clip_max=t.clip_eps_max,
        ignore_bos=t.ignore_bos,
        antithetic_sampling=t.antithetic_sampling,
        resample=t.resample,
        document_mask=config.data.document_mask,
        document_position_reset=config.data.document_position_reset,
    )
    if m.ffn_hidden_size is not None:
        overrides["ffn_hidden_size"] = m.ffn_hidden_size
    if m.num_query_groups is not None:
        overrides["num_query_groups"] = m.num_query_groups
    if m.recompute == "full":
        overrides.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    elif m.recompute == "selective":
        overrides.update(recompute_granularity="selective")
    for ours, megatron_name in REFINEMENTS.items():
        if getattr(m, ours) is not None:
            overrides[megatron_name] = getattr(m, ours)
    common = dict(
        seq_length=m.seq_length,
        vocab_size=vocab_size,
        mask_token_id=mask_token_id,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
    )
    try:
        if m.preset == "ar":
            return ar_config(**common, **overrides)
        if m.preset == "mdlm":
            return mdlm_config(**common, **overrides)
        return bd3_config(block_size=m.effective_block_size, **common, **overrides)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config.source}: model section: {exc}") from exc


def model_identity(config: RunConfig, model_config, tokenizer_fingerprint: str | None) -> dict:
    """What a checkpoint records about its network: a resume or a warm start compares it."""
    return {
        "preset": config.model.preset,
        "architecture": config.model.architecture,
        "num_layers": model_config.num_layers,
        "hidden_size": model_config.hidden_size,
        "num_attention_heads": model_config.num_attention_heads,
        "num_query_groups": model_config.num_query_groups,
        "ffn_hidden_size": model_config.ffn_hidden_size,
        "vocab_size": model_config.vocab_size,
        "mask_token_id": model_config.mask_token_id,
        "seq_length": model_config.seq_length,
        "block_size": model_config.block_size,
        "tokenizer_fingerprint": tokenizer_fingerprint,
    }
