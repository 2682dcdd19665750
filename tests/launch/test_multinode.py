"""Multi-node launches on one machine: two torchrun "nodes" on loopback (NNODES=2, c10d
rendezvous) and launch/slurm.sbatch under a simulated `srun`/`scontrol` train the same run, loss
for loss, as one node of two processes (DP = 2 in all three)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_launcher import REPO_ROOT, free_port
from tests.training.tiny_run import prepare_tiny_data, tiny_config, train_losses, write_config

TRAIN_ITERS = 3
TIMEOUT = 180

# `scontrol show hostnames LIST`: one line per node; every "node" is this machine.
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || { echo "fake scontrol: unsupported: $*" >&2; exit 1; }
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do echo 127.0.0.1; done
"""

# `srun [--options] CMD ...`: CMD once per node, all at once, SLURM_NODEID = 0..N-1, the
# environment passed on. --kill-on-bad-exit=1: the first task that fails ends the others.
FAKE_SRUN = """#!/usr/bin/env bash
kill_on_bad_exit=0
while [[ "$1" == -* ]]; do
    case "$1" in
        --kill-on-bad-exit|--kill-on-bad-exit=1|-K|-K1) kill_on_bad_exit=1 ;;
        --kill-on-bad-exit=0|-K0) kill_on_bad_exit=0 ;;
    esac
    shift
done
echo "$*" > "${FAKE_SRUN_RECORD:-/dev/null}"
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
    SLURM_NODEID="${node}" SLURM_PROCID="${node}" SLURM_LOCALID=0 "$@" &
    pids+=("$!")
done
status=0
for ((left = ${#pids[@]}; left > 0; left--)); do
    wait -n
    rc=$?
    if [[ "${rc}" -ne 0 && "${status}" -eq 0 ]]; then
        status="${rc}"
        if [[ "${kill_on_bad_exit}" -eq 1 ]]; then kill "${pids[@]}" 2>/dev/null; fi
    fi
done
exit "${status}"
"""


def run_config(directory: Path, run_dir: str) -> Path:
    """A 3-step tiny run named relative to `directory` (where the launchers run); returns the
    config path, relative as well."""
    config = tiny_config(
        Path("data/manifest.json"),
        Path(run_dir),
        training={"train_iters": TRAIN_ITERS},
        validation={"at_end": False},
        checkpoint={"interval": 0, "save_final": False},
        deepspeed={"config": "deepspeed/zero1.json"},
    )
    write_config(directory / run_dir / "cfg.yaml", config)
    return Path(run_dir) / "cfg.yaml"


def launcher_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def start(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    # A file, not a pipe: two launchers that fill their pipes while the test waits on the other
    # would stall the rendezvous.
    with open(log, "w") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def launcher(script: str, cfg: Path, cwd: Path, env: dict[str, str], log: Path):
    argv = ["bash", str(REPO_ROOT / "launch" / script), str(cfg), "--resume", "none"]
    return start(argv, cwd, env, log), log


def finish(procs: list[tuple[subprocess.Popen, Path]]) -> None:
    try:
        for proc, _ in procs:
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in procs:
        assert proc.returncode == 0, (
            f"{log.name}: exit {proc.returncode}\n" + log.read_text()[-4000:]
        )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("multinode")
    prepare_tiny_data(directory)
    return directory


@pytest.fixture(scope="module")
def one_node_losses(workdir: Path) -> dict[int, float]:
    """launch/torchrun.sh, one node of 2 processes: the reference every multi-node run matches."""
    cfg = run_config(workdir, "one_node")
    env = launcher_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    log = workdir / "one_node.log"
    finish([launcher("torchrun.sh", cfg, workdir, env, log)])
    losses = train_losses(workdir / "one_node")
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    return losses


@pytest.mark.distributed
def test_two_loopback_nodes_train_the_same_losses_as_one_node(workdir, one_node_losses):
    """NNODES=2, NODE_RANK=0/1, one process each, c10d rendezvous on 127.0.0.1: DP = 2 across the
    two "nodes" sees the same batches and the same all-reduce as DP = 2 on one node, so the logged
    losses are bit-identical."""
    cfg = run_config(workdir, "two_nodes")
    port = str(free_port())
    procs = []
    for node_rank in (0, 1):
        env = launcher_env(
            NNODES="2",
            NODE_RANK=str(node_rank),
            NPROC_PER_NODE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            RDZV_ID=f"bd3-test-{port}",
        )
        log = workdir / f"node{node_rank}.log"
        procs.append(launcher("torchrun.sh", cfg, workdir, env, log))
    finish(procs)
    assert train_losses(workdir / "two_nodes") == one_node_losses


def fake_slurm_bin(directory: Path) -> Path:
    bin_dir = directory / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def slurm_env(directory: Path, **extra: str) -> dict[str, str]:
    bin_dir = fake_slurm_bin(directory)
    return launcher_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="node[0-1]",
        SLURM_JOB_ID=str(free_port()),
        SLURM_GPUS_ON_NODE="1",
        SLURM_SUBMIT_DIR=str(directory),
        MASTER_PORT=str(free_port()),
        FAKE_SRUN_RECORD=str(directory / "srun_args"),
        **extra,
    )


@pytest.mark.distributed
def test_slurm_sbatch_under_a_simulated_srun_trains_the_same_losses_as_one_node(
    workdir, one_node_losses
):
    """`bash launch/slurm.sbatch` (the #SBATCH lines are comments then, so no runs/ directory is
    needed for --output): a fake `scontrol` names 127.0.0.1 for both nodes, a fake `srun` starts
    the torchrun task once per node with SLURM_NODEID 0 and 1."""
    cfg = run_config(workdir, "slurm")
    env = slurm_env(workdir)
    log = workdir / "slurm.log"
    finish([launcher("slurm.sbatch", cfg, workdir, env, log)])
    assert "nodes=2 master=127.0.0.1:" in log.read_text()
    assert (workdir / "srun_args").read_text().startswith("bash -c")
    assert train_losses(workdir / "slurm") == one_node_losses


@pytest.mark.distributed
def test_slurm_sbatch_ends_every_node_when_one_fails(workdir, tmp_path):
    """Node 1's interpreter exits 3 before it joins the rendezvous; node 0 would wait there for
    the rendezvous timeout (minutes) but srun --kill-on-bad-exit=1 ends it, and the job fails."""
    cfg = run_config(workdir, "slurm_fails")
    python = tmp_path / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        '[[ "${SLURM_NODEID}" == 1 ]] && { echo "node 1 fails" >&2; exit 3; }\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    env = slurm_env(tmp_path, PYTHON=str(python))
    log = tmp_path / "slurm.log"
    proc, _ = launcher("slurm.sbatch", cfg, workdir, env, log)
    try:
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert returncode == 3, log.read_text()[-3000:]
    assert "node 1 fails" in log.read_text()
