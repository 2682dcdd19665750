"""Shared fixtures: tiny data, and checkpoints trained by the real trainer at TP=2 and PP=2.

The tokenizer has 300 pieces (not a multiple of 128), so the megatron vocabulary is padded to
384 rows at TP=1 and 512 at TP=2: the converter must strip (and re-add) real padding.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron_bd3.paths import shipped_config
from tests.dist_launcher import REPO_ROOT, run_distributed

WORKER = Path(__file__).parent / "workers" / "train_and_save.py"
VOCAB_SIZE = 300
SEQ_LENGTH = 32


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(manifest, tokenizer dir) of the embedded corpus at L = 32 with a 300-piece vocabulary."""
    base = tmp_path_factory.mktemp("convert_data")
    tok, data = base / "tok", base / "data"
    for cmd in (
        ["-m", "megatron_bd3.cli.train_tokenizer", "--input", "default", "--output", str(tok),
         "--vocab-size", str(VOCAB_SIZE)],
        ["-m", "megatron_bd3.cli.prepare_data", "--input", "default", "--tokenizer", str(tok),
         "--output", str(data), "--seq-length", str(SEQ_LENGTH)],
    ):
        subprocess.run([sys.executable, *cmd], cwd=REPO_ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return data / "manifest.json", tok


def run_config(manifest: Path, tokenizer: Path, run_dir: Path, *, parallel: dict,
               model: dict | None = None) -> dict:
    """A 2-layer, 64-wide reference-architecture BD3-LM trained 2 steps, EMA decay 0.5, with a
    clip search at the end (so the learned clip range is not the initial one)."""
    return {
        "model": {"preset": "bd3", "architecture": "reference", "num_layers": 2,
                  "hidden_size": 64, "num_attention_heads": 4, "seq_length": SEQ_LENGTH,
                  "block_size": 4, "dropout": 0.1, "attention_kernel": "sdpa", **(model or {})},
        "parallel": parallel,
        "data": {"manifest": str(manifest), "tokenizer": str(tokenizer)},
        "optimizer": {"lr": 1e-2},
        "schedule": {"warmup_steps": 1},
        "training": {"train_iters": 2, "micro_batch_size": 2, "global_batch_size": 4, "seed": 7,
                     "precision": "fp32", "ema_decay": 0.5},
        "validation": {"interval": 0, "at_end": True, "num_batches": 1,
                       "clip_search": {"enabled": True, "num_batches": 1, "widths": [0.5]}},
        "checkpoint": {"interval": 0, "keep_last": None, "dir": str(run_dir / "ckpt")},
        "logging": {"interval": 1, "run_name": "run", "output_dir": str(run_dir), "tqdm": False,
                    "wandb": {"mode": "disabled"}},
        "deepspeed": {"config": str(shipped_config("deepspeed/zero1.json"))},
    }


LAYOUTS = {
    # TP = 2 with grouped-query attention (2 groups: one per TP rank) and tied embeddings
    "tp2": dict(parallel={"tensor_model_parallel_size": 2},
                model={"num_query_groups": 2,
                       "tie_embeddings": True}),
    # PP = 2 (one layer per stage), the exact reference architecture (untied, MHA)
    "pp2": dict(parallel={"pipeline_model_parallel_size": 2}),
}


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_data) -> dict[str, dict]:
    """name -> what the worker recorded (x_t, x_0, raw/ema logits, clip range, checkpoint) plus
    the run's config path and the trainer's run directory (whose config.yaml names the
    checkpoint directory)."""
    manifest, tokenizer = tiny_data
    base = tmp_path_factory.mktemp("convert_runs")
    pairs = []
    for name, sections in LAYOUTS.items():
        run_dir = base / name
        run_dir.mkdir()
        path = run_dir / "cfg.yaml"
        path.write_text(yaml.safe_dump(run_config(manifest, tokenizer, run_dir, **sections)))
        pairs.append(f"{name}={path}")
    run_distributed(WORKER, 2, str(base), *pairs, timeout=240)
    out = {}
    for name in LAYOUTS:
        record = torch.load(base / f"{name}.pt", weights_only=False)
        record["config"] = base / name / "cfg.yaml"
        record["run_dir"] = base / name / "run"  # the trainer's run directory (config.yaml)
        out[name] = record
    return out
