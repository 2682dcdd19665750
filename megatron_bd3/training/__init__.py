"""The trainer: config, optimizers (DeepSpeed ZeRO / megatron), EMA, LR schedule, clip search,
validation, logging and the training loop.

    config             one YAML per run -> typed, validated RunConfig; dotted overrides
    model_config       the one mapping run config -> megatron BD3Config (network + noise)
    optimizer          refusal of impossible combinations; device/precision (RunEnvironment)
    parallelize        the one place that parallelises: process groups, model chunks,
                       DeepSpeed ZeRO / megatron optimizer (the Stepper), gradient finalisation
    deepspeed_engine   DeepSpeed plumbing: mpu adapter, JSON resolution, engine construction
    step               one step through megatron's forward_backward_func
    state              checkpointed pieces: trainer state, clip range, RNG
    ema                sharded exponential moving average of the weights
    lr_schedule        linear warm-up then constant or cosine, a pure function of the step
    clip_search        data-driven clip range (variance of per-block NELBO)
    validation         NELBO validation and the clip search (Validator)
    flops, logging     MFU on the 2L stream with the sparse attention term; console/tqdm/wandb
    trainer            the loop (megatron_bd3.cli.train is its command line)

Importing this package imports neither megatron-core nor DeepSpeed.
"""
