"""The cost of document masking (data.document_mask): training-step time and memory with and
without it, on CPU (docs/bench/long-context.md, "Document masking overhead").

    python -m tools.bench.document_mask_bench                     # L 1024 and 2048, both kernels
    python -m tools.bench.document_mask_bench --lengths 1024 --steps 3 --kernels block

Model: the benchmark network of train_step_bench.py (4 layers, hidden 256, 4 heads, FFN 1024,
vocab 8192 incl. [MASK], the reference architecture), B = 16, fp32, dropout 0 (the
block-structured kernel runs without attention dropout), batch --batch, random weights, 2
threads. One step = the model's forward with the NELBO terms (megatron_bd3.model.forward_step's
model call), backward, and a torch AdamW step; the noise is drawn once per case (the noise does
not depend on the documents).

Cases, per L and kernel:
    off   data.document_mask off (the reference's wrapping): the cached block-diffusion mask
    on    data.document_mask on, a fixed random document layout per sequence: document lengths
          drawn uniformly from [1, 2·--mean-document], so about L / --mean-document documents
          per sequence
Kernels: `block` is the CPU block-structured path (cpu_block_attention, the default on CPU),
`dense` SDPA with the dense mask in two calls (cpu_block_attention off, what runs with attention
dropout).

Timing: both cases of an (L, kernel) pair are built in one process and stepped alternately, in a
seeded random order per round, so they share the background load; medians over --steps rounds
after one warm-up step each; wall and CPU time (process_time, both threads). Memory: each case
in a fresh process, peak RSS (ru_maxrss, imports included) after two steps. Run it under `nice`
on a shared machine: the summary records the load average before and after. On a machine
whose cores are taken by other work, wall time measures the waiting more than the step; use
`--threads 1` there and read the CPU-time columns (with one thread no core spin-waits for a
descheduled one, so process time is the step's own work).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

LAYERS, HIDDEN, HEADS, VOCAB, FFN, BLOCK = 4, 256, 4, 8192, 1024, 16
MASK_ID = VOCAB - 1


def _init(threads: int) -> None:
    import logging
    import warnings

    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    from megatron_bd3.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig(seed=0), environ={})


def document_layout(batch: int, seq_length: int, mean_document: int, seed: int):
    """[b, L] document ids: runs of lengths uniform in [1, 2·mean_document]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        ids: list[int] = []
        while len(ids) < seq_length:
            length = int(torch.randint(1, 2 * mean_document + 1, (1,), generator=gen))
            ids += [len(set(ids))] * length
        rows.append(ids[:seq_length])
    return torch.tensor(rows)


class Case:
    """One model and batch: document masking on or off, at (L, kernel)."""

    def __init__(self, seq_length: int, kernel: str, documents: bool, args) -> None:
        import torch

        from megatron_bd3.diffusion import ClipRange
        from megatron_bd3.model import BD3LossInputs, BD3Model, bd3_config, reference_architecture
        from megatron_bd3.parallel import cpu_safe_config_overrides
        from megatron_bd3.training.batches import NoiseSettings, make_batch

        self.name = f"L{seq_length}-{kernel}-{'on' if documents else 'off'}"
        overrides = {**reference_architecture(dropout=0.0), **cpu_safe_config_overrides()}
        config = bd3_config(
            num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, vocab_size=VOCAB,
            mask_token_id=MASK_ID, seq_length=seq_length, block_size=BLOCK, ffn_hidden_size=FFN,
            attention_kernel="sdpa", cpu_block_attention=kernel == "block",
            document_mask=documents, **overrides,
        )
        torch.manual_seed(0)
        self.model = BD3Model(config).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4)
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, MASK_ID, (args.batch, seq_length), generator=gen)
        loader_batch = {"tokens": tokens, "global_batch_position": torch.arange(args.batch)}
        self.document_ids = document_layout(args.batch, seq_length, args.mean_document, seed=2)
        if documents:
            loader_batch["document_ids"] = self.document_ids
        batch = make_batch(loader_batch, settings=NoiseSettings.from_model_config(config),
                           clip_range=ClipRange(1e-3, 1.0), seed=0, step=0,
                           global_batch_size=args.batch)
        self.inputs = (batch["x_t"], batch["x_0"],
                       BD3LossInputs(masked=batch["masked"], loss_weight=batch["loss_weight"]))
        self.documents = batch.get("document_ids")

    def step(self) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad(set_to_none=True)
        token_loss = self.model(*self.inputs, document_ids=self.documents)  # [b, L]
        loss = token_loss.sum() / token_loss.numel()
        loss.backward()
        self.optimizer.step()
        return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def timing_worker(args) -> dict[str, Any]:
    _init(args.threads)
    seq_length, kernel = args.worker_case
    cases = [Case(seq_length, kernel, documents, args) for documents in (False, True)]
    for case in cases:
        case.step()  # warm-up
    order = random.Random(seq_length)
    rounds = []
    for _ in range(args.steps):
        shuffled = list(cases)
        order.shuffle(shuffled)
        rounds.append({case.name: case.step() for case in shuffled})
    documents = cases[1].document_ids
    per_sequence = [len(set(row.tolist())) for row in documents]
    return {"rounds": rounds, "documents_per_sequence": per_sequence}


def memory_worker(args) -> dict[str, Any]:
    from tools.bench import common

    _init(args.threads)
    seq_length, kernel, documents = args.worker_case
    before = common.peak_rss_gib()
    case = Case(seq_length, kernel, documents == "on", args)
    for _ in range(2):
        case.step()
    return {"peak_rss_gib": common.peak_rss_gib(), "rss_after_imports_gib": before}


def _spawn(mode: str, case: list, args) -> dict:
    command = [sys.executable, "-m", "tools.bench.document_mask_bench", "--worker", mode,
               "--worker-case", json.dumps(case), "--threads", str(args.threads),
               "--steps", str(args.steps), "--batch", str(args.batch),
               "--mean-document", str(args.mean_document)]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} worker {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> dict[str, Any]:
    from tools.bench import common

    summary: dict[str, Any] = {
        "machine": common.machine(), "versions": common.versions(), "threads": args.threads,
        "batch": args.batch, "mean_document": args.mean_document, "steps": args.steps,
        "command": "python -m tools.bench.document_mask_bench " + " ".join(sys.argv[1:]),
        "rows": [],
    }
    for seq_length in args.lengths:
        for kernel in args.kernels:
            timing = _spawn("timing", [seq_length, kernel], args)
            names = {flag: f"L{seq_length}-{kernel}-{flag}" for flag in ("off", "on")}
            row: dict[str, Any] = {"L": seq_length, "kernel": kernel,
                                   "documents_per_sequence": timing["documents_per_sequence"]}
            for flag, name in names.items():
                steps = [r[name] for r in timing["rounds"]]
                quiet = [s for s in steps if s["cpu"] >= 0.75 * args.threads * s["wall"]]
                row[f"{flag}_wall"] = common.median([s["wall"] for s in steps])
                row[f"{flag}_cpu"] = common.median([s["cpu"] for s in steps])
                row[f"{flag}_undisturbed"] = f"{len(quiet)}/{len(steps)}"
                row[f"{flag}_memory"] = _spawn("memory", [seq_length, kernel, flag], args)
            row["ratio_wall"] = common.median(
                [r[names["on"]]["wall"] / r[names["off"]]["wall"] for r in timing["rounds"]])
            row["ratio_cpu"] = common.median(
                [r[names["on"]]["cpu"] / r[names["off"]]["cpu"] for r in timing["rounds"]])
            summary["rows"].append(row)
            print(json.dumps(row), flush=True)
    summary["load_average_after"] = round(common.load_average(), 2)
    return summary


def render(summary: dict[str, Any]) -> str:
    lines = ["| L | kernel | docs/sequence | wall s off / on | CPU s off / on | on ÷ off wall | "
             "on ÷ off CPU | peak RSS GiB off / on |", "|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        docs = row["documents_per_sequence"]
        lines.append(
            f"| {row['L']} | {row['kernel']} | {sum(docs) / len(docs):.1f} | "
            f"{row['off_wall']:.2f} / {row['on_wall']:.2f} | "
            f"{row['off_cpu']:.2f} / {row['on_cpu']:.2f} | {row['ratio_wall']:.3f} | "
            f"{row['ratio_cpu']:.3f} | {row['off_memory']['peak_rss_gib']:.2f} / "
            f"{row['on_memory']['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--kernels", nargs="+", choices=("block", "dense"),
                        default=["block", "dense"])
    parser.add_argument("--steps", type=int, default=5, help="timed rounds per (L, kernel)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mean-document", type=int, default=256,
                        help="mean document length in tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "runs" / "bench" /
                        "document_mask.json")
    parser.add_argument("--worker", choices=("timing", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-case", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "timing":
        print(json.dumps(timing_worker(args)))
        return 0
    if args.worker == "memory":
        print(json.dumps(memory_worker(args)))
        return 0
    summary = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(render(summary))
    print(f"load average: {summary['machine']['load_average_1min']} before, "
          f"{summary['load_average_after']} after; written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
