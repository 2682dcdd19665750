"""bd3-prepare-data: tokenize text into webdataset shards of fixed-length sequences.

    bd3-prepare-data --input 'corpus/*.txt' --tokenizer runs/tok --output runs/data \
        --seq-length 1024 --workers 4
    bd3-prepare-data --input default --tokenizer runs/tok-demo --output runs/data-demo \
        --seq-length 128
    bd3-prepare-data --input 'dump/*.jsonl.gz' --text-field content --tokenizer runs/tok ...
    bd3-prepare-data --input wikipedia --val-fraction 0.05 --test-fraction 0.05 ...
    bd3-prepare-data --verify runs/data          # re-check every shard against the manifest

Documents are split into train/validation/test by a keyed hash of their text (--val-fraction,
--test-fraction, default 0: no test split; --split-seed), concatenated with EOS after each
(--no-doc-eos turns it off), cut into sequences of exactly --seq-length tokens (--insert-special:
each gets BOS + L-2 tokens + EOS), and written as deterministic tar shards plus manifest.json
(--document-boundaries: each sample also stores where its documents start, for data.document_mask).
See docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from megatron_bd3.data.manifest import ManifestError, load_manifest
from megatron_bd3.data.shards import DTYPES
from megatron_bd3.data.sources import SourceOptions
from megatron_bd3.data.tokenizer import TokenizerError
from megatron_bd3.data.writer import PrepareOptions, prepare_shards

logger = logging.getLogger("bd3-prepare-data")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bd3-prepare-data",
        description=__doc__.split("\n\n")[0],
        epilog="--input default is the embedded Lee news corpus (300 documents), --input wikipedia "
        "the shortened Wikipedia dump in gensim's test data (106 articles). See docs/data.md.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--input",
        action="append",
        metavar="PATH_OR_GLOB",
        help="input file, glob (quote it) or 'default'; repeatable; order is kept",
    )
    what.add_argument(
        "--verify",
        metavar="DIR",
        help="check the shards of a prepared directory (sizes and sha256) and exit",
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer directory (bd3-train-tokenizer), .model or .json"
    )
    parser.add_argument("--output", help="output directory for shards and manifest.json")
    parser.add_argument("--seq-length", type=int, help="tokens per sequence (L)")
    parser.add_argument("--overwrite", action="store_true", help="replace data in --output")

    layout = parser.add_argument_group("sequences and shards")
    layout.add_argument("--val-fraction", type=float, default=0.05, help="share of documents")
    layout.add_argument(
        "--test-fraction",
        type=float,
        default=0.0,
        help="share of documents in a test split (default 0: no test split), taken from train",
    )
    layout.add_argument("--split-seed", type=int, default=0, help="key of the split hash")
    layout.add_argument(
        "--insert-special",
        action="store_true",
        help="each sequence is BOS + L-2 tokens + EOS (the reference's insert_*_special)",
    )
    layout.add_argument(
        "--no-doc-eos", action="store_true", help="no EOS between documents (insert_*_eos=False)"
    )
    layout.add_argument(
        "--document-boundaries",
        action="store_true",
        help="store each sequence's document starts next to its tokens (needed by "
        "data.document_mask: attention within documents only)",
    )
    layout.add_argument("--samples-per-shard", type=int, default=4096)
    layout.add_argument("--dtype", choices=("auto", *DTYPES), default="auto")

    SourceOptions.add_arguments(parser.add_argument_group("input reading"))

    run = parser.add_argument_group("execution")
    run.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def _summary(manifest: dict) -> dict:
    splits = {
        name: {
            key: split[key]
            for key in ("documents", "sequences", "tokens", "dropped_tail_tokens", "unk_tokens")
        }
        | {"shards": len(split["shards"])}
        for name, split in manifest["splits"].items()
    }
    return {
        "seq_length": manifest["seq_length"],
        "dtype": manifest["dtype"],
        "tokenizer_fingerprint": manifest["tokenizer"]["fingerprint"],
        "splits": splits,
        "skipped": manifest["skipped"],
        "warnings": manifest["warnings"],
    }


def verify(directory: str) -> int:
    manifest = load_manifest(directory)
    for split in manifest.splits:
        manifest.verify(split, "sha256")
        logger.info("%s: %d shards match the manifest", split, len(manifest.split(split)["shards"]))
    print(json.dumps({"verified": str(manifest.path), "splits": sorted(manifest.splits)}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.verify:
            return verify(args.verify)
        missing = [f for f in ("tokenizer", "output", "seq_length") if getattr(args, f) is None]
        if missing:
            parser.error("--input needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
        options = PrepareOptions(
            seq_length=args.seq_length,
            samples_per_shard=args.samples_per_shard,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            split_seed=args.split_seed,
            insert_eos=not args.no_doc_eos,
            insert_special=args.insert_special,
            document_boundaries=args.document_boundaries,
            dtype=args.dtype,
            workers=args.workers,
            source=SourceOptions.from_arguments(args),
            progress=not args.no_progress,
        )
        manifest = prepare_shards(args.input, args.tokenizer, args.output, options, args.overwrite)
    except (ValueError, FileExistsError, ManifestError, TokenizerError) as exc:
        print(f"bd3-prepare-data: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(_summary(manifest), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
