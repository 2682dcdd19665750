"""tools/bench/eval_bench.py end to end in its --quick mode (tiny config, 1 process, 1 training
step, K = 1, N = 2): the plumbing only (tokenizer, shards, checkpoint, AR scorer, bd3-eval, the
JSON), no timing assertions. About 50 s on a 2-core machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.dist_launcher import REPO_ROOT


@pytest.mark.slow
def test_quick_run_writes_every_field(tmp_path):
    out = tmp_path / "eval_bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench.eval_bench", "--quick",
         "--work", str(tmp_path / "work"), "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert {"cpu", "cpu_family_model", "cpu_capability", "cores"} <= set(report["machine"])
    assert "torch" in report["versions"]
    assert report["load_average_at_start"] >= 0 and report["load_average_at_end"] >= 0
    assert report["setup"]["tiny"]["settings"]["nelbo_samples"] == 1
    (case,) = report["cases"]
    assert case["case"] == "tiny_p1" and case["layout"]["world_size"] == 1
    nelbo, generation = case["nelbo"], case["generation"]
    assert nelbo["sequences"] > 0 and nelbo["counted_tokens"] > 0
    assert nelbo["tokens_per_s"] > 0 and nelbo["seconds"] > 0
    assert generation["num_samples"] == 2 and generation["length"] == 64
    assert generation["samples_per_s"] > 0 and generation["tokens_per_s"] > 0
    assert generation["gen_ppl"] is not None  # scored by the AR scorer
    assert case["wall_s"] > 0
    assert "| tiny | 1 x" in proc.stdout  # the markdown table
