"""The shard format: webdataset-compatible tar files with a fixed, seekable layout.

A split's samples are numbered 0..N-1 in stream order and stored in order, `samples_per_shard` per
file (`train-000000.tar`, `train-000001.tar`, ...). Sample i is one tar member

    {i:012d}.tokens.npy      a .npy array of shape [L], dtype '<u2' or '<u4' (little-endian)

so webdataset sees key "{i:012d}" and extension "tokens.npy" (`wds.WebDataset(url).decode()`
yields numpy arrays under "tokens.npy"). Headers are deterministic (ustar, mtime 0, uid/gid 0,
empty user/group names, mode 0644): the same inputs give byte-identical shards.

Shards written with document boundaries (`bd3-prepare-data --document-boundaries`, recorded as
`document_starts: true` in the manifest) hold a second member right after each sample's tokens:

    {i:012d}.document_starts.npy   a .npy array of shape [L], dtype uint8: 1 at the first token
                                   of every document that begins in the sample (packing.py)

(webdataset groups both under key "{i:012d}").

Because every member has the same name length and size, member j of a shard starts at byte
j * stride (stride = one 512-byte header + the payload padded to 512, for each member of a
sample), so the loader reads any sample by index with one `pread`, without scanning the tar; the
header names and the .npy headers of each sample read are checked against what that index must
hold.
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

from megatron_bd3.data.packing import document_ids_from_starts

SAMPLE_EXTENSION = "tokens.npy"
DOCUMENT_STARTS_EXTENSION = "document_starts.npy"
DOCUMENT_STARTS_DTYPE = np.dtype("u1")
KEY_DIGITS = 12
TAR_BLOCK = 512
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class ShardError(ValueError):
    """A shard that does not hold what the manifest says; the message names the file."""


def sample_key(index: int) -> str:
    """The webdataset key of sample `index` of a split: its index, zero-padded."""
    return f"{index:0{KEY_DIGITS}d}"


def member_name(index: int, extension: str = SAMPLE_EXTENSION) -> str:
    return f"{sample_key(index)}.{extension}"


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


def _np_dtype(dtype: str | np.dtype) -> np.dtype:
    return DTYPES[dtype] if isinstance(dtype, str) else np.dtype(dtype)


def npy_header(dtype: str | np.dtype, seq_length: int) -> bytes:
    """The exact .npy header bytes of one sample's array (identical for every sample of a split);
    `dtype` a DTYPES name (tokens) or a numpy dtype (DOCUMENT_STARTS_DTYPE)."""
    np_dtype = _np_dtype(dtype)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.zeros(seq_length, dtype=np_dtype), allow_pickle=False)
    return buffer.getvalue()[: -seq_length * np_dtype.itemsize]


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def member_stride(dtype: str | np.dtype, seq_length: int) -> int:
    """Bytes from one member's header to the next one's."""
    return TAR_BLOCK + _padded(
        len(npy_header(dtype, seq_length)) + seq_length * _np_dtype(dtype).itemsize
    )


def sample_stride(dtype: str, seq_length: int, document_starts: bool = False) -> int:
    """Bytes of one sample: its tokens member, and its document-starts member if stored."""
    stride = member_stride(dtype, seq_length)
    if document_starts:
        stride += member_stride(DOCUMENT_STARTS_DTYPE, seq_length)
    return stride


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
        document_starts: bool = False,
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
        self.document_starts = document_starts
        self._starts_header = npy_header(DOCUMENT_STARTS_DTYPE, seq_length)
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

    def write(self, sequences: np.ndarray, document_starts: np.ndarray | None = None) -> None:
        """Append sequences [n, seq_length] (any integer dtype whose values fit), and their
        document-start flags [n, seq_length] when the writer stores them."""
        sequences = np.asarray(sequences)
        if sequences.ndim != 2 or sequences.shape[1] != self.seq_length:
            raise ValueError(
                f"expected sequences of shape [n, {self.seq_length}], got {sequences.shape}"
            )
        if len(sequences) and int(sequences.max()) > np.iinfo(self._np_dtype).max:
            raise ValueError(f"token id {int(sequences.max())} does not fit {self.dtype}")
        if self.document_starts != (document_starts is not None):
            raise ValueError(
                "document_starts must be given exactly when the writer stores them "
                f"(document_starts={self.document_starts})"
            )
        rows = sequences.astype(self._np_dtype, copy=False)
        if document_starts is not None:
            document_starts = np.asarray(document_starts, dtype=DOCUMENT_STARTS_DTYPE)
            if document_starts.shape != sequences.shape:
                raise ValueError(
                    f"document_starts {document_starts.shape} do not match the sequences "
                    f"{sequences.shape}"
                )
        for i, row in enumerate(rows):
            if self._tar is None:
                self._open_shard()
            self._add_member(member_name(self.num_samples), self._header + row.tobytes())
            if document_starts is not None:
                self._add_member(
                    member_name(self.num_samples, DOCUMENT_STARTS_EXTENSION),
                    self._starts_header + document_starts[i].tobytes(),
                )
            self._in_shard += 1
            self.num_samples += 1
            if self._in_shard == self.samples_per_shard:
                self._close_shard()

    def _add_member(self, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(payload))  # type: ignore[union-attr]

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

    `shards` are the manifest's records of the split (file, first_index, sequences);
    `document_starts`: the shards hold each sample's document-start flags too (manifest key
    `document_starts`). File descriptors are opened lazily and reads use `os.pread` (no shared
    file position), so a reader may be inherited by forked DataLoader workers; pickling drops the
    descriptors.
    """

    def __init__(
        self,
        directory: str | Path,
        shards: Sequence[dict[str, Any]],
        seq_length: int,
        dtype: str,
        document_starts: bool = False,
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
        self.document_starts = document_starts
        self._starts_header = npy_header(DOCUMENT_STARTS_DTYPE, seq_length)
        self._starts_member = member_stride(dtype, seq_length)  # offset in the sample
        self._starts_offset = self._starts_member + TAR_BLOCK + len(self._starts_header)
        if document_starts:
            self._read_size = self._starts_offset + seq_length
        self.stride = sample_stride(dtype, seq_length, document_starts)
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
        return self.read_with_document_starts(indices)[0]

    def read_document_ids(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Per-token document ids [len(indices), seq_length] (int64, 0 at each sample's first
        token) of the samples at `indices`; the shards must hold document starts."""
        starts = self.read_with_document_starts(indices)[1]
        if starts is None:
            raise ShardError(
                f"{self.directory}: the shards hold no document boundaries; prepare the data "
                "with bd3-prepare-data --document-boundaries"
            )
        return document_ids_from_starts(starts)

    def read_with_document_starts(
        self, indices: Sequence[int] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(tokens [n, seq_length] of the shard dtype, document-start flags uint8 [n,
        seq_length] or None when the shards hold none) of the samples at `indices`."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.seq_length), dtype=self._np_dtype)
        starts = (
            np.empty((len(indices), self.seq_length), dtype=DOCUMENT_STARTS_DTYPE)
            if self.document_starts
            else None
        )
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
            if starts is not None:
                member = buffer[self._starts_member : self._starts_member + 100].rstrip(b"\0")
                if (
                    member != member_name(index, DOCUMENT_STARTS_EXTENSION).encode()
                    or buffer[self._starts_member + TAR_BLOCK : self._starts_offset]
                    != self._starts_header
                ):
                    raise ShardError(
                        f"{self.files[shard]}: corrupt shard — sample {index} has no "
                        f"{DOCUMENT_STARTS_EXTENSION} member of length {self.seq_length} after "
                        "its tokens; the file was not written with this manifest"
                    )
                starts[row] = np.frombuffer(
                    buffer, dtype=DOCUMENT_STARTS_DTYPE, count=self.seq_length,
                    offset=self._starts_offset,
                )
        return out, starts


def expected_shard_bytes(
    num_members: int, dtype: str, seq_length: int, document_starts: bool = False
) -> int:
    """Size of a shard written by TarShardWriter holding `num_members` samples: their members,
    two zero blocks, padded to 10240."""
    size = num_members * sample_stride(dtype, seq_length, document_starts) + 2 * TAR_BLOCK
    return -(-size // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
