"""The lent-GPU session kit: the wheelhouse's dependency closure, and gpu_session.sh's plumbing
(run in its CPU smoke mode: parts, per-part logs, summary, exit status)."""

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from tools.bench import gpu_wheelhouse

REPO_ROOT = Path(__file__).resolve().parents[2]
SESSION = REPO_ROOT / "tools" / "bench" / "gpu_session.sh"


def test_closure_holds_the_runtime_and_its_dependencies_at_the_installed_versions():
    versions = gpu_wheelhouse.closure("3.11")
    for name in ("megatron-core", "deepspeed", "webdataset", "sentencepiece", "pytest"):
        assert versions[name] == version(name)
    # transitive: deepspeed -> pydantic -> pydantic-core; webdataset -> braceexpand
    assert {"pydantic", "pydantic-core", "braceexpand"} <= set(versions)
    assert "torch" not in versions  # the GPU image brings its CUDA build
    assert not {"wandb", "gensim", "pyarrow"} & set(versions)  # never imported by the checks


def test_closure_follows_the_target_python_markers_and_names_a_missing_package():
    # pytest needs exceptiongroup and tomli only below Python 3.11, and this environment (3.11)
    # lacks at least exceptiongroup (tomli becomes findable once setuptools puts its vendored
    # copies on sys.path, as some imports in the full suite do)
    assert not {"tomli", "exceptiongroup"} & set(gpu_wheelhouse.closure("3.11"))
    with pytest.raises(SystemExit,
                       match=r"(exceptiongroup|tomli) \(required by pytest\) is not installed"):
        gpu_wheelhouse.closure("3.10")


def _session(tmp_path: Path, *parts: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
               "SMOKE": "1", **env}
    return subprocess.run(["bash", str(SESSION), *parts], capture_output=True, text=True,
                          env=environ, timeout=300)


def test_session_smoke_runs_its_parts_and_reports_each(tmp_path):
    result = _session(tmp_path, "env", "bench")
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in summary] == [["env", "rc=0"], ["bench", "rc=0"]]
    assert "torch" in (out / "env.log").read_text()
    assert json.loads((out / "gpu.json").read_text())["meta"]["device"] == "cpu"


def test_session_counts_failed_parts_and_refuses_unknown_ones(tmp_path):
    result = _session(tmp_path, "install", "env", WHEELS=str(tmp_path / "no_wheels"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "requirements.txt not found" in (tmp_path / "out" / "install.log").read_text()
    assert "env rc=0" in (tmp_path / "out" / "summary.txt").read_text()  # later parts still ran
    result = _session(tmp_path, "nonsense")
    assert result.returncode == 2
    assert "unknown part 'nonsense'" in result.stdout
