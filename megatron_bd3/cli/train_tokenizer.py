"""bd3-train-tokenizer: train (or import) the tokenizer of a BD3-LM run.

Train a sentencepiece model on your text (ids <unk>=0, <s>=1 BOS, </s>=2 EOS, <pad>=3, [MASK]=4):

    bd3-train-tokenizer --input 'corpus/*.txt' --output runs/tok --vocab-size 8000
    bd3-train-tokenizer --input default --output runs/tok-demo --vocab-size 2000   # embedded corpus

Import an existing tokenizer (a sentencepiece .model or a Hugging Face tokenizer.json, e.g.
GPT-2's — [MASK] is appended when missing, giving vocab 50258 — or bert-base-uncased's):

    bd3-train-tokenizer --from path/to/gpt2/tokenizer.json --output runs/tok-gpt2

Either way the output directory holds the model file plus bd3_tokenizer.json (special ids,
fingerprint); pass that directory to bd3-prepare-data --tokenizer and to training.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_bd3.data.sources import (
    InputError,
    InputRecord,
    SourceOptions,
    expand_inputs,
    iter_all_documents,
    total_skips,
)
from megatron_bd3.data.tokenizer import (
    METADATA_FILE,
    BD3Tokenizer,
    TokenizerError,
    load_hf_tokenizer_json,
    load_sentencepiece,
    load_tokenizer,
)
from megatron_bd3.data.tokenizer_training import (
    MODEL_TYPES,
    SentencePieceOptions,
    options_record,
    train_sentencepiece,
)

logger = logging.getLogger("bd3-train-tokenizer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bd3-train-tokenizer",
        description=__doc__.split("\n\n")[0],
        epilog="Documents: see docs/data.md. --input default is the embedded Lee news corpus.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--input",
        action="append",
        metavar="PATH_OR_GLOB",
        help="training text: file, glob (quote it) or 'default'; repeatable",
    )
    what.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="import an existing sentencepiece .model or Hugging Face tokenizer.json instead",
    )
    parser.add_argument("--output", required=True, help="directory to write the tokenizer into")
    parser.add_argument("--overwrite", action="store_true", help="replace a tokenizer in --output")

    train = parser.add_argument_group("training (with --input)")
    train.add_argument("--vocab-size", type=int, default=8000, help="pieces incl. specials")
    train.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    train.add_argument(
        "--byte-fallback",
        choices=("auto", "on", "off"),
        default="auto",
        help="encode unseen characters as UTF-8 bytes (lossless); needs vocab > 256 + characters;"
        " auto: on when it fits (default)",
    )
    train.add_argument("--character-coverage", type=float, default=0.9995)
    train.add_argument(
        "--no-newline-token", action="store_true", help="do not reserve a piece for '\\n'"
    )
    train.add_argument(
        "--max-sentences",
        type=int,
        default=2_000_000,
        help="lines sampled for training (seeded); 0 = all",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=1, help="sentencepiece trainer threads")

    SourceOptions.add_arguments(parser.add_argument_group("input reading (with --input)"))

    imported = parser.add_argument_group("import (with --from); default: looked up by name")
    for role in ("mask", "bos", "eos", "pad"):
        imported.add_argument(f"--{role}-token", metavar="TOKEN", help=f"the {role} token")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def _check_output(directory: Path, overwrite: bool) -> None:
    if (directory / METADATA_FILE).exists() and not overwrite:
        raise FileExistsError(
            f"{directory} already holds a tokenizer ({METADATA_FILE}); pass --overwrite to "
            f"replace it or choose another --output"
        )


def import_tokenizer(args: argparse.Namespace) -> BD3Tokenizer:
    path = Path(args.from_file)
    if not path.is_file():
        raise TokenizerError(f"{path}: no such file (expected a .model or tokenizer.json)")
    if path.suffix == ".model":
        if any(getattr(args, f"{r}_token") for r in ("mask", "bos", "eos", "pad")):
            raise TokenizerError(
                "--mask/--bos/--eos/--pad-token apply to tokenizer.json imports; a "
                "sentencepiece model's specials come from the model itself"
            )
        return load_sentencepiece(path)
    if path.suffix == ".json":
        return load_hf_tokenizer_json(
            path,
            mask_token=args.mask_token,
            bos_token=args.bos_token,
            eos_token=args.eos_token,
            pad_token=args.pad_token,
        )
    raise TokenizerError(f"{path}: expected a sentencepiece .model or a tokenizer.json file")


def train(args: argparse.Namespace) -> tuple[BD3Tokenizer, dict]:
    source = SourceOptions.from_arguments(args)
    options = SentencePieceOptions(
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        byte_fallback=args.byte_fallback,
        character_coverage=args.character_coverage,
        user_symbols=() if args.no_newline_token else ("\n",),
        max_sentences=args.max_sentences,
        seed=args.seed,
        num_threads=args.threads,
    )
    paths = expand_inputs(args.input)
    records: list[InputRecord] = []
    tokenizer = train_sentencepiece(
        iter_all_documents(paths, source, records), options, source=str(args.output)
    )
    extra = {
        "trained_with": options_record(options) | {"user_symbols": list(options.user_symbols)},
        "source_options": vars(source),
        "inputs": [record.as_dict() for record in records],
        "skipped": total_skips(records).as_dict(),
    }
    return tokenizer, extra


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    output = Path(args.output)
    try:
        _check_output(output, args.overwrite)
        if args.from_file:
            tokenizer = import_tokenizer(args)
            extra = {"imported_from": str(Path(args.from_file).resolve())}
        else:
            tokenizer, extra = train(args)
        tokenizer.save(output, extra=extra)
        saved = load_tokenizer(output)  # round trip: what later tools will see
    except (TokenizerError, InputError, FileExistsError, ValueError) as exc:
        print(f"bd3-train-tokenizer: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(saved.describe(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
