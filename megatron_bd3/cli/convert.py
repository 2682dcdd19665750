"""bd3-convert: move BD3-LM weights between the trainer, the standalone sampler and the reference.

    bd3-convert --checkpoint RUN_OR_CKPT_DIR --to standalone --output OUT [--raw-weights]
    bd3-convert --standalone DIR --to hf         --output OUT [--eval-report eval.json]
    bd3-convert --standalone DIR --to reference  --output OUT
    bd3-convert --reference  DIR --to standalone --output OUT
    bd3-convert --standalone DIR --to checkpoint --config X.yaml --output OUT [key=value ...]

`--to hf` and `--to reference` write Hugging Face directories that load offline with
AutoConfig / AutoModelForMaskedLM / AutoTokenizer (trust_remote_code=True): megatron_bd3's own
weight layout, or the reference DiT's. From a checkpoint or a reference directory they go
through a temporary standalone directory. Every export records the tokenizer fingerprint in its
config.json and carries a model card (README.md; `--eval-report` adds a bd3-eval result).

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
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from megatron_bd3.convert.parity import DEFAULT_TOLERANCE, ParityError

TARGETS = {"checkpoint": ("standalone", "hf", "reference"),
           "standalone": ("hf", "reference", "checkpoint"),
           "reference": ("standalone", "hf")}


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
    parser.add_argument("--to", required=True,
                        choices=("standalone", "hf", "reference", "checkpoint"),
                        help="hf: Hugging Face directory in megatron_bd3's layout; reference: in "
                        "the reference DiT layout (both load with transformers' Auto classes)")
    parser.add_argument("--output", required=True, type=Path, metavar="OUT")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it exists and is not empty")
    parser.add_argument("--no-check", action="store_true", help="skip the parity check")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="parity bound relative to max(1, max |logit|) (default %(default)g)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parity batch")
    parser.add_argument("--eval-report", type=Path, default=None, metavar="JSON",
                        help="a bd3-eval result (eval.json) of this model, summarised in the "
                        "model card (not with --to checkpoint)")
    ckpt = parser.add_argument_group("--checkpoint --to standalone")
    ckpt.add_argument("--raw-weights", action="store_true",
                      help="export the raw training weights instead of the EMA weights")
    ckpt.add_argument("--tokenizer", type=Path, default=None,
                      help="tokenizer to include (default: the run's, checked by fingerprint)")
    ref = parser.add_argument_group("--to reference")
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
    """Run the conversion `args` describe; returns the ConversionResult. A checkpoint or
    reference directory bound for a Hugging Face layout goes through a temporary standalone
    directory (both conversions checked)."""
    check = dict(check=not args.no_check, tolerance=args.tolerance, seed=args.seed,
                 overwrite=args.overwrite)
    if args.standalone is None and args.to != "standalone":
        with tempfile.TemporaryDirectory(prefix="bd3-convert-") as tmp:
            first = _to_standalone(args, Path(tmp) / "standalone", None, check)
            second = _from_standalone(args, first.output_dir, check)
            second.source = first.source
            second.notes = first.notes + second.notes
            second.parity = first.parity + second.parity
            return second
    if args.standalone is None:
        return _to_standalone(args, args.output, args.eval_report, check)
    return _from_standalone(args, args.standalone, check)


def _to_standalone(args: argparse.Namespace, output: Path, eval_report, check: dict):
    if args.checkpoint is not None:
        from megatron_bd3.convert.trainer_checkpoint import checkpoint_to_standalone

        return checkpoint_to_standalone(args.checkpoint, output,
                                        use_ema=False if args.raw_weights else None,
                                        tokenizer=args.tokenizer, eval_report=eval_report,
                                        **check)
    from megatron_bd3.convert.reference import reference_to_standalone

    return reference_to_standalone(
        args.reference, output, mask_token_id=args.mask_token_id,
        bos_token_id=args.bos_token_id, eos_token_id=args.eos_token_id,
        pad_token_id=args.pad_token_id, eval_report=eval_report, **check)


def _from_standalone(args: argparse.Namespace, standalone: Path, check: dict):
    if args.to == "hf":
        from megatron_bd3.convert.hf import standalone_to_hf

        return standalone_to_hf(standalone, args.output, eval_report=args.eval_report, **check)
    if args.to == "reference":
        from megatron_bd3.convert.reference import standalone_to_reference

        return standalone_to_reference(standalone, args.output, cond_dim=args.cond_dim,
                                       dropout=args.dropout, eval_report=args.eval_report,
                                       **check)
    from megatron_bd3.convert.trainer_checkpoint import standalone_to_checkpoint

    return standalone_to_checkpoint(standalone, args.output, args.config, args.overrides,
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
    if args.eval_report is not None and args.to == "checkpoint":
        parser.error("--eval-report goes into a model card; --to checkpoint writes none")
    if args.tolerance <= 0:
        parser.error(f"--tolerance must be > 0, got {args.tolerance}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    quiet_conversion_notices()
    from megatron_bd3.convert.weights import MappingError

    # ImportError: a Hugging Face check without transformers installed (the [hf] extra)
    errors: tuple[type[BaseException], ...] = (MappingError, ValueError, OSError, ImportError)
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
