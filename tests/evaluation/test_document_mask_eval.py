"""bd3-eval of a checkpoint trained with data.document_mask: it is evaluated with document
masking (its model refuses a forward without document ids), from shards with document
boundaries or from raw files; shards without boundaries are refused in one line."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from megatron_bd3.cli.eval import main as eval_main
from megatron_bd3.data.corpus import default_corpus_path
from tests.dist_launcher import REPO_ROOT
from tests.training.tiny_run import prepare_tiny_data, run_trainer, tiny_config, write_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_documents")
    manifest = prepare_tiny_data(base, document_boundaries=True)
    run = base / "run"
    config = tiny_config(manifest, run, data={"document_mask": True},
                         training={"train_iters": 2}, checkpoint={"interval": 0},
                         validation={"interval": 0, "at_end": False})
    run_trainer(write_config(base / "cfg.yaml", config), 1, "--resume", "none")
    return base, manifest.parent, run / "ckpt"


def test_document_masked_checkpoint_is_evaluated_with_document_ids(trained, tmp_path):
    base, data, ckpt = trained
    args = ["--nelbo-samples", "1", "--batch-size", "8", "--no-progress", "--no-plots",
            "--raw-weights"]
    assert eval_main([str(ckpt), "--data", str(data), *args, "--output", str(tmp_path / "a")]) == 0
    assert eval_main([str(ckpt), "--data", f"lee={default_corpus_path()}", "--text-mode", "line",
                      *args, "--output", str(tmp_path / "b")]) == 0
    for name in ("a", "b"):
        row = json.loads((tmp_path / name / "eval.json").read_text())["likelihood"][0]
        assert math.isfinite(row["nll"]) and row["sequences"] > 0


def test_shards_without_boundaries_are_refused_in_one_line(trained, tmp_path):
    base, _, ckpt = trained
    plain = tmp_path / "plain"
    subprocess.run([sys.executable, "-m", "megatron_bd3.cli.prepare_data", "--input", "default",
                    "--tokenizer", str(base / "tok"), "--output", str(plain), "--seq-length",
                    "32"], cwd=REPO_ROOT, check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "megatron_bd3.cli.eval", str(ckpt), "--data",
                           str(plain), "--raw-weights"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bd3-eval:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--document-boundaries" in lines[0]
