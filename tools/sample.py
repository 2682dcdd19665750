"""bd3-sample: generate text from a standalone BD3-LM directory, torch only.

    bd3-sample MODEL_DIR --num-samples 8 --length 256 --batch-size 8 --output samples.jsonl

MODEL_DIR holds ``config.json`` + ``model.safetensors`` (megatron_bd3.standalone) and optionally a
tokenizer (``bd3_tokenizer.json`` with its model file, in MODEL_DIR or MODEL_DIR/tokenizer, or
``--tokenizer``); without one, token ids are printed instead of text. Sample ``i`` uses seed
``--seed + i``, so the output does not depend on ``--batch-size``. Each JSONL line holds: index,
seed, text, token_ids (prompt included), prompt_length, num_tokens, num_generated, nfe,
stop_reason, seconds (from the start of its batch to its end).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from megatron_bd3.standalone import BD3Network, SamplerConfig, generate

TOKENIZER_MARKERS = ("bd3_tokenizer.json",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bd3-sample", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="standalone model directory")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--length", type=int, default=None,
                        help="total tokens per sample, prompt included (default: the model's "
                             "seq_length; longer runs use the sliding window)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="default: the model's; must divide its seq_length")
    parser.add_argument("--sampler", choices=("first_hitting", "ancestral"),
                        default="first_hitting")
    parser.add_argument("--steps", type=int, default=5000,
                        help="ancestral sampler: diffusion steps per block")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus (paper: 0.9)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="prompt text (needs a tokenizer)")
    prompt.add_argument("--prompt-ids", default=None, help="prompt as comma-separated token ids")
    parser.add_argument("--no-bos", action="store_true",
                        help="do not start samples with the model's BOS token")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--stop-eos-count", type=int, default=None,
                        help="stop a sample after this many generated EOS tokens")
    parser.add_argument("--stop-on-low-entropy", action="store_true",
                        help="stop when the last 256 tokens have unigram entropy < 4 nats")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the context at every call (slow; for comparison)")
    parser.add_argument("--window-refresh", action="store_true",
                        help="past seq_length, recompute the cached window when it slides")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer directory or file (default: found in MODEL_DIR)")
    parser.add_argument("--output", type=Path, default=None, help="write samples as JSONL")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="network weights/activations (sampling math stays float64)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no text output")
    return parser


def find_tokenizer(model_dir: Path, explicit: Path | None):
    """The tokenizer to decode with, or None (then token ids are shown)."""
    path = explicit
    if path is None:
        for candidate in (model_dir, model_dir / "tokenizer"):
            if any((candidate / marker).is_file() for marker in TOKENIZER_MARKERS):
                path = candidate
                break
    if path is None:
        return None
    try:
        from megatron_bd3.data.tokenizer import load_tokenizer
    except ImportError as error:  # the data package is optional for sampling
        print(f"bd3-sample: cannot import the tokenizer loader ({error}); printing token ids",
              file=sys.stderr)
        return None
    return load_tokenizer(path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        network = BD3Network.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype))
    except (OSError, ValueError) as error:
        parser.error(str(error))
    config = network.config
    try:
        tokenizer = find_tokenizer(args.model_dir, args.tokenizer)
    except (OSError, ValueError) as error:
        parser.error(f"cannot load the tokenizer: {error}")
    length = args.length if args.length is not None else config.seq_length

    prompt: list[int] = []
    if args.prompt is not None:
        if tokenizer is None:
            parser.error("--prompt needs a tokenizer (in MODEL_DIR or --tokenizer); "
                         "or give --prompt-ids")
        prompt = list(tokenizer.encode(args.prompt))
    elif args.prompt_ids is not None:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            parser.error(f"--prompt-ids {args.prompt_ids!r} is not a comma-separated id list")
    if not args.no_bos and config.bos_token_id is not None and prompt[:1] != [config.bos_token_id]:
        prompt = [config.bos_token_id] + prompt

    sampler = SamplerConfig(
        sampler=args.sampler, steps=args.steps, top_p=args.top_p, temperature=args.temperature,
        block_size=args.block_size, use_cache=not args.no_cache,
        window_refresh=args.window_refresh, stop_eos_count=args.stop_eos_count,
        stop_on_low_entropy=args.stop_on_low_entropy,
    )
    try:
        sampler.validate(network)
    except ValueError as error:
        parser.error(str(error))
    if sampler.block_size is not None and sampler.block_size != config.block_size:
        print(f"bd3-sample: warning: sampling with block size {sampler.block_size}, the model "
              f"was trained with {config.block_size}", file=sys.stderr)

    progress = None
    if not args.quiet:
        from tqdm import tqdm

        progress = tqdm(total=args.num_samples * max(length - len(prompt), 0), unit="tok",
                        desc="sampling", file=sys.stderr)
    out_file = args.output.open("w") if args.output is not None else None
    total_generated, start = 0, time.perf_counter()
    try:
        for first in range(0, args.num_samples, args.batch_size):
            indices = list(range(first, min(first + args.batch_size, args.num_samples)))
            try:
                samples = generate(network, length, prompts=[prompt] * len(indices),
                                   seeds=[args.seed + i for i in indices], config=sampler,
                                   progress=progress.update if progress is not None else None)
            except ValueError as error:
                parser.error(str(error))
            for index, sample in zip(indices, samples, strict=True):
                total_generated += len(sample.generated)
                text = tokenizer.decode(sample.tokens) if tokenizer is not None else None
                record = {
                    "index": index, "seed": args.seed + index, "text": text,
                    "token_ids": sample.tokens, "prompt_length": sample.prompt_length,
                    "num_tokens": len(sample.tokens), "num_generated": len(sample.generated),
                    "nfe": sample.nfe, "stop_reason": sample.stop_reason,
                    "seconds": round(sample.seconds, 4),
                }
                if out_file is not None:
                    out_file.write(json.dumps(record) + "\n")
                if progress is not None:
                    shown = text if text is not None else " ".join(map(str, sample.tokens))
                    progress.write(f"=== sample {index} ({record['num_generated']} tokens, "
                                   f"{sample.nfe} NFE, {sample.stop_reason}) ===\n{shown}",
                                   file=sys.stdout)
    finally:
        if progress is not None:
            progress.close()
        if out_file is not None:
            out_file.close()
    seconds = time.perf_counter() - start
    print(f"bd3-sample: {args.num_samples} samples, {total_generated} tokens in {seconds:.2f} s "
          f"({total_generated / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
