"""The main job end to end on the embedded default corpus (the README's `make demo`).

Steps, each a real tool run the way a user would run it:
  1. train a sentencepiece tokenizer on the embedded corpus       (bd3-train-tokenizer)
  2. tokenize it into webdataset shards of L-token sequences       (bd3-prepare-data)
  3. show the block-diffusion attention mask for a small L and B
  4. train the tiny BD3 model on 2 CPU processes, validate, checkpoint (bd3-train via torchrun)
  5. convert the checkpoint to the standalone format and sample     (bd3-convert, bd3-sample)
  6. evaluate the checkpoint on 2 processes: the NELBO bound with a 95% interval (bd3-eval)

Everything lands under --workdir (default runs/demo, relative to the current directory); a second
run starts from scratch. Run it from the checkout: `python -m tools.demo` (or `make demo`).
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


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 74 - len(text)), flush=True)


def _run(cmd: list[str], log: Path | None = None) -> None:
    """Run one tool; with `log`, its standard output goes to that file instead of the console."""
    print("$ " + " ".join(cmd) + (f"  > {log}" if log else ""), flush=True)
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("DS_ACCELERATOR", "cpu")
    if log is None:
        subprocess.run(cmd, env=env, check=True)
        return
    with open(log, "w") as out:
        subprocess.run(cmd, env=env, check=True, stdout=out)


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


def _summarise_training(metrics_path: Path) -> None:
    """Print the falling training loss and the validation perplexity from the run's metrics."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_ppl" in r]
    if train:
        first, last = train[0], train[-1]
        print(f"  training loss: {first['loss']:.3f} (step {first['step']}) -> "
              f"{last['loss']:.3f} (step {last['step']})")
    for r in val:
        print(f"  validation at step {r['step']}: NELBO {r['val_nll']:.3f} nats/token, "
              f"perplexity <= {r['val_ppl']:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo", help="where everything is written")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (CPU: gloo)")
    parser.add_argument("--train-iters", type=int, default=300, help="training steps")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seq-length", type=int, default=64)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    tokenizer_dir, data_dir = workdir / "tokenizer", workdir / "data"
    py = sys.executable
    started = time.perf_counter()

    _banner("1. tokenizer on the embedded corpus")
    _run([py, "-m", "megatron_bd3.cli.train_tokenizer", "--input", "default",
          "--text-mode", "line", "--output", str(tokenizer_dir),
          "--vocab-size", str(args.vocab_size), "-q"],
         log=workdir / "tokenizer.json.log")

    _banner("2. webdataset shards")
    _run([py, "-m", "megatron_bd3.cli.prepare_data", "--input", "default", "--text-mode", "line",
          "--tokenizer", str(tokenizer_dir), "--output", str(data_dir),
          "--seq-length", str(args.seq_length), "--samples-per-shard", "256",
          "--no-progress", "-q"], log=workdir / "prepare_data.json.log")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        print(f"  {split}: {info['sequences']} sequences of {args.seq_length} tokens")

    _banner("3. the block-diffusion attention mask")
    print(render_mask(6, 2))

    _banner(f"4. train the tiny BD3 model on {args.nproc} CPU processes")
    run_name = "tiny_cpu"
    _run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
          "-m", "megatron_bd3.cli.train", "tiny_cpu.yaml",
          f"data.manifest={data_dir / 'manifest.json'}", f"data.tokenizer={tokenizer_dir}",
          f"logging.output_dir={workdir}", f"logging.run_name={run_name}",
          f"training.train_iters={args.train_iters}", "logging.tqdm=false"])
    run_dir = workdir / run_name
    _summarise_training(run_dir / "metrics.jsonl")

    _banner("5. convert to the standalone format and sample")
    standalone_dir = workdir / "standalone"
    _run([py, "-m", "megatron_bd3.cli.convert", "--checkpoint", str(run_dir / "checkpoints"),
          "--to", "standalone", "--output", str(standalone_dir)])
    _run([py, "-m", "megatron_bd3.cli.sample", str(standalone_dir), "--num-samples", "2",
          "--batch-size", "2", "--length", str(2 * args.seq_length), "--top-p", "0.9",
          "--seed", "1", "--output", str(workdir / "samples.jsonl")])

    _banner(f"6. evaluate the checkpoint on {args.nproc} processes (NELBO bound, 95% interval)")
    _run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
          "-m", "megatron_bd3.cli.eval", str(run_dir / "checkpoints"),
          "--data", f"validation={data_dir}", "--nelbo-samples", "4",
          "--output", str(workdir / "eval"), "--no-progress"])

    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; outputs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
