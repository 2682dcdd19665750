"""bd3-convert: move BD3-LM weights between the trainer, the standalone sampler and the reference.

    bd3-convert --checkpoint RUN_OR_CKPT_DIR --to standalone --output OUT [--raw-weights]
    bd3-convert --standalone DIR --to reference  --output OUT
    bd3-convert --reference  DIR --to standalone --output OUT
    bd3-convert --standalone DIR --to checkpoint --config X.yaml --output OUT [key=value ...]

`--checkpoint` takes a step_XXXXXXXX directory, a checkpoint root (its `latest`) or a run
directory; checkpoints saved under any TP/PP/VPP layout and optimizer convert (their model/ and
ema/ weights are layout-independent), EMA weights by default when the run kept them.
`--to checkpoint` writes a weights-only trainer checkpoint to start a run from with
`checkpoint.init_from=OUT`. After every conversion the converted model's two-stream training
logits are compared with the original's on a random noisy batch; the conversion fails (exit 1,
nothing written) when the max abs difference exceeds --tolerance x max(1, max |logit|), unless
--no-check. Bad input exits 2 with a message naming the problem. See docs/convert.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from megatron_bd3.convert.parity import DEFAULT_TOLERANCE, ParityError

TARGETS = {"checkpoint": ("standalone",), "standalone": ("reference", "checkpoint"),
           "reference": ("standalone",)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bd3-convert",
        description="Convert BD3-LM weights between trainer checkpoints, the standalone model "
        "directory and the reference BD3LM Hugging Face layout, with a parity check.",
        epilog="See docs/convert.md.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, metavar="DIR",
                        help="trainer checkpoint: step dir, checkpoint root or run dir")
    source.add_argument("--standalone", type=Path, metavar="DIR",
                        help="standalone model dir (config.json + model.safetensors)")
    source.add_argument("--reference", type=Path, metavar="DIR",
                        help="reference BD3LM HF dir (config.json + model.safetensors)")
    parser.add_argument("--to", required=True, choices=("standalone", "reference", "checkpoint"))
    parser.add_argument("--output", required=True, type=Path, metavar="OUT")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it exists and is not empty")
    parser.add_argument("--no-check", action="store_true", help="skip the parity check")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="parity bound relative to max(1, max |logit|) (default %(default)g)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parity batch")
    ckpt = parser.add_argument_group("--checkpoint --to standalone")
    ckpt.add_argument("--raw-weights", action="store_true",
                      help="export the raw training weights instead of the EMA weights")
    ckpt.add_argument("--tokenizer", type=Path, default=None,
                      help="tokenizer to include (default: the run's, checked by fingerprint)")
    ref = parser.add_argument_group("--standalone --to reference")
    ref.add_argument("--cond-dim", type=int, default=128, help="reference cond_dim")
    ref.add_argument("--dropout", type=float, default=0.1, help="reference config dropout")
    imp = parser.add_argument_group("--reference --to standalone")
    for name in ("mask", "bos", "eos", "pad"):
        imp.add_argument(f"--{name}-token-id", type=int, default=None,
                         help=f"{name.upper()} id (default: the reference config's)")
    to_ckpt = parser.add_argument_group("--standalone --to checkpoint")
    to_ckpt.add_argument("--config", type=Path, default=None,
                         help="run config YAML of the run that will start from the weights "
                         "(default: derived from the standalone config)")
    to_ckpt.add_argument("--step", type=int, default=0, help="step number of the checkpoint")
    to_ckpt.add_argument("overrides", nargs="*", metavar="section.key=value",
                         help="run config overrides")
    return parser


def quiet_conversion_notices() -> None:
    """Silence import-time and deprecation notices that say nothing about the conversion."""
    for message in (".*Transformer Engine and Apex are not installed.*",
                    ".*Apex is not installed.*", ".*full scope is deprecated.*",
                    ".*load_state_dict. is deprecated.*", ".*Please use DTensor instead.*",
                    ".*all_gather_into_tensor.*is deprecated.*"):
        warnings.filterwarnings("ignore", message=message)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")


def convert(args: argparse.Namespace):
    """Run the conversion `args` describe; returns the ConversionResult."""
    check = dict(check=not args.no_check, tolerance=args.tolerance, seed=args.seed,
                 overwrite=args.overwrite)
    if args.checkpoint is not None:
        from megatron_bd3.convert.trainer_checkpoint import checkpoint_to_standalone

        return checkpoint_to_standalone(args.checkpoint, args.output,
                                        use_ema=False if args.raw_weights else None,
                                        tokenizer=args.tokenizer, **check)
    if args.reference is not None:
        from megatron_bd3.convert.reference import reference_to_standalone

        return reference_to_standalone(
            args.reference, args.output, mask_token_id=args.mask_token_id,
            bos_token_id=args.bos_token_id, eos_token_id=args.eos_token_id,
            pad_token_id=args.pad_token_id, **check)
    if args.to == "reference":
        from megatron_bd3.convert.reference import standalone_to_reference

        return standalone_to_reference(args.standalone, args.output, cond_dim=args.cond_dim,
                                       dropout=args.dropout, **check)
    from megatron_bd3.convert.trainer_checkpoint import standalone_to_checkpoint

    return standalone_to_checkpoint(args.standalone, args.output, args.config, args.overrides,
                                    step=args.step, **check)


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    kind = next(k for k in TARGETS if getattr(args, k) is not None)
    if args.to not in TARGETS[kind]:
        parser.error(f"--{kind} converts to {' or '.join(TARGETS[kind])}, not --to {args.to}")
    if args.overrides and not (kind == "standalone" and args.to == "checkpoint"):
        parser.error(f"unexpected arguments {args.overrides} (run config overrides only go with "
                     "--standalone --to checkpoint)")
    if args.config is not None and not (kind == "standalone" and args.to == "checkpoint"):
        parser.error("--config only goes with --standalone --to checkpoint")
    if args.raw_weights and kind != "checkpoint":
        parser.error("--raw-weights only applies to --checkpoint")
    if args.tolerance <= 0:
        parser.error(f"--tolerance must be > 0, got {args.tolerance}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    quiet_conversion_notices()
    from megatron_bd3.convert.weights import MappingError

    errors: tuple[type[BaseException], ...] = (MappingError, ValueError, OSError)
    if args.checkpoint is not None or args.to == "checkpoint":
        from megatron_bd3.checkpoint import CheckpointError

        errors += (CheckpointError,)
    try:
        result = convert(args)
    except ParityError as exc:
        print(f"bd3-convert: {exc}; nothing was written to {args.output}", file=sys.stderr)
        return 1
    except errors as exc:
        print(f"bd3-convert: {exc}", file=sys.stderr)
        return 2
    print(result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
