"""The command lines, each a thin layer of argument parsing over the library:

    train            bd3-train             megatron_bd3.training
    convert          bd3-convert           megatron_bd3.convert
    sample           bd3-sample            megatron_bd3.standalone (+ convert for --checkpoint)
    prepare_data     bd3-prepare-data      megatron_bd3.data
    train_tokenizer  bd3-train-tokenizer   megatron_bd3.data

Each also runs as `python -m megatron_bd3.cli.<name>` (what the launchers start under torchrun).
"""
