"""Helpers for tests that run the real trainer (megatron_bd3/cli/train.py) on a tiny model and
tiny data.

`prepare_tiny_data(dir)` trains a 512-piece sentencepiece tokenizer on the embedded corpus and
writes L = 32 shards (about a second). `write_config(...)` writes a run YAML for that data;
`run_trainer(...)` launches megatron_bd3/cli/train.py under torchrun and returns the logged metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from megatron_bd3.paths import shipped_config
from tests.dist_launcher import REPO_ROOT, run_distributed

TRAIN_SCRIPT = REPO_ROOT / "megatron_bd3" / "cli" / "train.py"
SEQ_LENGTH = 32


def prepare_tiny_data(directory: Path, document_boundaries: bool = False) -> Path:
    """Tokenizer + shards for the tests; returns the manifest path. `document_boundaries`: the
    shards also store document starts (bd3-prepare-data --document-boundaries)."""
    tok, data = directory / "tok", directory / "data"
    if not (data / "manifest.json").is_file():
        for cmd in (
            [
                "-m",
                "megatron_bd3.cli.train_tokenizer",
                "--input",
                "default",
                "--output",
                str(tok),
                "--vocab-size",
                "512",
            ],
            [
                "-m",
                "megatron_bd3.cli.prepare_data",
                "--input",
                "default",
                "--tokenizer",
                str(tok),
                "--output",
                str(data),
                "--seq-length",
                str(SEQ_LENGTH),
                *(["--document-boundaries"] if document_boundaries else []),
            ],
        ):
            subprocess.run(
                [sys.executable, *cmd],
                cwd=REPO_ROOT,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    return data / "manifest.json"


def tiny_config(manifest: Path, run_dir: Path, **sections) -> dict:
    """A run config for a 2-layer, 32-wide BD3-LM on the test data; `sections` override keys,
    e.g. parallel={"tensor_model_parallel_size": 2}."""
    config = {
        "model": {
            "preset": "bd3",
            "num_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "seq_length": SEQ_LENGTH,
            "block_size": 4,
            "dropout": 0.0,
            "attention_kernel": "sdpa",
        },
        "data": {"manifest": str(manifest)},
        "optimizer": {"lr": 3e-3, "clip_grad": 1.0},
        "schedule": {"warmup_steps": 2},
        "training": {
            "train_iters": 6,
            "micro_batch_size": 2,
            "global_batch_size": 8,
            "seed": 3,
            "precision": "fp32",
            "ema_decay": 0.9,
        },
        "validation": {
            "interval": 0,
            "at_end": True,
            "num_batches": 2,
            "clip_search": {"enabled": True, "num_batches": 1, "widths": [0.5, 0.9]},
        },
        "checkpoint": {"interval": 3, "keep_last": None, "dir": str(run_dir / "ckpt")},
        "logging": {
            "interval": 1,
            "run_name": "run",
            "output_dir": str(run_dir),
            "tqdm": False,
            "wandb": {"mode": "disabled"},
        },
        "deepspeed": {"config": str(shipped_config("deepspeed/zero1.json"))},
    }
    for section, values in sections.items():
        merged = dict(config.get(section, {}))
        merged.update(values)
        config[section] = merged
    return config


def write_config(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def read_metrics(run_dir: Path, name: str = "run") -> list[dict]:
    path = run_dir / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from the metrics file (last record wins on a repeated step)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def val_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "val_nll" in r]


def run_trainer(config_path: Path, nproc: int, *args: str, timeout: float = 120) -> str:
    return run_distributed(TRAIN_SCRIPT, nproc, str(config_path), *args, timeout=timeout)
