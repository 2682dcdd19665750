"""kill -9 after a checkpoint, resume: the loss sequence equals the uninterrupted run's.

Two processes (DP=2, ZeRO-2), dropout on, so the restored RNG states (torch CPU generator and
megatron's tracker), data-loader position, optimizer partitions, EMA and clip range all matter.
The killed run is launched with a long train_iters and SIGKILLed (whole process group) as soon
as its step-4 checkpoint is complete; the resume then continues from that checkpoint to step 8.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.checkpoint.conftest import INTERVAL, TRAIN_ITERS, resume_config
from tests.dist_launcher import REPO_ROOT, free_port
from tests.training.tiny_run import (
    TRAIN_SCRIPT,
    run_trainer,
    train_losses,
    val_records,
    write_config,
)


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (torchrun starts its workers in sessions of their own, so
    killing torchrun's process group does not reach them)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_job(proc: subprocess.Popen) -> None:
    """kill -9 the launcher and every worker, as a machine failure would."""
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def launch(config_path, *args):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(TRAIN_SCRIPT),
        str(config_path),
        *args,
    ]
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        WANDB_MODE="offline",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO_ROOT),
    )
    return subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.distributed
def test_resume_after_kill_equals_uninterrupted(trained_run):
    base, manifest, uninterrupted = trained_run
    run_dir = base / "killed"
    ckpt = run_dir / "ckpt"
    long_run = write_config(
        run_dir / "long.yaml", resume_config(manifest, run_dir, training={"train_iters": 1000})
    )
    proc = launch(long_run, "--resume", "none")
    first = ckpt / f"step_{INTERVAL:08d}"
    deadline = time.time() + 120
    try:
        while not (first / "complete.json").exists():
            assert proc.poll() is None, "the run to be killed exited on its own"
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        kill_job(proc)  # kill -9 torchrun and both workers
    killed_at = max(train_losses(run_dir))
    assert killed_at < 1000

    resumed = write_config(run_dir / "resume.yaml", resume_config(manifest, run_dir))
    out = run_trainer(resumed, 2, "--resume", str(first))
    assert f"resumed from {first} at step {INTERVAL}" in out

    expected, got = train_losses(uninterrupted), train_losses(run_dir)
    assert sorted(expected) == list(range(1, TRAIN_ITERS + 1))
    for step in range(1, TRAIN_ITERS + 1):
        # same layout, same order of operations: bit-identical on CPU
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step
    ref_val, new_val = val_records(uninterrupted)[-1], val_records(run_dir)[-1]
    assert new_val["step"] == ref_val["step"] == TRAIN_ITERS
    assert new_val["val_nll"] == pytest.approx(ref_val["val_nll"], rel=1e-6)  # EMA weights
    assert new_val["clip"] == ref_val["clip"]
