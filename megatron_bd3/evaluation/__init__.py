"""Scaled validation: measure any checkpoint the way the BD3-LM paper does (`bd3-eval`).

    source       what is evaluated: a trainer checkpoint (any layout, EMA or raw weights) or a
                 standalone model directory; its tokenizer and its standalone network
    data         evaluation sets: shard manifests, or raw text / jsonl / parquet files tokenized
                 with the model's tokenizer and wrapped to its L
    loss_model   per-token NELBO terms of noised batches: megatron chunks in any TP/PP/DP layout,
                 or the standalone network
    likelihood   the NELBO perplexity bound with K Monte-Carlo repeats, standard error, interval
    generation   samples from the standalone sampler, sharded exactly once over ranks
    scorers      generative perplexity under an AR scorer (ours or a local Hugging Face model)
    variance     gradient variance (docs/method.md §2.4) over minibatches, per clip range
    report       the table, the JSON, the plots, wandb

The protocol is docs/evaluation.md; the numbers are the same in every layout (tests/evaluation).
"""
