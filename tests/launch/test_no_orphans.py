"""No process of a run outlives a killed launcher or a killed rank (megatron_bd3.lifetime).

A real 2-rank run through launch/torchrun.sh with 2 data-loader workers per rank and a checkpoint
every 2 steps (megatron's checkpoint writer then holds a Manager process started with "spawn").
Every process of the run carries a marker in its environment; the test finds them in /proc.
  - SIGKILL to the launcher's process group (torchrun starts its ranks in sessions of their own,
    so this used to leave both ranks training);
  - SIGKILL to the rank that holds the Manager (its children used to idle on, orphaned).
Either way nothing of the run may be left a few seconds later.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.dist_launcher import REPO_ROOT, free_port
from tests.training.tiny_run import prepare_tiny_data, tiny_config, write_config

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc"),
]
MARKER = "BD3_TEST_RUN_MARKER"


def run_processes(mark: str) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process whose environment has `mark`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"{MARKER}={mark}".encode() not in (entry / "environ").read_bytes():
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if fields[0] != "Z":
            found[int(entry.name)] = (int(fields[1]), command)
    return found


def start_run(tmp_path: Path) -> tuple[subprocess.Popen, str, dict[int, tuple[int, str]]]:
    """The run, once a checkpoint's Manager and the data workers are up."""
    prepare_tiny_data(tmp_path)
    config = tiny_config(Path("data/manifest.json"), Path("run"), data={"num_workers": 2},
                         training={"train_iters": 100000},
                         validation={"interval": 0, "at_end": False},
                         checkpoint={"interval": 2, "keep_last": 1},
                         deepspeed={"config": "deepspeed/zero1.json"})
    write_config(tmp_path / "run" / "cfg.yaml", config)
    mark = uuid.uuid4().hex
    env = {**os.environ, "PYTHON": sys.executable, MARKER: mark, "NPROC_PER_NODE": "2",
           "MASTER_PORT": str(free_port())}
    launcher = subprocess.Popen(
        ["bash", str(REPO_ROOT / "launch" / "torchrun.sh"), "run/cfg.yaml", "--resume", "none"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as a job started from a shell
    )
    deadline = time.monotonic() + 600  # start-up; minutes on a loaded 2-core machine
    while time.monotonic() < deadline:
        processes = run_processes(mark)
        managers = [pid for pid, (_, cmd) in processes.items() if "spawn_main" in cmd]
        if managers and (tmp_path / "run" / "ckpt" / "latest").exists():
            return launcher, mark, processes
        if launcher.poll() is not None:
            break
        time.sleep(0.5)
    os.killpg(launcher.pid, signal.SIGKILL)
    raise AssertionError(f"the run never saved a checkpoint (launcher exit {launcher.poll()})")


def ranks_and_workers(processes) -> tuple[list[int], list[int]]:
    def launched_by_torchrun(parent: int) -> bool:
        return "torch.distributed.run" in processes.get(parent, (0, ""))[1]

    ranks = [pid for pid, (parent, _) in processes.items() if launched_by_torchrun(parent)]
    workers = [pid for pid, (parent, _) in processes.items() if parent in ranks]
    return ranks, workers


def assert_nothing_left(mark: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while run_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = run_processes(mark)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still alive {seconds:.0f} s later: {left}"


def test_killing_the_launchers_process_group_ends_every_process(tmp_path):
    launcher, mark, processes = start_run(tmp_path)
    ranks, workers = ranks_and_workers(processes)
    assert len(ranks) == 2 and len(workers) >= 4 + 1  # data workers, a Manager
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    assert_nothing_left(mark, 10)


def test_killing_a_rank_ends_every_process(tmp_path):
    launcher, mark, processes = start_run(tmp_path)
    ranks, _ = ranks_and_workers(processes)
    managers = [processes[pid][0] for pid, (_, cmd) in processes.items() if "spawn_main" in cmd]
    victim = next(rank for rank in ranks if rank in managers)
    os.kill(victim, signal.SIGKILL)
    try:
        # the other rank fails its next collective, then torchrun ends too (not our watchdog)
        assert_nothing_left(mark, 60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
