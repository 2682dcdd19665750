"""Throughput of `bd3-eval` on CPU: NELBO tokens/s and generation samples/s, 1 and 2 processes.

    python -m tools.bench.eval_bench              # tiny_cpu and the ~30M model (~5 min, 2 cores)
    python -m tools.bench.eval_bench --quick      # tiny only, 1 process, ~50 s (the smoke test)
    python -m tools.bench.eval_bench --models 30m --procs 2 --nelbo-samples 4

Everything is made from scratch, offline, under --work (default runs/bench_eval): a 512-piece
tokenizer and shards of the embedded corpus (bd3-train-tokenizer / bd3-prepare-data `--input
default`, shared with tools/bench/train_bench.py, whose MODELS define both configs); per config a
BD3 checkpoint from a few bd3-train steps (throughput does not depend on what the weights
learned) and an AR scorer, the same config with `model.preset=ar`, a few bd3-train steps,
converted with `bd3-convert --to standalone`. Then one `bd3-eval` per config and process count
(torchrun --standalone for 2 processes: DP = 2) evaluates the NELBO bound on the validation split
(K = --nelbo-samples repeats, global batch --batch-size) and generates --num-samples samples of
the model's L tokens (first-hitting sampler, KV cache) scored by the AR scorer. Figures are read
from its eval.json:

- NELBO tokens/s = counted tokens x K / seconds of the likelihood pass (eval.json
  `likelihood[0].tokens_per_s`; counted tokens exclude position 0, the runs train with ignore_bos);
- samples/s = N / `generation.generation_seconds` (the slowest rank's sampling time, scoring
  excluded) and generated tokens/s = `generation.tokens_per_second`;
- wall s: the whole bd3-eval process (imports, model load, both parts, scoring, eval.json).

Threads: each process gets cores / processes OpenMP threads (--threads to fix it), so 1 and 2
processes use the same cores. Results: --json (default runs/bench/eval_bench.json) with the
machine, versions and load averages; a markdown table on stdout. Report: docs/bench/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tools.bench import common
from tools.bench.train_bench import MODELS, prepare_data

REPO_ROOT = Path(__file__).resolve().parents[2]

# per config: training steps for the checkpoints, NELBO repeats K, samples N, sample batch size
# (sized for ~5 minutes in all on 2 cores: each timed part takes 1-60 s)
FULL = {"tiny": {"train_steps": 3, "nelbo_samples": 16, "num_samples": 64, "sample_batch": 8},
        "30m": {"train_steps": 3, "nelbo_samples": 4, "num_samples": 16, "sample_batch": 4}}
QUICK = {"tiny": {"train_steps": 1, "nelbo_samples": 1, "num_samples": 2, "sample_batch": 1},
         "30m": {"train_steps": 1, "nelbo_samples": 1, "num_samples": 2, "sample_batch": 1}}


def cpu_family_model() -> str | None:
    """/proc/cpuinfo's "cpu family" and "model" (e.g. 25/17, Zen 4): common.cpu_model() reads
    only "AMD EPYC" on the development VMs, which run on several processor generations."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if ":" in line and line.split(":", 1)[0].strip() in ("cpu family", "model"))
    except OSError:
        return None
    values = {key.strip(): value.strip() for key, value in fields.items()}
    return f"family {values.get('cpu family')}, model {values.get('model')}" if values else None


def _env(threads: int) -> dict[str, str]:
    return dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONWARNINGS="ignore",
                OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO_ROOT))


def _call(cmd: list[str], what: str, threads: int) -> float:
    """Run `cmd` in the checkout; returns its wall seconds; on failure raises with its output."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")
    return time.perf_counter() - start


def train_checkpoint(work: Path, model: str, preset: str, steps: int, threads: int) -> Path:
    """A few bd3-train steps on one process, final checkpoint saved; returns the checkpoint root."""
    config, overrides, seq_length = MODELS[model]
    tok, manifest = prepare_data(work, seq_length)
    name = f"{model}_{preset}_steps{steps}"
    root = work / name / "checkpoints"
    if (root / "latest").exists():
        return root
    _call([sys.executable, "-m", "megatron_bd3.cli.train", config, *overrides,
           f"model.preset={preset}", f"data.manifest={manifest}", f"data.tokenizer={tok}",
           f"training.train_iters={steps}", "validation.interval=0", "validation.at_end=false",
           "checkpoint.interval=0", "checkpoint.save_final=true", "checkpoint.resume=none",
           f"checkpoint.dir={root}", "logging.interval=1", "logging.tqdm=false",
           "logging.wandb.mode=disabled", f"logging.output_dir={work}",
           f"logging.run_name={name}"], f"bd3-train {name}", threads)
    return root


def ar_scorer(work: Path, model: str, steps: int, threads: int) -> Path:
    """The AR scorer of a config: preset ar, `steps` training steps, as a standalone directory."""
    out = work / f"{model}_ar_steps{steps}_standalone"
    if not (out / "model.safetensors").exists():
        root = train_checkpoint(work, model, "ar", steps, threads)
        _call([sys.executable, "-m", "megatron_bd3.cli.convert", "--checkpoint", str(root),
               "--to", "standalone", "--output", str(out), "--overwrite"],
              f"bd3-convert {model} ar", threads)
    return out


def eval_case(work: Path, model: str, procs: int, settings: dict, scorer: Path,
              checkpoint: Path, threads: int, batch_size: int) -> dict[str, Any]:
    """One bd3-eval run (NELBO on the validation split + N scored samples); returns its figures."""
    _, _, seq_length = MODELS[model]
    data = work / f"data_L{seq_length}"
    out = work / f"eval_{model}_p{procs}"
    args = [str(checkpoint), "--data", str(data), "--nelbo-samples",
            str(settings["nelbo_samples"]), "--batch-size", str(batch_size),
            "--num-samples", str(settings["num_samples"]), "--length", str(seq_length),
            "--sample-batch-size", str(settings["sample_batch"]), "--scorer", str(scorer),
            "--output", str(out), "--no-plots", "--no-progress"]
    if procs == 1:
        cmd = [sys.executable, "-m", "megatron_bd3.cli.eval", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={procs}", "-m", "megatron_bd3.cli.eval", *args]
    if (out / "eval.json").exists():
        (out / "eval.json").unlink()
    load_before = common.load_average()
    wall = _call(cmd, f"bd3-eval {model} on {procs} processes", threads)
    load_after = common.load_average()
    result = json.loads((out / "eval.json").read_text())
    nelbo, generation = result["likelihood"][0], result["generation"]
    return {
        "case": f"{model}_p{procs}",
        "model": model,
        "processes": procs,
        "threads_per_process": threads,
        "layout": result["layout"],
        "seq_length": seq_length,
        "nelbo": {
            "sequences": nelbo["sequences"],
            "counted_tokens": nelbo["tokens"],
            "nelbo_samples": settings["nelbo_samples"],
            "batch_size": batch_size,
            "seconds": nelbo["seconds"],
            "tokens_per_s": nelbo["tokens_per_s"],
            "nll": nelbo["nll"],
        },
        "generation": {
            "num_samples": generation["num_samples"],
            "length": generation["length"],
            "sample_batch_size": settings["sample_batch"],
            "num_generated_mean": generation["num_generated"],
            "nfe_mean": generation["nfe"],
            "generation_seconds": generation["generation_seconds"],
            "samples_per_s": generation["num_samples"] / generation["generation_seconds"],
            "tokens_per_s": generation["tokens_per_second"],
            "gen_ppl": generation["gen_ppl"],
        },
        "wall_s": wall,
        "load_average_before": round(load_before, 2),
        "load_average_after": round(load_after, 2),
    }


def render(rows: list[dict]) -> str:
    lines = ["| case | processes x threads | NELBO tokens/s (counted x K) | NELBO s | "
             "samples/s | generated tokens/s | generation s | wall s | load before / after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n, g = r["nelbo"], r["generation"]
        lines.append(
            f"| {r['model']} | {r['processes']} x {r['threads_per_process']} | "
            f"{n['tokens_per_s']:,.0f} ({n['counted_tokens']:,} x {n['nelbo_samples']}) | "
            f"{n['seconds']:.1f} | {g['samples_per_s']:.2f} ({g['num_samples']} x "
            f"{g['length']}) | {g['tokens_per_s']:,.0f} | {g['generation_seconds']:.1f} | "
            f"{r['wall_s']:.0f} | {r['load_average_before']:.1f} / {r['load_average_after']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny config, 1 process, 1 training step, K = 1, N = 2")
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    parser.add_argument("--procs", nargs="+", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="OpenMP threads per process (default cores / processes)")
    parser.add_argument("--nelbo-samples", type=int, default=None, help="K (default per config)")
    parser.add_argument("--num-samples", type=int, default=None, help="N (default per config)")
    parser.add_argument("--batch-size", type=int, default=8, help="bd3-eval global batch G")
    parser.add_argument("--work", default=str(REPO_ROOT / "runs" / "bench_eval"))
    parser.add_argument("--json", default=str(REPO_ROOT / "runs" / "bench" / "eval_bench.json"))
    args = parser.parse_args(argv)
    models = args.models or (["tiny"] if args.quick else list(MODELS))
    procs = args.procs or ([1] if args.quick else [1, 2])
    cores = os.cpu_count() or 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = {**common.machine(), "cpu_family_model": cpu_family_model()}
    report: dict[str, Any] = {"machine": machine, "versions": common.versions(),
                              "command": " ".join(["python -m tools.bench.eval_bench",
                                                   *(sys.argv[1:] if argv is None else argv)]),
                              "load_average_at_start": round(common.load_average(), 2),
                              "setup": {}, "cases": []}
    for model in models:
        settings = dict((QUICK if args.quick else FULL)[model])
        if args.nelbo_samples:
            settings["nelbo_samples"] = args.nelbo_samples
        if args.num_samples:
            settings["num_samples"] = args.num_samples
        setup_start = time.perf_counter()
        checkpoint = train_checkpoint(work, model, "bd3", settings["train_steps"], cores)
        scorer = ar_scorer(work, model, settings["train_steps"], cores)
        report["setup"][model] = {"settings": settings, "train_overrides": MODELS[model][1],
                                  "base_config": MODELS[model][0],
                                  "seconds": round(time.perf_counter() - setup_start, 1)}
        print(f"{model}: checkpoint and AR scorer ready "
              f"({report['setup'][model]['seconds']:.0f} s)", flush=True)
        for n in procs:
            threads = args.threads or max(1, cores // n)
            row = eval_case(work, model, n, settings, scorer, checkpoint, threads,
                            args.batch_size)
            report["cases"].append(row)
            print(json.dumps({k: row[k] for k in ("case", "nelbo", "generation", "wall_s")}),
                  flush=True)
    report["load_average_at_end"] = round(common.load_average(), 2)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(f"\n{machine['cpu']} ({machine['cpu_family_model']}, {machine['cpu_capability']}), "
          f"{machine['cores']} cores, "
          f"versions {report['versions']}; load {report['load_average_at_start']} -> "
          f"{report['load_average_at_end']}; {report['seconds']:.0f} s in all\n")
    print(render(report["cases"]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
