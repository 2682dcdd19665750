"""tools/reproduce.py (`make reproduce`) end to end in its --quick mode on one process: every
stage runs (tokenizer, shards, six trainings, the AR scorer, bd3-eval likelihood / generation /
variance, samples at 2L) and the report is written from the stages' own outputs; a second run
redoes nothing. A few minutes on a 2-core machine: most of it is process start-up per stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.dist_launcher import REPO_ROOT
from tools import reproduce


def _run(workdir):
    return subprocess.run(
        [sys.executable, "-m", "tools.reproduce", "--quick", "--nproc", "1",
         "--workdir", str(workdir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500)


@pytest.mark.slow
def test_quick_study_runs_every_stage_and_resumes(tmp_path):
    workdir = tmp_path / "study"
    proc = _run(workdir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    stages = {p.stem for p in (workdir / "stages").glob("*.json")}
    expected = {"tokenizer", "data", "scorer"}
    for model in reproduce.MODELS:
        expected |= {f"train_{model.name}", f"eval_{model.name}"}
        if model.diffusion:
            expected |= {f"genL_{model.name}", f"gen2L_{model.name}"}
    assert stages == expected

    text = (workdir / "report" / "reproduction.json").read_text()
    assert str(tmp_path) not in text  # committed as is: no path of the machine
    results = json.loads(text)
    assert set(results["models"]) == {m.name for m in reproduce.MODELS}
    assert set(results["data"]) == {"train", "validation", "test"}
    assert results["skipped"]["redirects"] > 0  # the MediaWiki reader skipped and counted them
    for model in reproduce.MODELS:
        entry = results["models"][model.name]
        assert entry["train_loss"] and entry["val_nll"]
        for dataset in ("validation", "test", "lee"):
            row = entry["likelihood"][dataset]
            low, high = row["ppl_ci95"]  # K = 2 repeats give an interval
            assert low <= row["ppl"] <= high and row["sequences"] > 0
        if model.diffusion:
            assert entry["generation"]["L"]["length"] == 128
            assert entry["generation"]["2L"]["length"] == 256
            assert entry["generation"]["L"]["gen_ppl"] is not None  # scored by the AR model
            mean, se = entry["generation"]["L"]["log_gen_ppl"]
            assert se > 0
        else:
            assert "generation" not in entry
        assert ("variance" in entry) == model.variance
        if model.variance:
            labels = [r["label"] for r in entry["variance"]]
            assert "U[0.001, 1]" in labels and len(labels) >= 4
    assert set(results["seconds"]) >= expected

    report = (workdir / "report" / "report.md").read_text()
    assert "| BD3-LM B=4 |" in report and "paper, LM1B test" in report
    for plot in ("loss_curves.png", "perplexity.png"):
        assert (workdir / "report" / plot).stat().st_size > 0

    again = _run(workdir)  # resumable: finished stages are not redone
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert again.stdout.count("skipped") == len(expected)
    assert "$ " not in again.stdout
