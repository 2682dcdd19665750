"""A synthetic corpus with a GPT-2-sized vocabulary, for throughput runs without downloads.

    python -m tools.bench.synthetic_corpus --output runs/synth      # tokenizer.json + corpus.jsonl
    bd3-train-tokenizer --from runs/synth/tokenizer.json --output runs/synth/tok
    bd3-prepare-data --input runs/synth/corpus.jsonl --tokenizer runs/synth/tok \\
        --output runs/synth/data --seq-length 1024 --val-fraction 0.02

The tokenizer is a Hugging Face word-level tokenizer over the words w0 .. w{V-2} plus
<|endoftext|> (id V-1, GPT-2's role: BOS = EOS = pad), so the import appends [MASK] as id V,
exactly as for GPT-2 (V = 50257 -> 50258 ids). Documents are Zipf-distributed words (weight
1 / (rank + 10)), 200-3000 words each, so a model has something to learn. Only the shapes
matter for speed: the model's FLOPs depend on the vocabulary size, not on the words.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=50257, help="ids before [MASK]")
    parser.add_argument("--tokens", type=int, default=1_300_000, help="words in the corpus")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.vocab_size < 2 or args.tokens < 1:
        parser.error("--vocab-size must be >= 2 and --tokens >= 1")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = args.vocab_size - 1
    vocab = {f"w{i}": i for i in range(words)}
    vocab["<|endoftext|>"] = words
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    args.output.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.output / "tokenizer.json"))

    rng = random.Random(args.seed)
    stream = rng.choices(range(words), weights=[1.0 / (i + 10) for i in range(words)],
                         k=args.tokens)
    documents = 0
    with open(args.output / "corpus.jsonl", "w") as f:
        position = 0
        while position < len(stream):
            n = rng.randint(200, 3000)
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in stream[position:position + n])})
                    + "\n")
            position += n
            documents += 1
    print(f"wrote {args.output}/tokenizer.json ({args.vocab_size} ids) and corpus.jsonl "
          f"({documents} documents, {args.tokens} words)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
