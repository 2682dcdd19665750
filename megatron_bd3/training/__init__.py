"""The trainer: config, optimizers (DeepSpeed ZeRO / megatron), EMA, LR schedule, clip search,
validation, logging and the training loop.

    config             one YAML per run -> typed, validated RunConfig; dotted overrides
    lr_schedule        linear warm-up then constant or cosine, a pure function of the step
    optimizer          refusal of impossible combinations; precision/device resolution
    deepspeed_engine   DeepSpeed engine around megatron chunks: mpu adapter, JSON resolution
    megatron_optimizer megatron-core DistributedOptimizer (GPU only)
    step               one step through megatron's forward_backward_func
    ema                sharded exponential moving average of the weights
    clip_search        data-driven clip range (variance of per-block NELBO)
    flops, logging     MFU on the 2L stream with the sparse attention term; console/tqdm/wandb
    trainer            the loop (tools/train.py is its command line)

Importing this package imports neither megatron-core nor DeepSpeed.
"""
