"""Data and checkpoint errors of a run end it with one `bd3-train:` line per rank and exit 2, like
config errors; any other exception keeps its traceback (exit 1)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_bd3.checkpoint import CheckpointError
from megatron_bd3.cli.train import is_run_input_error
from megatron_bd3.data.loader import LoaderStateError
from megatron_bd3.data.manifest import ManifestError, load_manifest
from megatron_bd3.data.shards import ShardError, choose_dtype
from megatron_bd3.data.tokenizer import TokenizerError
from megatron_bd3.training.config import ConfigError
from tests.dist_launcher import REPO_ROOT, free_port
from tests.training.tiny_run import prepare_tiny_data, tiny_config, write_config


def raised(function, *args) -> BaseException:
    try:
        function(*args)
    except BaseException as exc:  # noqa: BLE001 - the test inspects what was raised
        return exc
    raise AssertionError("nothing raised")


def test_which_errors_are_reported_in_one_line():
    for error in (ConfigError("x"), CheckpointError("x"), ManifestError("x"), ShardError("x"),
                  TokenizerError("x")):
        assert is_run_input_error(error), error
    # the loader's own error for a data layout or saved position that does not fit
    assert is_run_input_error(LoaderStateError("cannot resume: the saved loader state differs"))
    # a plain ValueError keeps its traceback, wherever it is raised
    assert not is_run_input_error(raised(choose_dtype, 70000, "uint16"))

    def bug():
        raise ValueError("a bug somewhere else")

    assert not is_run_input_error(raised(bug))
    assert not is_run_input_error(raised(lambda: [][1]))
    assert not is_run_input_error(ValueError("never raised"))


def launch_ranks(config, nproc: int) -> list[subprocess.CompletedProcess]:
    """`nproc` ranks started directly (no launcher, whose own failure report would hide the exit
    code and the output of each rank)."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="1",
                   PYTHONPATH=str(REPO_ROOT))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "megatron_bd3.cli.train", str(config), "--resume", "none"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("fault,nproc", [("missing", 2), ("truncated", 1)])
def test_a_broken_shard_ends_the_run_in_one_line_per_rank(tmp_path, fault, nproc):
    manifest_path = prepare_tiny_data(tmp_path)
    manifest = load_manifest(manifest_path)
    shard = manifest.directory / manifest.split("train")["shards"][0]["file"]
    if fault == "missing":
        shard.unlink()
    else:
        with open(shard, "r+b") as handle:
            handle.truncate(shard.stat().st_size // 2)
    config = write_config(tmp_path / "cfg.yaml", tiny_config(manifest_path, tmp_path / "run"))
    for rank, result in enumerate(launch_ranks(config, nproc)):
        output = result.stdout + result.stderr
        assert result.returncode == 2, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("bd3-train:")]
        assert len(lines) == 1, output[-3000:]
        assert str(shard) in lines[0]
        assert ("is missing" if fault == "missing" else "truncated or replaced") in lines[0]
        if nproc > 1:
            assert lines[0].startswith(f"bd3-train: rank {rank}: ")


@pytest.mark.distributed
def test_a_context_parallel_layout_it_cannot_cut_is_one_line_per_rank(tmp_path):
    """bd3-train with context parallelism over one block (B = L): every rank prints one line
    naming the fields and exits 2, before any model is built."""
    config = write_config(tmp_path / "cfg.yaml", tiny_config(
        tmp_path / "data" / "manifest.json", tmp_path / "run",
        model={"block_size": 32}, parallel={"context_parallel_size": 2},
    ))
    for result in launch_ranks(config, 2):
        output = result.stdout + result.stderr
        assert result.returncode == 2, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("bd3-train:")]
        assert len(lines) == 1, output[-3000:]
        assert str(config) in lines[0]
        assert "parallel.context_parallel_size 2: model.block_size = model.seq_length" in lines[0]
