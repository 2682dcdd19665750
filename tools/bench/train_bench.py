"""Training throughput (tokens/s) and MFU of the real trainer, 1 and 2 processes.

    python -m tools.bench.train_bench      # tiny_cpu and a ~30M model, 1 and 2 processes
    python -m tools.bench.train_bench --models tiny --procs 2 --steps 40

Each case runs bd3-train (megatron_bd3/cli/train.py; under torchrun for 2 processes) on data
prepared from the embedded corpus, with validation and checkpoints off and a log line every
step, then reads `metrics.jsonl`: the reported figures are the medians over the logged steps
after --warmup steps (the first steps include one-off costs). Tokens/s counts data tokens
(global batch x L);
MFU = model FLOPs of the 2L stream with the sparse attention term (megatron_bd3/training/flops.py)
/ (elapsed x world size x peak FLOP/s per process). The CPU "peak" is each process's measured
fp32 512x512 matmul throughput with its thread count, so CPU MFU says how close the step gets to
torch's own matmul speed, not to the silicon's nominal peak. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

MODELS = {
    # name: (base config, overrides, seq length of the data it needs)
    "tiny": ("tiny_cpu.yaml", [], 64),
    "30m": (
        "tiny_cpu.yaml",
        [
            "model.num_layers=10",
            "model.hidden_size=512",
            "model.num_attention_heads=8",
            "model.seq_length=128",
            "model.block_size=16",
            "training.micro_batch_size=4",
            "training.global_batch_size=8",
        ],
        128,
    ),
}


def prepare_data(work: Path, seq_length: int) -> tuple[Path, Path]:
    tok, data = work / "tok", work / f"data_L{seq_length}"
    if not (tok / "bd3_tokenizer.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "megatron_bd3.cli.train_tokenizer",
                "--input",
                "default",
                "--output",
                str(tok),
                "--vocab-size",
                "512",
            ],
            cwd=REPO_ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    if not (data / "manifest.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "megatron_bd3.cli.prepare_data",
                "--input",
                "default",
                "--tokenizer",
                str(tok),
                "--output",
                str(data),
                "--seq-length",
                str(seq_length),
            ],
            cwd=REPO_ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return tok, data / "manifest.json"


def run_case(work: Path, model: str, procs: int, steps: int, threads: int) -> dict:
    config, overrides, seq_length = MODELS[model]
    tok, manifest = prepare_data(work, seq_length)
    name = f"{model}_p{procs}"
    run_args = [
        config,
        *overrides,
        f"data.manifest={manifest}",
        f"data.tokenizer={tok}",
        f"training.train_iters={steps}",
        "validation.interval=0",
        "validation.at_end=false",
        "checkpoint.interval=0",
        "checkpoint.save_final=false",
        "logging.interval=1",
        "logging.tqdm=false",
        "logging.wandb.mode=disabled",
        f"logging.output_dir={work}",
        f"logging.run_name={name}",
        "checkpoint.resume=none",
    ]
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu" if not torch.cuda.is_available() else "cuda",
        WANDB_MODE="offline",
        OMP_NUM_THREADS=str(threads),
        PYTHONPATH=str(REPO_ROOT),
    )
    metrics = work / name / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    if procs == 1:
        cmd = [sys.executable, "-m", "megatron_bd3.cli.train", *run_args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={procs}",
            "-m",
            "megatron_bd3.cli.train",
            *run_args,
        ]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-4000:]}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    params = next((line for line in proc.stdout.splitlines() if "parameters on rank 0" in line), "")
    return {"name": name, "records": records, "wall": wall, "log": params}


def summarize(case: dict, warmup: int) -> dict:
    steady = [r for r in case["records"] if "tokens_per_s" in r and r["step"] > warmup]
    return {
        "case": case["name"],
        "steps": len(steady),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "step_s": statistics.median(
            r2["time"] - r1["time"] for r1, r2 in zip(steady, steady[1:], strict=False)
        )
        if len(steady) > 1
        else float("nan"),
        "mem_gib": max(r["mem_gib"] for r in steady),
        "wall_s": case["wall"],
        "params": case["log"].split("parameters on rank 0")[0].rsplit(";", 1)[-1].strip(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per run (default 40 for tiny, 12 for 30m)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="logged steps left out")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--work", default=str(REPO_ROOT / "runs" / "bench_train"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        for procs in args.procs:
            steps = args.steps or (40 if model == "tiny" else 12)
            rows.append(summarize(run_case(work, model, procs, steps, args.threads), args.warmup))
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, OMP threads/process {args.threads}\n"
    )
    print("| case | parameters | tokens/s | MFU | s/step | peak mem GiB | steps | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['params']} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
            f"{r['step_s']:.3f} | {r['mem_gib']:.2f} | {r['steps']} | {r['wall_s']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
