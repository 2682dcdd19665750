"""bd3-eval end to end on a trained tiny checkpoint: the same bound on 1 process, DP = 2, TP = 2,
PP = 2 and for the converted standalone directory; evaluation sets and bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from megatron_bd3.cli.eval import main as eval_main
from megatron_bd3.data.corpus import default_corpus_path
from tests.dist_launcher import REPO_ROOT, free_port, run_distributed
from tests.training.tiny_run import prepare_tiny_data, run_trainer, tiny_config, write_config

EVAL_SCRIPT = REPO_ROOT / "megatron_bd3" / "cli" / "eval.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base, data dir, checkpoint root) of a 4-step run with grouped-query attention (TP = 2
    splits its 2 query groups) and EMA."""
    base = tmp_path_factory.mktemp("eval")
    manifest = prepare_tiny_data(base)
    run = base / "run"
    config = tiny_config(manifest, run, model={"num_query_groups": 2},
                         training={"train_iters": 4}, checkpoint={"interval": 0})
    run_trainer(write_config(base / "cfg.yaml", config), 1, "--resume", "none")
    return base, manifest.parent, run / "ckpt"


def read(out):
    return json.loads((out / "eval.json").read_text())


def common(data, out):
    return ["--data", str(data), "--nelbo-samples", "2", "--batch-size", "8", "--output",
            str(out), "--no-progress"]


@pytest.mark.distributed
def test_same_bound_in_every_layout_and_for_the_standalone_directory(trained, tmp_path):
    base, data, ckpt = trained
    assert eval_main([str(ckpt), *common(data, tmp_path / "one")]) == 0
    one = read(tmp_path / "one")["likelihood"][0]
    assert (tmp_path / "one" / "likelihood.png").stat().st_size > 0
    for name, layout, launcher in (("dp2", [], "torchrun.sh"),
                                   ("tp2", ["--tensor-model-parallel-size", "2"], "deepspeed.sh"),
                                   ("pp2", ["--pipeline-model-parallel-size", "2"], None),
                                   ("cp2", ["--context-parallel-size", "2"], None)):
        args = [str(ckpt), *common(data, tmp_path / name), *layout, "--no-plots"]
        if launcher is None:
            run_distributed(EVAL_SCRIPT, 2, *args)
        else:  # the training launchers run bd3-eval with BD3_COMMAND=eval
            env = {**os.environ, "PYTHON": sys.executable, "BD3_COMMAND": "eval",
                   "NPROC_PER_NODE": "2", "NUM_GPUS": "2", "MASTER_PORT": str(free_port())}
            proc = subprocess.run(["bash", str(REPO_ROOT / "launch" / launcher), *args],
                                  capture_output=True, text=True, env=env, timeout=300)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        result = read(tmp_path / name)
        assert result["layout"]["world_size"] == 2
        row = result["likelihood"][0]
        assert row["tokens"] == one["tokens"] and row["sequences"] == one["sequences"]
        assert row["nll"] == pytest.approx(one["nll"], rel=1e-5), name
        assert row["se"] == pytest.approx(one["se"], rel=1e-4), name

    from megatron_bd3.convert.trainer_checkpoint import checkpoint_to_standalone

    checkpoint_to_standalone(ckpt, tmp_path / "standalone")
    assert eval_main([str(tmp_path / "standalone"), *common(data, tmp_path / "sa"),
                      "--ignore-bos"]) == 0
    row = read(tmp_path / "sa")["likelihood"][0]
    assert row["nll"] == pytest.approx(one["nll"], rel=1e-5)


def test_raw_files_are_wrapped_to_the_model_length_and_counted(trained, tmp_path):
    base, data, ckpt = trained
    assert eval_main([str(ckpt), "--data", f"lee={default_corpus_path()}", "--text-mode", "line",
                      "--nelbo-samples", "1", "--output", str(tmp_path), "--no-progress",
                      "--no-plots", "--raw-weights"]) == 0
    result = read(tmp_path)
    assert result["model"]["weights"] == "raw"
    row = result["likelihood"][0]
    stats = row["data"]
    assert stats["documents"] == 300  # the Lee background corpus: one article per line
    # every token of the stream is in a sequence or in the dropped tail
    assert stats["sequences"] * 32 + stats["dropped_tail_tokens"] == stats["tokens"]
    assert row["sequences"] == stats["sequences"] and row["se"] is None


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_bd3.cli.eval", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bd3-eval:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(trained, tmp_path):
    base, data, ckpt = trained
    assert "does not exist" in _one_error_line(_run_cli(str(tmp_path / "nowhere"), "--data",
                                                        str(data)))
    assert "nothing to evaluate" in _one_error_line(_run_cli(str(ckpt)))
    # another tokenizer's data
    other = base / "other"
    subprocess.run([sys.executable, "-m", "megatron_bd3.cli.train_tokenizer", "--input",
                    "default", "--output", str(other / "tok"), "--vocab-size", "400"],
                   check=True, capture_output=True, cwd=REPO_ROOT)
    subprocess.run([sys.executable, "-m", "megatron_bd3.cli.prepare_data", "--input", "default",
                    "--tokenizer", str(other / "tok"), "--output", str(other / "data"),
                    "--seq-length", "32"], check=True, capture_output=True, cwd=REPO_ROOT)
    line = _one_error_line(_run_cli(str(ckpt), "--data", str(other / "data")))
    assert "tokenizer fingerprint" in line
    # another sequence length
    subprocess.run([sys.executable, "-m", "megatron_bd3.cli.prepare_data", "--input", "default",
                    "--tokenizer", str(base / "tok"), "--output", str(other / "data64"),
                    "--seq-length", "64"], check=True, capture_output=True, cwd=REPO_ROOT)
    assert "seq_length 64" in _one_error_line(_run_cli(str(ckpt), "--data",
                                                       str(other / "data64")))
    # an incomplete checkpoint: its marker is gone
    torn = tmp_path / "torn"
    shutil.copytree(ckpt / "step_00000004", torn / "step_00000004")
    (torn / "step_00000004" / "complete.json").unlink()
    assert "complete.json" in _one_error_line(_run_cli(str(torn / "step_00000004"), "--data",
                                                       str(data)))
    # a layout that does not divide the model (4 heads, 2 query groups)
    line = _one_error_line(_run_cli(str(ckpt), "--data", str(data),
                                    "--tensor-model-parallel-size", "3"))
    assert "not divisible by TP x PP" in line


def test_generation_quality_with_our_ar_scorer(tmp_path):
    from tests.evaluation.workers.models import ar_scorer_dir, corpus_tokenizer, sampler_model_dir

    tokenizer = corpus_tokenizer()
    sampler = sampler_model_dir(tmp_path / "bd3", tokenizer)
    scorer = ar_scorer_dir(tmp_path / "ar", tokenizer)
    out = tmp_path / "out"
    assert eval_main([str(sampler), "--num-samples", "3", "--length", "24", "--sample-seed", "5",
                      "--scorer", str(scorer), "--output", str(out), "--no-progress"]) == 0
    generation = read(out)["generation"]
    assert generation["num_samples"] == 3 and generation["length"] == 24
    assert [s["seed"] for s in generation["samples"]] == [5, 6, 7]
    assert generation["scorer"] is not None and math.isfinite(generation["gen_ppl"])
    assert generation["gen_ppl"] == pytest.approx(
        sum(s["gen_ppl"] for s in generation["samples"]) / 3)
    assert (out / "generation.png").stat().st_size > 0
    # the block-diffusion model is no AR scorer: refused in one line
    line = _one_error_line(_run_cli(str(sampler), "--num-samples", "1", "--scorer", str(sampler)))
    assert "has block_size 4" in line
