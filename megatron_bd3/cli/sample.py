"""bd3-sample: generate text from a standalone BD3-LM directory (torch only) or a checkpoint.

    bd3-sample MODEL_DIR --num-samples 8 --length 256 --batch-size 8 --output samples.jsonl
    bd3-sample --checkpoint RUN_OR_CKPT_DIR [--raw-weights] [--save-standalone DIR] ...

MODEL_DIR holds ``config.json`` + ``model.safetensors`` (megatron_bd3.standalone) and optionally a
tokenizer (``bd3_tokenizer.json`` with its model file, in MODEL_DIR or MODEL_DIR/tokenizer, or
``--tokenizer``); without one, token ids are printed instead of text. A tokenizer whose
fingerprint is not the one config.json records is refused (one line, exit 2). Sample ``i`` uses seed
``--seed + i``, so the output does not depend on ``--batch-size``. Each JSONL line holds: index,
seed, text, token_ids (prompt included), prompt_length, num_tokens, num_generated, nfe,
stop_reason, seconds (from the start of its batch to its end).

``--checkpoint`` takes a trainer checkpoint instead (a step_XXXXXXXX directory, a checkpoint root
or a run directory, as ``bd3-convert --checkpoint``): it is converted by bd3-convert's own
converter, parity check included (a failed check exits 1 without sampling), into a temporary
directory (or ``--save-standalone DIR``), which is then sampled exactly like a MODEL_DIR. EMA
weights when the run kept them, else ``--raw-weights``; ``--tokenizer`` is then checked against
the one the run trained with. Only this option imports megatron-core; sampling a MODEL_DIR needs
torch alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_bd3.standalone import BD3Network, SamplerConfig, generate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bd3-sample", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, nargs="?", default=None,
                        help="standalone model directory (or --checkpoint)")
    ckpt = parser.add_argument_group("sampling a trainer checkpoint (imports megatron-core)")
    ckpt.add_argument("--checkpoint", type=Path, default=None, metavar="DIR",
                      help="trainer checkpoint instead of MODEL_DIR: step dir, checkpoint root or "
                           "run dir; converted as by bd3-convert (parity check included)")
    ckpt.add_argument("--raw-weights", action="store_true",
                      help="sample the raw training weights instead of the EMA weights")
    ckpt.add_argument("--save-standalone", type=Path, default=None, metavar="DIR",
                      help="keep the converted standalone directory here (must not exist or be "
                           "empty); default: a temporary directory, removed after loading")
    ckpt.add_argument("--parity-tolerance", type=float, default=None, metavar="T",
                      help="bound of the conversion's parity check, as bd3-convert --tolerance "
                           "(default: bd3-convert's)")
    add_sampling_arguments(parser)
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer directory or file (default: found in MODEL_DIR; with "
                             "--checkpoint, the run's)")
    parser.add_argument("--output", type=Path, default=None, help="write samples as JSONL")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="network weights/activations (sampling math stays float64)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no text output")
    return parser


def add_sampling_arguments(parser, *, batch_size_flag: str = "--batch-size",
                           seed_flag: str = "--seed") -> None:
    """Every sampling setting of bd3-sample (count, length, block size, sampler, top-p, seeds,
    prompt, stops, cache, batch size) on a parser or argument group; bd3-eval adds the same ones
    (renaming the batch size and seed flags its likelihood part already uses). Read them back
    with :func:`sampling_from_args`."""
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
    parser.add_argument(seed_flag, type=int, default=0, help="sample i uses seed + i")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="prompt text (needs a tokenizer)")
    prompt.add_argument("--prompt-ids", default=None, help="prompt as comma-separated token ids")
    parser.add_argument("--no-bos", action="store_true",
                        help="do not start samples with the model's BOS token")
    parser.add_argument(batch_size_flag, type=int, default=1, help="samples per sampler call")
    parser.add_argument("--stop-eos-count", type=int, default=None,
                        help="stop a sample after this many generated EOS tokens")
    parser.add_argument("--stop-on-low-entropy", action="store_true",
                        help="stop when the last 256 tokens have unigram entropy < 4 nats")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the context at every call (slow; for comparison)")
    parser.add_argument("--window-refresh", action="store_true",
                        help="past seq_length, recompute the cached window when it slides")


def _validate_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exactly one of MODEL_DIR and --checkpoint; the checkpoint-only options need the latter."""
    if args.model_dir is not None and args.checkpoint is not None:
        parser.error(f"give either MODEL_DIR ({args.model_dir}) or --checkpoint "
                     f"({args.checkpoint}), not both")
    if args.model_dir is None and args.checkpoint is None:
        parser.error("give a standalone MODEL_DIR or --checkpoint RUN_OR_CKPT_DIR")
    if args.checkpoint is None:
        for flag, value in (("--raw-weights", args.raw_weights),
                            ("--save-standalone", args.save_standalone)):
            if value:
                parser.error(f"{flag} only applies to --checkpoint")
        if args.parity_tolerance is not None:
            parser.error("--parity-tolerance only applies to --checkpoint")
        return
    if args.parity_tolerance is not None and not args.parity_tolerance > 0:
        parser.error(f"--parity-tolerance must be > 0, got {args.parity_tolerance}")
    if not args.checkpoint.exists():
        parser.error(f"--checkpoint {args.checkpoint} does not exist (give a step_XXXXXXXX "
                     "directory, a checkpoint root or a run directory)")
    keep = args.save_standalone
    if keep is not None and keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
        parser.error(f"--save-standalone {keep} exists and is not an empty directory; "
                     "choose another one")


def convert_checkpoint(checkpoint: Path, output_dir: Path, raw_weights: bool = False,
                       tokenizer: Path | None = None, tolerance: float | None = None) -> str:
    """Convert a trainer checkpoint into the standalone directory `output_dir` with the
    converter bd3-convert uses (parity check included); returns its report.

    Imports megatron-core, so it is only imported here, for --checkpoint: sampling a standalone
    directory must not need it. Raises what checkpoint_to_standalone raises (CheckpointError,
    MappingError, ValueError, OSError; ParityError when the check fails)."""
    from megatron_bd3.cli.convert import quiet_conversion_notices
    from megatron_bd3.convert.parity import DEFAULT_TOLERANCE
    from megatron_bd3.convert.trainer_checkpoint import checkpoint_to_standalone

    quiet_conversion_notices()
    result = checkpoint_to_standalone(
        checkpoint, output_dir, use_ema=False if raw_weights else None, tokenizer=tokenizer,
        tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance)
    return result.describe()


def _load_checkpoint(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """(network, tokenizer) converted from --checkpoint; exits 1 when the parity check fails
    and 2 on bad input, naming the checkpoint."""
    from megatron_bd3.checkpoint import CheckpointError
    from megatron_bd3.convert import MappingError, ParityError

    with tempfile.TemporaryDirectory(prefix="bd3-sample-") as tmp:
        model_dir = args.save_standalone or Path(tmp) / "standalone"
        try:
            report = convert_checkpoint(args.checkpoint, model_dir, args.raw_weights,
                                        args.tokenizer, args.parity_tolerance)
        except ParityError as error:
            print(f"bd3-sample: {error}; not sampling", file=sys.stderr)
            sys.exit(1)
        except (CheckpointError, MappingError, ValueError, OSError) as error:
            parser.error(f"--checkpoint {args.checkpoint}: {error}")
        print(f"bd3-sample: {report}", file=sys.stderr)
        if args.save_standalone is None:
            print("bd3-sample: the converted directory is temporary (--save-standalone DIR "
                  "keeps it)", file=sys.stderr)
        # loaded as any MODEL_DIR is; the tokenizer now sits in model_dir
        return _load_standalone(parser, model_dir, args)


def _load_standalone(parser: argparse.ArgumentParser, model_dir: Path,
                     args: argparse.Namespace):
    """(network, tokenizer or None) of a standalone directory; exits 2 on bad input. The
    tokenizer (--tokenizer, else the directory's own) must have the fingerprint the model's
    config.json records: another one would decode the ids into other text."""
    try:
        network = BD3Network.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    except (OSError, ValueError) as error:
        parser.error(str(error))
    try:
        from megatron_bd3.data.tokenizer import find_model_tokenizer

        tokenizer = find_model_tokenizer(model_dir, args.tokenizer,
                                         network.config.tokenizer_fingerprint)
    except (OSError, ValueError) as error:
        print(f"{parser.prog}: cannot use the tokenizer: {error}", file=sys.stderr)
        sys.exit(2)
    return network, tokenizer


def check_sample_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--num-samples and --batch-size are >= 1 (checked before any model is loaded)."""
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")


def sampling_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                       network: BD3Network, tokenizer) -> tuple[SamplerConfig, int, list[int]]:
    """(sampler config, length, prompt ids) from the :func:`add_sampling_arguments` options,
    checked against ``network``; bad values exit 2 through ``parser.error``. The prompt starts
    with the model's BOS unless ``--no-bos``."""
    check_sample_counts(parser, args)
    config = network.config
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
        print(f"{parser.prog}: warning: sampling with block size {sampler.block_size}, the "
              f"model was trained with {config.block_size}", file=sys.stderr)
    return sampler, length, prompt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate_inputs(parser, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    check_sample_counts(parser, args)
    if args.checkpoint is not None:
        network, tokenizer = _load_checkpoint(parser, args)
    else:
        network, tokenizer = _load_standalone(parser, args.model_dir, args)
    sampler, length, prompt = sampling_from_args(parser, args, network, tokenizer)

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
