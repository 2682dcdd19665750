"""launch/torchrun.sh and launch/deepspeed.sh: usage errors, and the same real 2-step run started
from another directory with relative paths only (they resolve against that directory)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_launcher import REPO_ROOT, free_port
from tests.training.tiny_run import prepare_tiny_data, tiny_config, train_losses, write_config

LAUNCHERS = ("torchrun.sh", "deepspeed.sh")


def launch(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 180,
           cwd: Path | None = None):
    return subprocess.run(
        ["bash", str(REPO_ROOT / "launch" / script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_without_a_config_prints_usage(script):
    proc = launch(script)
    assert proc.returncode == 2
    assert f"usage: {REPO_ROOT / 'launch' / script} CONFIG.yaml" in proc.stderr


@pytest.mark.distributed
def test_both_launchers_train_the_same_run(tmp_path):
    """One process on this machine through each launcher: same logged losses step for step.
    Started in tmp_path with the config, data and outputs named relative to it, and the DeepSpeed
    JSON by its shipped name."""
    prepare_tiny_data(tmp_path)
    losses = {}
    for script in LAUNCHERS:
        run_dir = Path(script)  # relative: under tmp_path, where the launcher runs
        config = tiny_config(Path("data/manifest.json"), run_dir, training={"train_iters": 2},
                             validation={"at_end": False},
                             checkpoint={"interval": 0, "save_final": False},
                             deepspeed={"config": "deepspeed/zero1.json"})
        write_config(tmp_path / run_dir / "cfg.yaml", config)
        env = {"NPROC_PER_NODE": "1", "NUM_GPUS": "1", "MASTER_PORT": str(free_port())}
        proc = launch(script, f"{script}/cfg.yaml", "--resume", "none", env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        losses[script] = train_losses(tmp_path / run_dir)
    assert sorted(losses["torchrun.sh"]) == [1, 2]
    assert losses["torchrun.sh"] == losses["deepspeed.sh"]


@pytest.mark.distributed
def test_deepspeed_launcher_with_a_localhost_hostfile_needs_no_ssh(tmp_path):
    """HOSTFILE naming this machine + NO_SSH=1: DeepSpeed's launcher starts the process itself
    (--no_ssh --node_rank=0); an `ssh` on PATH that records any call shows it is never used."""
    prepare_tiny_data(tmp_path)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "ssh_called"
    (fake_bin / "ssh").write_text(f"#!/bin/sh\necho \"$@\" >> {record}\nexit 255\n")
    (fake_bin / "ssh").chmod(0o755)
    (tmp_path / "hostfile").write_text("localhost slots=1\n")
    config = tiny_config(Path("data/manifest.json"), Path("run"), training={"train_iters": 2},
                         validation={"at_end": False},
                         checkpoint={"interval": 0, "save_final": False},
                         deepspeed={"config": "deepspeed/zero1.json"})
    write_config(tmp_path / "run" / "cfg.yaml", config)
    env = {"HOSTFILE": "hostfile", "NO_SSH": "1", "MASTER_PORT": str(free_port()),
           "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    proc = launch("deepspeed.sh", "run/cfg.yaml", "--resume", "none", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "ssh_called").exists()
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]

    # without NO_SSH the same hostfile goes through ssh (and fails here)
    env.pop("NO_SSH")
    proc = launch("deepspeed.sh", "run/cfg.yaml", "--resume", "none", env=env, cwd=tmp_path)
    assert proc.returncode != 0 and (tmp_path / "ssh_called").exists()
