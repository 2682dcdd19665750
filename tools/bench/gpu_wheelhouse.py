"""Wheels for a lent GPU machine, which reaches no package index (docs/bench/gpu.md).

    python -m tools.bench.gpu_wheelhouse [--python-version 3.12] [--output runs/wheelhouse]

The GPU image brings torch (CUDA) and its own dependencies; everything else that
``tools/bench/gpu_session.sh`` runs there (the GPU bench, the trainer and the CUDA test run)
must travel with the working tree. This collects exactly that: the dependency closure,
read from this environment's installed metadata, of the runtime packages below plus pytest, at
the versions installed here (setup.py's pins), without torch and without what the GPU checks
never import (wandb is optional and logged as off when absent; gensim carries the embedded
corpus, pyarrow reads parquet input of the data tools). ``tokenizers`` is in: the trainer loads
the synthetic GPT-2-sized tokenizer of docs/bench/gpu.md through it. Binary wheels are
downloaded for the target Python; DeepSpeed publishes only a source distribution, so its wheel
is built here without compiled ops (``DS_BUILD_OPS=0``, as on the first H100 run).

The result must fit the device tool's carry limit (64 MiB for all carried paths together); the
script stops with an error naming the size otherwise. Then, for example::

    run(command="bash tools/bench/gpu_session.sh", carry=["runs/wheelhouse"], timeout_s=540)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement

ROOTS = ("megatron-core", "deepspeed", "webdataset", "sentencepiece", "tokenizers", "safetensors",
         "pyyaml", "tqdm", "numpy", "pytest")
EXCLUDED = frozenset({"torch"})
SOURCE_ONLY = frozenset({"deepspeed"})
CARRY_LIMIT_BYTES = 64 * 2**20
REQUIREMENTS = "requirements.txt"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_28_x86_64")

def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _target_environment(python_version: str) -> dict[str, str]:
    """Marker environment of the GPU machine: Linux x86_64, CPython ``python_version``."""
    return {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "platform_machine": "x86_64", "platform_python_implementation": "CPython",
            "implementation_name": "cpython", "extra": ""}


def closure(python_version: str, roots: tuple[str, ...] = ROOTS,
            excluded: frozenset[str] = EXCLUDED) -> dict[str, str]:
    """name -> installed version of ``roots`` and everything they require on the target (Linux,
    CPython ``python_version``, no extras), minus ``excluded``. A required package that is not
    installed here is an error naming it and who needs it: the wheelhouse must not silently miss
    a dependency."""
    environment = _target_environment(python_version)
    versions: dict[str, str] = {}
    pending = [(_normalise(root), "(root)") for root in roots]
    while pending:
        name, needed_by = pending.pop()
        if name in versions or name in excluded:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"{name} (required by {needed_by}) is not installed in "
                             f"{sys.prefix}; run `make install` first") from None
        versions[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                pending.append((_normalise(requirement.name), name))
    return dict(sorted(versions.items()))


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)


def build(output: Path, python_version: str) -> list[Path]:
    """Fill ``output`` with the wheels; return them."""
    output.mkdir(parents=True, exist_ok=True)
    versions = closure(python_version)
    binary = [f"{name}=={version}" for name, version in versions.items()
              if name not in SOURCE_ONLY]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
         *platforms, "--dest", str(output), *binary)
    for name in sorted(SOURCE_ONLY & set(versions)):
        env = {**os.environ, "DS_BUILD_OPS": "0"}
        _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(output),
             f"{name}=={versions[name]}", env=env)
    # What gpu_session.sh asks pip for: the roots at their versions (pip takes the rest from the
    # wheelhouse or keeps what the GPU image already has when it satisfies them).
    roots = [f"{_normalise(r)}=={versions[_normalise(r)]}" for r in ROOTS]
    (output / REQUIREMENTS).write_text("\n".join(roots) + "\n")
    wheels = sorted(output.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {output}")
    if size > CARRY_LIMIT_BYTES:
        raise SystemExit(f"{output} holds {size / 2**20:.1f} MiB of wheels, more than the device "
                         f"tool's carry limit of {CARRY_LIMIT_BYTES / 2**20:.0f} MiB")
    return wheels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12",
                        help="the GPU image's Python (3.12 on the H100 of 2026-11-23)")
    parser.add_argument("--output", type=Path, default=Path("runs/wheelhouse"))
    parser.add_argument("--list", action="store_true", help="print the closure and stop")
    args = parser.parse_args(argv)
    if args.list:
        for name, version in closure(args.python_version).items():
            print(f"{name}=={version}")
        return 0
    build(args.output, args.python_version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
