"""megatron_bd3: distributed training of Block Diffusion language models (BD3-LM).

Subpackages, one job each:
    diffusion   pure-torch BD3 math (mask, schedules, noise, SUBS, NELBO); no megatron import
    parallel    distributed runtime and the megatron-core CPU compatibility layer
    model       the BD3 model on megatron-core (core attention, layer spec, two-stream forward)
    data        tokenizers, webdataset shards, the resumable loader, the embedded corpus
    training    the trainer (optimizers, EMA, validation, clip search, logging)
    checkpoint  atomic, resumable checkpoints and resharding
    standalone  torch-only network and sampler (no megatron, no deepspeed)
Modules: paths (how a run's paths resolve), lifetime (a run's processes end with their parent).
"""

__version__ = "0.1.0"
