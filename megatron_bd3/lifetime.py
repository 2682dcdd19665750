"""Processes of a run end with the process that started them (docs/training.md §9).

A run is a tree: launcher agent (torchrun, DeepSpeed's launch) -> ranks -> their children (data
loader workers; the Manager process megatron's checkpoint writer starts with "spawn"). When a
parent dies without cleaning up (SIGKILL, OOM killer, a lost node), nothing ends its children:
torchrun starts its ranks in sessions of their own, so killing the launcher's process group
leaves them training, and a killed rank's children idle on forever (or hang: a checkpoint
writer process forked mid-save blocks flushing its result queue). `exit_with_parent` gives a
process a watchdog thread that ends it as soon as its parent is gone (it polls os.getppid(),
which changes when the parent dies and the process is re-parented).

Who calls it: bd3-train and bd3-eval ranks started by a launcher agent (`launched_by_agent`);
every child a rank forks from Python (`children_exit_with_this_process`: data-loader workers,
megatron's checkpoint writers); children started with "spawn" whose main module is the CLI's
(the Manager of megatron's checkpoint writer); BD3DataLoader's workers in any program.

Not PR_SET_PDEATHSIG: Linux sends that signal when the parent *thread* that forked the child
exits, so a process started from a short-lived thread of its launcher would be killed while its
launcher lives on.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time

POLL_INTERVAL_S = 0.5
ORPHAN_EXIT_CODE = 143  # as if terminated by SIGTERM (128 + 15)

_watching_pid: int | None = None  # the process whose watchdog runs (not inherited by a fork)
_fork_hook_registered = False  # inherited by a fork, as the registration itself is
_forking_pid: int | None = None  # set in the parent just before a fork; a forked child reads it


def launched_by_agent() -> bool:
    """Whether this process is a rank started by a launcher agent that stays its parent for the
    whole run: torchrun (sets TORCHELASTIC_RUN_ID) or DeepSpeed's local launcher (sets
    CROSS_RANK). A rank started by hand, or under nohup from a shell, is not."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "CROSS_RANK" in os.environ


def exit_with_parent(
    message: str | None = None,
    poll_interval: float = POLL_INTERVAL_S,
    parent_pid: int | None = None,
) -> None:
    """End this process (exit status 143, after printing `message` to stderr) within
    `poll_interval` seconds of its parent's death. Idempotent per process.

    The parent is `parent_pid` when given, else the one multiprocessing recorded (a worker
    started by a multiprocessing Process), else the current os.getppid() (which is already the
    reaper's pid if the parent died before this call: give parent_pid where that can happen)."""
    global _watching_pid
    if _watching_pid == os.getpid():
        return
    _watching_pid = os.getpid()
    if parent_pid is None:
        parent = multiprocessing.parent_process()
        parent_pid = parent.pid if parent is not None else os.getppid()

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_interval)
        if message:
            print(message.format(parent_pid=parent_pid), file=sys.stderr, flush=True)
        os._exit(ORPHAN_EXIT_CODE)

    threading.Thread(target=watch, name="bd3-exit-with-parent", daemon=True).start()


def children_exit_with_this_process() -> None:
    """Every child this process forks from Python (multiprocessing's "fork", os.fork) starts
    with the watchdog of `exit_with_parent`. subprocess and "spawn" children are not forks of
    the interpreter and are not covered."""
    global _fork_hook_registered
    if not _fork_hook_registered:
        _fork_hook_registered = True
        # The parent's pid is taken in the parent before the fork: a child that only runs its
        # hook after the parent has died would otherwise watch the reaper instead.
        os.register_at_fork(before=_remember_forking_pid, after_in_child=_watch_forking_parent)


def _remember_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _watch_forking_parent() -> None:
    exit_with_parent(parent_pid=_forking_pid)


def exit_with_parent_worker(worker_id: int) -> None:
    """worker_init_fn of a torch DataLoader: the worker ends with the rank that started it
    (torch's own check of the parent runs only between batches, every 5 s)."""
    exit_with_parent()
