"""megatron_bd3.lifetime: a process with the watchdog ends with its parent; one without does not.

The launcher-level check (a real run through launch/torchrun.sh, killed) is
tests/launch/test_no_orphans.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_bd3.lifetime import launched_by_agent
from tests.dist_launcher import REPO_ROOT

PARENT = textwrap.dedent(
    """
    import multiprocessing, os, sys, time
    from megatron_bd3.lifetime import children_exit_with_this_process, exit_with_parent

    def child(watch):
        if watch:
            exit_with_parent()
        time.sleep(600)

    if __name__ == "__main__":
        context = multiprocessing.get_context(sys.argv[1])
        if sys.argv[2] == "explicit":  # the child installs the watchdog itself
            watched = context.Process(target=child, args=(True,))
            unwatched = context.Process(target=child, args=(False,))
            watched.start()
            unwatched.start()
        else:  # every fork of this process gets it, from the first fork after the call
            unwatched = context.Process(target=child, args=(False,))
            unwatched.start()
            if sys.argv[2] == "fork-hook-slow-child":
                # after_in_child hooks run in registration order: this child reaches the
                # watchdog's hook only after its parent has been killed
                os.register_at_fork(after_in_child=lambda: time.sleep(1.5))
            children_exit_with_this_process()
            watched = context.Process(target=child, args=(False,))
            watched.start()
        print(watched.pid, unwatched.pid, flush=True)
        time.sleep(600)
    """
)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
@pytest.mark.parametrize(
    "start_method, how",
    [("fork", "explicit"), ("spawn", "explicit"), ("fork", "fork-hook"),
     ("fork", "fork-hook-slow-child")],
)
def test_a_watched_child_ends_with_its_killed_parent(tmp_path, start_method, how):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    parent = subprocess.Popen([sys.executable, str(script), start_method, how], env=env,
                              stdout=subprocess.PIPE, text=True)
    watched, unwatched = map(int, parent.stdout.readline().split())
    try:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while alive(watched) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(watched), "the watched child outlived its parent by 5 s"
        assert alive(unwatched)  # the control: nothing else ends an orphan
    finally:
        for pid in (watched, unwatched):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_only_a_launcher_agents_ranks_watch_their_parent(monkeypatch):
    for name in ("TORCHELASTIC_RUN_ID", "CROSS_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_agent()  # by hand, or under nohup from a shell
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's workers
    assert launched_by_agent()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("CROSS_RANK", "0")  # DeepSpeed's launch.py children
    assert launched_by_agent()
