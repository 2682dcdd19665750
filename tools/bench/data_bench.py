"""Throughput of the data pipeline on this machine: bd3-prepare-data and BD3DataLoader.

    python -m tools.bench.data_bench                      # print the numbers
    python -m tools.bench.data_bench --report docs/bench/data.md

Corpora: the embedded default corpus (always) and, with --text PATH, a text file of yours (e.g.
tinyshakespeare.txt, the second corpus of docs/bench/data.md). For each: train a sentencepiece
tokenizer (not timed as part of prepare), run prepare_shards on the corpus repeated --repeat
times (10) with 1 and 2 worker processes, best of --trials (2) runs (tokens/s = tokens entering
the sequence stream / wall time, reading and writing included), then iterate the train split
with BD3DataLoader at L = 128 and 1024 with 0 and 2 DataLoader workers (tokens/s in steady state,
the first micro-batch — worker start-up — excluded and reported separately).

The loader must never be the bottleneck: its tokens/s is compared with the training throughput
of a tiny CPU model (assumed 5-20k tokens/s; the ratio uses 20k, the pessimistic end).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TINY_MODEL_TOKENS_PER_S = 20_000


def _versions() -> dict[str, str]:
    import numpy
    import sentencepiece
    import tokenizers
    import torch
    import webdataset

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "sentencepiece": sentencepiece.__version__,
        "tokenizers": tokenizers.__version__,
        "webdataset": webdataset.__version__,
    }


def _machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"1-min load average {load:.2f} at the start"
    )


def bench_corpus(name: str, inputs: list[str], work: Path, args: argparse.Namespace) -> list[dict]:
    from megatron_bd3.data.loader import BD3DataLoader
    from megatron_bd3.data.sources import InputRecord, SourceOptions, iter_all_documents
    from megatron_bd3.data.tokenizer_training import SentencePieceOptions, train_sentencepiece
    from megatron_bd3.data.writer import PrepareOptions, prepare_shards

    rows: list[dict[str, Any]] = []
    records: list[InputRecord] = []
    documents = list(iter_all_documents(inputs, SourceOptions(), records))
    # Small corpora finish in fractions of a second; repeating them gives stable rates.
    work.mkdir(parents=True, exist_ok=True)
    repeated = work / f"{name}-x{args.repeat}.txt"
    repeated.write_text("\n\n".join(documents * args.repeat) + "\n", encoding="utf-8")
    text_bytes = repeated.stat().st_size
    start = time.perf_counter()
    tokenizer = train_sentencepiece(documents, SentencePieceOptions(vocab_size=args.vocab_size))
    train_s = time.perf_counter() - start
    tok_dir = tokenizer.save(work / f"{name}-tok")
    rows.append(
        {
            "corpus": name,
            "stage": f"train tokenizer (vocab {args.vocab_size})",
            "seconds": train_s,
            "tokens_per_s": None,
            "note": f"{len(documents)} documents; prepare reads them x{args.repeat} "
            f"({text_bytes / 1e6:.1f} MB)",
        }
    )

    prepared = {}
    for seq_length in (128, 1024):
        for workers in (1, 2):
            out = work / f"{name}-L{seq_length}-w{workers}"
            options = PrepareOptions(
                seq_length=seq_length, workers=workers, progress=False, val_fraction=0.05
            )
            seconds = float("inf")
            for _ in range(args.trials):  # best of N: the machine may be shared
                start = time.perf_counter()
                manifest = prepare_shards([str(repeated)], tok_dir, out, options, overwrite=True)
                seconds = min(seconds, time.perf_counter() - start)
            tokens = sum(s["document_tokens"] for s in manifest["splits"].values())
            rows.append(
                {
                    "corpus": name,
                    "stage": f"prepare L={seq_length} workers={workers}",
                    "seconds": seconds,
                    "tokens_per_s": tokens / seconds,
                    "note": f"{tokens} tokens, {manifest['splits']['train']['sequences']} "
                    f"train sequences",
                }
            )
            prepared[seq_length] = out

    for seq_length, micro in ((128, 32), (1024, 8)):
        for workers in (0, 2):
            loader = BD3DataLoader(
                prepared[seq_length],
                "train",
                micro_batch_size=micro,
                dp_rank=0,
                dp_size=1,
                seed=0,
                num_workers=workers,
            )
            batches = max(1, args.loader_tokens // (micro * seq_length))
            iterator = iter(loader)
            start = time.perf_counter()
            next(iterator)
            first_s = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(batches):
                next(iterator)
            seconds = time.perf_counter() - start
            tokens_per_s = batches * micro * seq_length / seconds
            rows.append(
                {
                    "corpus": name,
                    "stage": f"loader L={seq_length} micro={micro} workers={workers}",
                    "seconds": seconds,
                    "tokens_per_s": tokens_per_s,
                    "note": f"{batches} micro-batches over {batches * micro / loader.num_samples:.1f} "
                    f"epochs; first batch {first_s * 1000:.0f} ms; "
                    f"{tokens_per_s / TINY_MODEL_TOKENS_PER_S:.0f}x a 20k tok/s model",
                }
            )
    return rows


def render(rows: list[dict], command: str, machine: str) -> str:
    lines = [
        "# Data pipeline throughput",
        "",
        "Measured by `tools/bench/data_bench.py` (see its docstring for what each number is).",
        "",
        f"- Machine: {machine}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()),
        f"- Command: `{command}`",
        "",
        "| corpus | stage | seconds | tokens/s | notes |",
        "|---|---|---:|---:|---|",
    ]
    for row in rows:
        tps = "" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f}"
        lines.append(
            f"| {row['corpus']} | {row['stage']} | {row['seconds']:.3f} | {tps} | {row['note']} |"
        )
    loader_rows = [r for r in rows if r["stage"].startswith("loader")]
    slowest = min(r["tokens_per_s"] for r in loader_rows)
    lines += [
        "",
        f"Slowest loader configuration: {slowest:,.0f} tokens/s = "
        f"{slowest / TINY_MODEL_TOKENS_PER_S:.0f}x the training throughput of a tiny CPU model "
        f"(assumed at most {TINY_MODEL_TOKENS_PER_S:,} tokens/s; the requirement is >= 10x).",
        "",
        "Reading the numbers:",
        "- The loader reads each sample with one `pread` at an offset computed from the manifest, so"
        " in-process reading (`num_workers=0`) is fastest here; worker processes add a pickle hop"
        " per micro-batch but overlap reading with the training step. Either is orders of"
        " magnitude above what a CPU model consumes.",
        "- prepare is bound by sentencepiece encoding plus, at small L, ~25 us of tar header per"
        " sample; a second worker process helps when the main process (reading, packing,"
        " writing) is not the bottleneck. On a shared 2-core machine timings vary with load (the"
        " load average at the time is in the machine line; prepare is best of --trials runs).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", help="write the markdown report to this file")
    parser.add_argument(
        "--text",
        metavar="PATH",
        default=None,
        help="a second corpus: a text file of yours (default: only the embedded corpus)",
    )
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--trials", type=int, default=2, help="prepare runs; the best counts")
    parser.add_argument("--repeat", type=int, default=10, help="corpus repetitions for prepare")
    parser.add_argument(
        "--loader-tokens",
        type=int,
        default=32_000_000,
        help="tokens to read per loader configuration",
    )
    args = parser.parse_args(argv)
    corpora = [("default (Lee)", ["default"])]
    if args.text is not None:
        if not Path(args.text).is_file():
            parser.error(f"--text {args.text}: no such file")
        corpora.append((Path(args.text).stem, [args.text]))
    machine = _machine()  # the load average before this benchmark adds its own
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bd3-data-bench-") as tmp:
        for index, (name, inputs) in enumerate(corpora):
            rows += bench_corpus(name, inputs, Path(tmp) / str(index), args)
    command = "python -m tools.bench.data_bench " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    report = render(rows, command.strip(), machine)
    print(report)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
