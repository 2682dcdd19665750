"""Atomic, verifiable checkpoint directories shared by all ranks.

A checkpoint is written into `<root>/.tmp-step_XXXXXXXX`, every file is fsynced and checksummed
(the work is split over the ranks), rank 0 writes the completeness marker `complete.json`
(step, layout, model identity, per-file size and sha256), fsyncs the directory, renames it to
`<root>/step_XXXXXXXX` and fsyncs the root; only then is `<root>/latest` replaced (write a
temporary file, fsync, `os.replace`). A crash at any point leaves either the previous checkpoint
as `latest` or a `.tmp-*` directory that is ignored and removed by the next save.

`verify_checkpoint` refuses a directory without the marker, with a missing or resized file, or
with a checksum mismatch -- before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

MARKER = "complete.json"
LATEST = "latest"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is torn, corrupted or does not match the run; nothing was loaded."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def barrier() -> None:
    if _distributed():
        dist.barrier()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (flushes the inode whoever wrote it)."""
    flags = os.O_RDONLY
    if path.is_dir():
        flags |= getattr(os, "O_DIRECTORY", 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def begin_save(root: Path, step: int) -> Path:
    """Create (on rank 0) an empty temporary directory for this step; all ranks get its path."""
    root = Path(root)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    return tmp


def _all_files(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and p.name != MARKER
    )


def finish_save(root: Path, tmp: Path, step: int, record: dict[str, Any]) -> Path:
    """fsync + checksum every file (split over ranks), write the marker, rename, move `latest`."""
    root, tmp = Path(root), Path(tmp)
    barrier()  # every rank has written its files
    files = _all_files(tmp)
    mine: dict[str, dict[str, Any]] = {}
    for index, rel in enumerate(files):
        if index % _world() != _rank():
            continue
        path = tmp / rel
        fsync_path(path)
        mine[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if _distributed():
        gathered: list[Any] = [None] * _world()
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    final = root / step_dir_name(step)
    if _rank() == 0:
        table: dict[str, Any] = {}
        for part in gathered:
            table.update(part)
        if set(table) != set(files):
            raise CheckpointError(f"checksum table incomplete for {tmp}")
        for sub in sorted({p.parent for p in tmp.rglob("*") if p.is_file()}, reverse=True):
            fsync_path(sub)
        marker = {
            "format": FORMAT_VERSION,
            "step": step,
            "created": time.time(),
            "files": table,
            **record,
        }
        write_json_atomic(tmp / MARKER, marker)
        fsync_path(tmp)
        if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(root)
        latest_tmp = root / (LATEST + ".tmp")
        with open(latest_tmp, "w") as handle:
            handle.write(final.name + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(latest_tmp, root / LATEST)
        fsync_path(root)
    barrier()
    return final


def read_marker(directory: Path) -> dict[str, Any]:
    marker = Path(directory) / MARKER
    if not marker.is_file():
        raise CheckpointError(
            f"{directory} has no {MARKER}: the checkpoint is incomplete (torn write or not a "
            f"megatron_bd3 checkpoint); refusing to load it"
        )
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{marker} is not valid JSON ({exc}); refusing to load") from None


def verify_checkpoint(directory: Path, *, checksums: bool = True) -> dict[str, Any]:
    """The marker of a complete, intact checkpoint; CheckpointError otherwise.

    Sizes are always checked; sha256 when `checksums` (the default) -- each rank can verify a
    share of the files in a distributed load, see `verify_distributed`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    marker = read_marker(directory)
    if marker.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: checkpoint format {marker.get('format')} is not {FORMAT_VERSION}"
        )
    for rel, meta in sorted(marker["files"].items()):
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"{directory}: file {rel} listed in {MARKER} is missing")
        size = path.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(
                f"{directory}: file {rel} has {size} bytes, {MARKER} says {meta['size']}"
            )
        if checksums and sha256_file(path) != meta["sha256"]:
            raise CheckpointError(f"{directory}: checksum mismatch in {rel}; refusing to load")
    return marker


def verify_distributed(directory: Path) -> dict[str, Any]:
    """`verify_checkpoint` with the checksum work split over ranks; every rank agrees or raises."""
    directory = Path(directory)
    error = ""
    marker: dict[str, Any] = {}
    try:
        marker = verify_checkpoint(directory, checksums=False)
        for index, (rel, meta) in enumerate(sorted(marker["files"].items())):
            if index % _world() == _rank() and sha256_file(directory / rel) != meta["sha256"]:
                raise CheckpointError(f"{directory}: checksum mismatch in {rel}; refusing to load")
    except CheckpointError as exc:
        error = str(exc)
    if _distributed():
        errors: list[Any] = [None] * _world()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), "")
    if error:
        raise CheckpointError(error)
    return marker


def read_latest(root: Path) -> Path | None:
    """The checkpoint `latest` points to, or None when the root holds no checkpoint yet."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        if any(_STEP_DIR.match(p.name) for p in root.glob("step_*")):
            raise CheckpointError(
                f"{root} has step_* directories but no '{LATEST}' pointer; pass "
                f"checkpoint.resume=<one of them> explicitly"
            )
        return None
    name = pointer.read_text().strip()
    if not _STEP_DIR.match(name):
        raise CheckpointError(f"{pointer} contains {name!r}, not a step_XXXXXXXX name")
    return root / name


def resume_candidates(root: Path) -> list[Path]:
    """The checkpoints `checkpoint.resume=auto` may continue from, newest first: the one `latest`
    names, then the older step_* directories. A step directory newer than `latest` is never a
    candidate: it belongs to a line of the run that was abandoned (a resume from an older
    checkpoint) or its save did not get as far as moving `latest`."""
    root = Path(root)
    latest = read_latest(root)
    if latest is None:
        return []
    newest = int(_STEP_DIR.match(latest.name).group(1))
    older = [
        p
        for p in reversed(list_checkpoints(root))
        if int(_STEP_DIR.match(p.name).group(1)) < newest
    ]
    return [latest, *older]


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.glob("step_*") if _STEP_DIR.match(p.name) and p.is_dir())


def prune(root: Path, keep_last: int | None, protect: Path | None = None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (rank 0 only)."""
    if keep_last is None or _rank() != 0:
        return
    existing = list_checkpoints(root)
    for old in existing[: max(0, len(existing) - keep_last)]:
        if protect is not None and old.resolve() == Path(protect).resolve():
            continue
        shutil.rmtree(old, ignore_errors=True)
