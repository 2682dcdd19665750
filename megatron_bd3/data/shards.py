"""The shard format: webdataset-compatible tar files with a fixed, seekable layout.

A split's samples are numbered 0..N-1 in stream order and stored in order, `samples_per_shard` per
file (`train-000000.tar`, `train-000001.tar`, ...). Sample i is one tar member

    {i:012d}.tokens.npy      a .npy array of shape [L], dtype '<u2' or '<u4' (little-endian)

so webdataset sees key "{i:012d}" and extension "tokens.npy" (`wds.WebDataset(url).decode()`
yields numpy arrays under "tokens.npy"). Headers are deterministic (ustar, mtime 0, uid/gid 0,
empty user/group names, mode 0644): the same inputs give byte-identical shards.

Because every member has the same name length and size, member j of a shard starts at byte
j * stride (stride = one 512-byte header + the payload padded to 512), so the loader reads any
sample by index with one `pread`, without scanning the tar; the header name and the .npy header of
each sample read are checked against what that index must hold.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_EXTENSION = "tokens.npy"
KEY_DIGITS = 12
TAR_BLOCK = 512
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class ShardError(ValueError):
    """A shard that does not hold what the manifest says; the message names the file."""


def sample_key(index: int) -> str:
    """The webdataset key of sample `index` of a split: its index, zero-padded."""
    return f"{index:0{KEY_DIGITS}d}"


def member_name(index: int) -> str:
    return f"{sample_key(index)}.{SAMPLE_EXTENSION}"


def shard_file_name(split: str, shard_number: int) -> str:
    return f"{split}-{shard_number:06d}.tar"


def choose_dtype(vocab_size: int, requested: str = "auto") -> str:
    """'uint16' when every id fits (vocab <= 65536), else 'uint32'; checks an explicit choice."""
    if requested == "auto":
        return "uint16" if vocab_size <= 2**16 else "uint32"
    if requested not in DTYPES:
        raise ValueError(f"dtype {requested!r} is not one of auto, {', '.join(DTYPES)}")
    if requested == "uint16" and vocab_size > 2**16:
        raise ValueError(f"dtype uint16 cannot hold vocab_size {vocab_size} (> 65536); use uint32")
    return requested


def npy_header(dtype: str, seq_length: int) -> bytes:
    """The exact .npy header bytes of one sample (identical for every sample of a split)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.zeros(seq_length, dtype=DTYPES[dtype]), allow_pickle=False)
    return buffer.getvalue()[: -seq_length * DTYPES[dtype].itemsize]


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def member_stride(dtype: str, seq_length: int) -> int:
    """Bytes from one member's header to the next one's."""
    return TAR_BLOCK + _padded(
        len(npy_header(dtype, seq_length)) + seq_length * DTYPES[dtype].itemsize
    )


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class TarShardWriter:
    """Writes one split's sequences, in order, into deterministic tar shards.

    Shards are written as `<name>.tmp` and renamed when complete, so an interrupted run never
    leaves a shard that looks finished. `close()` returns the per-shard records for the manifest.
    """

    def __init__(
        self,
        directory: str | Path,
        split: str,
        seq_length: int,
        dtype: str,
        samples_per_shard: int,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard {samples_per_shard} must be at least 1")
        self.directory = Path(directory)
        self.split = split
        self.seq_length = seq_length
        self.dtype = dtype
        self.samples_per_shard = samples_per_shard
        self._np_dtype = DTYPES[dtype]
        self._header = npy_header(dtype, seq_length)
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._in_shard = 0
        self._shard_first = 0
        self.num_samples = 0
        self.records: list[dict[str, Any]] = []

    def _open_shard(self) -> None:
        name = shard_file_name(self.split, len(self.records))
        self._tmp_path = self.directory / (name + ".tmp")
        self._tar = tarfile.open(self._tmp_path, mode="w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0
        self._shard_first = self.num_samples

    def _close_shard(self) -> None:
        assert self._tar is not None and self._tmp_path is not None
        self._tar.close()
        final = self._tmp_path.with_name(self._tmp_path.name[: -len(".tmp")])
        os.replace(self._tmp_path, final)
        self.records.append(
            {
                "file": final.name,
                "first_index": self._shard_first,
                "sequences": self._in_shard,
                "tokens": self._in_shard * self.seq_length,
                "bytes": final.stat().st_size,
                "sha256": file_sha256(final),
            }
        )
        self._tar = None
        self._tmp_path = None

    def write(self, sequences: np.ndarray) -> None:
        """Append sequences [n, seq_length] (any integer dtype whose values fit)."""
        sequences = np.asarray(sequences)
        if sequences.ndim != 2 or sequences.shape[1] != self.seq_length:
            raise ValueError(
                f"expected sequences of shape [n, {self.seq_length}], got {sequences.shape}"
            )
        if len(sequences) and int(sequences.max()) > np.iinfo(self._np_dtype).max:
            raise ValueError(f"token id {int(sequences.max())} does not fit {self.dtype}")
        rows = sequences.astype(self._np_dtype, copy=False)
        for row in rows:
            if self._tar is None:
                self._open_shard()
            payload = self._header + row.tobytes()
            info = tarfile.TarInfo(member_name(self.num_samples))
            info.size = len(payload)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(payload))  # type: ignore[union-attr]
            self._in_shard += 1
            self.num_samples += 1
            if self._in_shard == self.samples_per_shard:
                self._close_shard()

    def close(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._close_shard()
        return self.records

    def abort(self) -> None:
        """Remove everything this writer wrote (a failed run must not leave shards behind)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._tmp_path is not None:
            self._tmp_path.unlink(missing_ok=True)
            self._tmp_path = None
        for record in self.records:
            (self.directory / record["file"]).unlink(missing_ok=True)
        self.records = []


class ShardReader:
    """Random access to one split's samples by index, straight from its tar shards.

    `shards` are the manifest's records of the split (file, first_index, sequences). File
    descriptors are opened lazily and reads use `os.pread` (no shared file position), so a reader
    may be inherited by forked DataLoader workers; pickling drops the descriptors.
    """

    def __init__(
        self, directory: str | Path, shards: Sequence[dict[str, Any]], seq_length: int, dtype: str
    ):
        self.directory = Path(directory)
        self.files = [str(self.directory / s["file"]) for s in shards]
        counts = np.array([int(s["sequences"]) for s in shards], dtype=np.int64)
        self.starts = np.concatenate(
            [[0], np.cumsum(counts)]
        )  # shard k holds [starts[k], starts[k+1])
        for k, record in enumerate(shards):
            if int(record["first_index"]) != int(self.starts[k]):
                raise ShardError(
                    f"{self.files[k]}: manifest says its first sample is {record['first_index']}, "
                    f"but the counts of the shards before it add up to {int(self.starts[k])}"
                )
        self.num_samples = int(self.starts[-1])
        self.seq_length = seq_length
        self.dtype = dtype
        self._np_dtype = DTYPES[dtype]
        self._header = npy_header(dtype, seq_length)
        self._payload_offset = TAR_BLOCK + len(self._header)
        self._read_size = self._payload_offset + seq_length * self._np_dtype.itemsize
        self.stride = member_stride(dtype, seq_length)
        self._fds: dict[int, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = os.open(self.files[shard], os.O_RDONLY)
            except OSError as exc:
                raise ShardError(
                    f"{self.files[shard]}: cannot open shard ({exc.strerror})"
                ) from exc
            self._fds[shard] = fd
        return fd

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The samples at `indices`, as an array [len(indices), seq_length] of the shard dtype."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.seq_length), dtype=self._np_dtype)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(
                f"sample index out of range [0, {self.num_samples}): {indices.tolist()}"
            )
        shards = np.searchsorted(self.starts, indices, side="right") - 1
        for row, (index, shard) in enumerate(zip(indices.tolist(), shards.tolist(), strict=True)):
            offset = (index - int(self.starts[shard])) * self.stride
            buffer = os.pread(self._fd(shard), self._read_size, offset)
            if len(buffer) != self._read_size:
                raise ShardError(
                    f"{self.files[shard]}: truncated — sample {index} should occupy bytes "
                    f"{offset}..{offset + self._read_size} but the file ends earlier"
                )
            name = buffer[:100].rstrip(b"\0")
            if (
                name != member_name(index).encode()
                or buffer[TAR_BLOCK : self._payload_offset] != self._header
            ):
                raise ShardError(
                    f"{self.files[shard]}: corrupt shard — at byte {offset} expected member "
                    f"{member_name(index)!r} ({self.dtype}, length {self.seq_length}) but found "
                    f"{name[:40]!r}; the file is damaged or was not written with this manifest"
                )
            out[row] = np.frombuffer(
                buffer, dtype=self._np_dtype, count=self.seq_length, offset=self._payload_offset
            )
        return out


def expected_shard_bytes(num_members: int, dtype: str, seq_length: int) -> int:
    """Size of a shard written by TarShardWriter: members, two zero blocks, padded to 10240."""
    size = num_members * member_stride(dtype, seq_length) + 2 * TAR_BLOCK
    return -(-size // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
