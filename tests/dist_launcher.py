"""Run a worker script under torchrun (gloo, CPU) from a test and check that every rank succeeded.

Each call picks its own free port, so distributed tests never collide with each other or with
another test session on the same machine. Every rank writes into its own log file (torchrun's
--redirects) and the returned output is the launcher's followed by each rank's, in rank order:
ranks printing at the same time through one pipe could otherwise splice one rank's line into the
middle of another's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_logs(log_dir: Path, nproc: int) -> str:
    """Each rank's stdout then stderr from torchrun's log directory, ranks in order."""
    parts = []
    for rank in range(nproc):
        for stream in ("stdout", "stderr"):
            for log in sorted(log_dir.glob(f"*/attempt_*/{rank}/{stream}.log")):
                text = log.read_text(errors="replace")
                if text:
                    parts.append(f"----- rank {rank} {stream} -----\n{text}")
    return "".join(parts)


def run_distributed(
    script: str | os.PathLike,
    nproc: int,
    *args: str,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> str:
    """Launch `script` on `nproc` local ranks with torchrun and return its combined output.

    Raises AssertionError with the tail of the output when any rank fails or the run times out.
    """
    with tempfile.TemporaryDirectory(prefix="torchrun-logs-") as log_dir:
        return _run_with_rank_logs(script, nproc, args, timeout, env, Path(log_dir))


def _run_with_rank_logs(
    script: str | os.PathLike,
    nproc: int,
    args: tuple[str, ...],
    timeout: float,
    env: dict[str, str] | None,
    log_dir: Path,
) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        f"--log-dir={log_dir}",
        "--redirects=3",
        str(script),
        *map(str, args),
    ]
    run_env = dict(os.environ)
    run_env.setdefault("DS_ACCELERATOR", "cpu")
    run_env.setdefault("WANDB_MODE", "offline")
    run_env.setdefault("OMP_NUM_THREADS", "1")
    run_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), run_env.get("PYTHONPATH", "")) if p
    )
    if env:
        run_env.update(env)
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO_ROOT,
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        out += rank_logs(log_dir, nproc)
        raise AssertionError(
            f"{script} on {nproc} ranks timed out after {timeout}s:\n{out[-6000:]}"
        ) from None
    out = proc.stdout + rank_logs(log_dir, nproc)
    if proc.returncode != 0:
        raise AssertionError(
            f"{script} on {nproc} ranks exited with {proc.returncode}:\n{out[-8000:]}"
        )
    return out
