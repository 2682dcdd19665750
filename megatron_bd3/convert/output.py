"""Where conversions write: staged output directories and the result record (torch only)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megatron_bd3.convert.parity import ParityReport

__all__ = ["ConversionResult", "normal_modes", "staged_output"]


@dataclass
class ConversionResult:
    """What a conversion wrote and how it checked it."""

    output_dir: Path
    source: Path
    parity: list[ParityReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"wrote {self.output_dir} (from {self.source})"]
        lines += [f"  {note}" for note in self.notes]
        lines += [f"  {report.describe()}" for report in self.parity]
        return "\n".join(lines)


@contextlib.contextmanager
def staged_output(output_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `output_dir`; on success it replaces
    `output_dir` (with normal file modes, see `normal_modes`), on error it is removed. An
    existing non-empty `output_dir` is an error unless `overwrite` (then it is replaced as a
    whole)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {output_dir} is not empty; choose another one "
                              "or pass overwrite=True (--overwrite) to replace it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    normal_modes(tmp)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.rename(tmp, output_dir)


def normal_modes(directory: Path) -> None:
    """Files 0644 and directories 0755 under `directory` (and itself): an export is meant to be
    shared, and some writers (safetensors) create their files owner-only."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
