"""A non-editable install, used from a directory that is not the checkout.

The package is built from a copy of the sources and installed with `pip install --no-deps
--no-build-isolation --no-index` (no network) into a fresh virtualenv. The virtualenv gets the
dependencies (torch, megatron-core, DeepSpeed, ...) through a .pth file naming this interpreter's
site-packages instead of reinstalling them; such a .pth line only extends sys.path, so the
checkout's editable install (a finder that a .pth *import* line registers) stays out of it. Then,
from an empty directory, the installed console scripts prepare data and train a shipped config
for 5 steps with relative paths only. About 25 s on 2 cores (not `slow`).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Written by a run: none of these may appear in the checkout.
_OUTPUT_SUFFIXES = (".jsonl", ".json", ".yaml", ".pt", ".tar", ".model", ".distcp", ".txt", "")


def _files(root: Path) -> set[Path]:
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        out.update(Path(dirpath, f).relative_to(root) for f in filenames)
    return out


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _make_venv(venv: Path) -> Path:
    """A virtualenv whose dependencies come from this interpreter's site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (target / "_bd3_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    return python


def _copy_sources(destination: Path) -> Path:
    """The files a build reads (tools/ too: it must be left out by setup.py, not by the copy)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("megatron_bd3", "tools"):
        shutil.copytree(REPO_ROOT / name, destination / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        if (REPO_ROOT / name).is_file():
            shutil.copy2(REPO_ROOT / name, destination / name)
    return destination


def test_pip_install_then_train_a_shipped_config_from_an_empty_directory(tmp_path):
    before = _files(REPO_ROOT)
    python = _make_venv(tmp_path / "venv")
    bin_dir = python.parent
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", DS_ACCELERATOR="cpu", WANDB_MODE="offline",
               OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    source = _copy_sources(tmp_path / "src")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", "--ignore-installed", str(source)], cwd=tmp_path, env=env)

    work = tmp_path / "work"
    work.mkdir()
    where = json.loads(_run([str(python), "-c", (
        "import importlib.util, json, megatron_bd3, megatron_bd3.cli.train as t; "
        "print(json.dumps([megatron_bd3.__file__, t.__file__, "
        "importlib.util.find_spec('tools') is not None]))"
    )], cwd=work, env=env))
    venv = (tmp_path / "venv").resolve()
    assert Path(where[0]).resolve().is_relative_to(venv), where  # not the checkout's editable one
    assert Path(where[1]).resolve().is_relative_to(venv), where
    assert where[2] is False, "a top-level `tools` package is importable from the install"
    package = Path(where[0]).parent
    assert (package / "configs" / "tiny_cpu.yaml").is_file()
    assert (package / "configs" / "deepspeed" / "zero1.json").is_file()
    for name in ("configuration_bd3lm.py", "modeling_bd3lm.py", "tokenization_bd3lm.py"):
        assert (package / "convert" / "hf_files" / name).is_file(), name  # copied into exports
    assert not (package.parent / "tools").exists()
    for script in ("bd3-train", "bd3-prepare-data", "bd3-train-tokenizer", "bd3-convert",
                   "bd3-sample"):
        assert (bin_dir / script).is_file(), script

    _run([str(bin_dir / "bd3-train-tokenizer"), "--input", "default", "--output", "tok",
          "--vocab-size", "512", "-q"], cwd=work, env=env)
    _run([str(bin_dir / "bd3-prepare-data"), "--input", "default", "--tokenizer", "tok",
          "--output", "data", "--seq-length", "64", "--no-progress", "-q"], cwd=work, env=env)
    _run([str(bin_dir / "bd3-train"), "tiny_cpu", "data.manifest=data/manifest.json",
          "data.tokenizer=tok", "training.train_iters=5", "validation.interval=0",
          "validation.at_end=false", "checkpoint.interval=0", "logging.interval=1",
          "logging.tqdm=false", "logging.wandb.mode=disabled", "--resume", "none"],
         cwd=work, env=env)

    run_dir = work / "runs" / "tiny_cpu"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text()
             .splitlines() if line and "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5]
    assert (run_dir / "checkpoints" / "latest").exists()
    assert (run_dir / "config.yaml").is_file()
    assert not (package / "runs").exists() and not (package / "configs" / "runs").exists()
    # Files that appeared in the checkout meanwhile (other than sources someone may be editing)
    # would be outputs of this run landing in the wrong place.
    new = sorted(str(p) for p in _files(REPO_ROOT) - before if p.suffix in _OUTPUT_SUFFIXES)
    assert not new, f"written into the checkout: {new[:10]}"
