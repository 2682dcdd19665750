"""The main job end to end on the embedded default corpus (the README's `make demo`).

Steps, each a real tool run the way a user would run it:
  1. train a sentencepiece tokenizer on the embedded corpus       (bd3-train-tokenizer)
  2. tokenize it into webdataset shards of L-token sequences       (bd3-prepare-data)
  3. show the block-diffusion attention mask for a small L and B
  4. train the tiny BD3 model on 2 CPU processes, validate, checkpoint (bd3-train via torchrun)
  5. convert the checkpoint to the standalone format and sample     (bd3-convert, bd3-sample)

Everything lands under --workdir (default runs/demo); a second run starts from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 74 - len(text)), flush=True)


def _run(cmd: list[str], log: Path | None = None) -> None:
    """Run one tool; with `log`, its standard output goes to that file instead of the console."""
    print("$ " + " ".join(cmd) + (f"  > {log}" if log else ""), flush=True)
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("DS_ACCELERATOR", "cpu")
    if log is None:
        subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=True)
        return
    with open(log, "w") as out:
        subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=True, stdout=out)


def render_mask(seq_len: int, block_size: int) -> str:
    """The [x_t ; x_0] training mask as rows of 0/1, the layout of the method doc's example."""
    from megatron_bd3.diffusion import block_diffusion_mask, mask_density

    mask = block_diffusion_mask(seq_len, block_size)  # [2L, 2L], True = may attend
    lines = [
        f"queries x keys over [x_t ; x_0], L={seq_len}, B={block_size} "
        f"(density {mask.float().mean().item():.3f} = 1/4 + B/4L = "
        f"{mask_density(seq_len, block_size):.3f})"
    ]
    for row in mask.int().tolist():
        noisy = "".join(map(str, row[:seq_len]))
        clean = "".join(map(str, row[seq_len:]))
        lines.append(f"  {noisy} {clean}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo", help="where everything is written")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (CPU: gloo)")
    parser.add_argument("--train-iters", type=int, default=300, help="training steps")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seq-length", type=int, default=64)
    args = parser.parse_args(argv)

    workdir = (REPO_ROOT / args.workdir).resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    tokenizer_dir, data_dir = workdir / "tokenizer", workdir / "data"
    py = sys.executable
    started = time.perf_counter()

    _banner("1. tokenizer on the embedded corpus")
    _run([py, "-m", "tools.train_tokenizer", "--input", "default", "--text-mode", "line",
          "--output", str(tokenizer_dir), "--vocab-size", str(args.vocab_size), "-q"],
         log=workdir / "tokenizer.json.log")

    _banner("2. webdataset shards")
    _run([py, "-m", "tools.prepare_data", "--input", "default", "--text-mode", "line",
          "--tokenizer", str(tokenizer_dir), "--output", str(data_dir),
          "--seq-length", str(args.seq_length), "--samples-per-shard", "256",
          "--no-progress", "-q"], log=workdir / "prepare_data.json.log")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        print(f"  {split}: {info['sequences']} sequences of {args.seq_length} tokens")

    _banner("3. the block-diffusion attention mask")
    print(render_mask(6, 2))

    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; outputs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
