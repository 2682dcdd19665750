"""launch/torchrun.sh and launch/deepspeed.sh: usage errors, and the same real 2-step run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.dist_launcher import REPO_ROOT, free_port
from tests.training.tiny_run import prepare_tiny_data, tiny_config, train_losses, write_config

LAUNCHERS = ("torchrun.sh", "deepspeed.sh")


def launch(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 180):
    return subprocess.run(
        ["bash", str(REPO_ROOT / "launch" / script), *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_without_a_config_prints_usage(script):
    proc = launch(script)
    assert proc.returncode == 2
    assert f"usage: {REPO_ROOT / 'launch' / script} CONFIG.yaml" in proc.stderr


@pytest.mark.distributed
def test_both_launchers_train_the_same_run(tmp_path):
    """One process on this machine through each launcher: same logged losses step for step."""
    manifest = prepare_tiny_data(tmp_path)
    losses = {}
    for script in LAUNCHERS:
        run_dir = tmp_path / script
        config = tiny_config(manifest, run_dir, training={"train_iters": 2},
                             validation={"at_end": False},
                             checkpoint={"interval": 0, "save_final": False})
        path = write_config(run_dir / "cfg.yaml", config)
        env = {"NPROC_PER_NODE": "1", "NUM_GPUS": "1", "MASTER_PORT": str(free_port())}
        proc = launch(script, str(path), "--resume", "none", env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        losses[script] = train_losses(run_dir)
    assert sorted(losses["torchrun.sh"]) == [1, 2]
    assert losses["torchrun.sh"] == losses["deepspeed.sh"]
