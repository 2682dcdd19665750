"""`python -m tools.bench` (`make bench`): the benchmarks of this repository in one command.

    python -m tools.bench                      # training steps vs the reference (a few minutes)
    python -m tools.bench --part all           # + sampler, data pipeline and model benches
    python -m tools.bench --part sampler -- --only ref-256-b1-cache ref-256-b1-nocache

Parts:
    train    tools/bench/train_step_bench.py: BD3 (B = 4, 16), MDLM and AR training steps at
             L = 256 and 512 in the reference's configuration (docs/bench/vs-reference.md)
    sampler  tools/bench/sampler_bench.py (standalone sampler, KV cache vs none)
    data     tools/bench/data_bench.py (shard preparation and loader throughput)
    model    tools/bench/model_bench.py (core attention kernels, BD3 vs AR step)
    eval     tools/bench/eval_bench.py (bd3-eval NELBO tokens/s and generation samples/s, 1 and 2
             processes; ~5 min on 2 cores; docs/bench/evaluation.md)
Each part runs in its own process; arguments after `--` go to the selected part (one part only).
Results: runs/bench/bench.json (what each part wrote or printed, with the machine and load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tools.bench import common

REPO_ROOT = Path(__file__).resolve().parents[2]
PARTS = ("train", "sampler", "data", "model", "eval")


def _run(module: str, args: list[str]) -> dict:
    """Run `python -m module args` with output streamed; returns status and the output tail."""
    started = time.perf_counter()
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        if "warn" in line.lower():
            continue  # megatron/apex import warnings
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    returncode = proc.wait()
    return {
        "returncode": returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "output_tail": lines[-60:],
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=(*PARTS, "all"), default="train")
    parser.add_argument("--out", default=str(REPO_ROOT / "runs/bench"))
    args = parser.parse_args(argv)
    parts = list(PARTS) if args.part == "all" else [args.part]
    if extra and len(parts) > 1:
        parser.error("arguments after -- go to one part; pick it with --part")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": common.machine(), "versions": common.versions(), "parts": {}}
    failed = False
    for part in parts:
        print(f"== {part} ==", flush=True)
        if part == "train":
            json_path = out / "train_step.json"
            result = _run("tools.bench.train_step_bench", [*extra, "--json", str(json_path)])
        elif part == "sampler":
            json_path = out / "sampler.json"
            result = _run("tools.bench.sampler_bench", [*extra, "--json", str(json_path)])
        elif part == "eval":
            json_path = out / "eval_bench.json"
            result = _run("tools.bench.eval_bench", [*extra, "--json", str(json_path)])
        elif part == "data":
            json_path = None
            result = _run("tools.bench.data_bench", extra)
        else:
            json_path = None
            result = _run("tools.bench.model_bench", extra)
        if json_path is not None and json_path.exists() and result["returncode"] == 0:
            result["results"] = json.loads(json_path.read_text())
        report["parts"][part] = result
        failed |= result["returncode"] != 0
    report["load_average_1min_at_end"] = round(common.load_average(), 2)
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out / 'bench.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
