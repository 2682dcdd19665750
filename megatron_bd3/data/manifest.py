"""The shard manifest: what a prepared data directory holds, and the checks made against it.

`manifest.json` sits next to the shards. It records the tokenizer (fingerprint, vocab size,
special ids), the sequence length L, the sample dtype, the writer's options, per-input provenance
with skip counts, and per split: documents, tokens, sequences, the dropped tail, and every shard's
sample count, first index, size and sha256; `document_starts: true` when the shards also hold each
sample's document-start flags (bd3-prepare-data --document-boundaries; absent means false). The
loader refuses data whose tokenizer fingerprint or
L differ from what the model expects, and shards whose size or checksum differ from the manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_bd3.data.shards import DTYPES, expected_shard_bytes, file_sha256

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "megatron_bd3.shards"
MANIFEST_VERSION = 1
VERIFY_MODES = ("none", "size", "sha256", "auto")
AUTO_SHA256_LIMIT_BYTES = 256 * 2**20
"""verify="auto" hashes every shard when a split is at most this big, else checks sizes only."""


class ManifestError(ValueError):
    """A manifest that is unreadable or does not match the data or the model; names the file."""


@dataclass
class Manifest:
    """A parsed manifest.json (`data` is the raw JSON object)."""

    path: Path
    data: dict[str, Any]

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def seq_length(self) -> int:
        return int(self.data["seq_length"])

    @property
    def dtype(self) -> str:
        return str(self.data["dtype"])

    @property
    def document_starts(self) -> bool:
        """Whether the shards hold document-start flags next to the tokens (shards.py)."""
        return bool(self.data.get("document_starts", False))

    def require_document_starts(self) -> None:
        """Refuse data without document boundaries (what document masking needs)."""
        if not self.document_starts:
            raise ManifestError(
                f"{self.path}: the shards hold no document boundaries, which data.document_mask "
                "needs; prepare the data again with bd3-prepare-data --document-boundaries"
            )

    @property
    def tokenizer(self) -> dict[str, Any]:
        return self.data["tokenizer"]

    @property
    def splits(self) -> dict[str, Any]:
        return self.data["splits"]

    def split(self, name: str) -> dict[str, Any]:
        if name not in self.splits:
            raise ManifestError(
                f"{self.path}: no split {name!r} "
                f"(splits: {', '.join(sorted(self.splits)) or 'none'})"
            )
        return self.splits[name]

    def check(
        self,
        expected_tokenizer_fingerprint: str | None = None,
        expected_seq_length: int | None = None,
    ) -> None:
        """Refuse data written for another tokenizer or another sequence length."""
        recorded = self.tokenizer.get("fingerprint")
        if (
            expected_tokenizer_fingerprint is not None
            and recorded != expected_tokenizer_fingerprint
        ):
            raise ManifestError(
                f"{self.path}: the shards were tokenized with tokenizer fingerprint {recorded} "
                f"(from {self.tokenizer.get('source')}), but the tokenizer in use has "
                f"{expected_tokenizer_fingerprint}; re-run bd3-prepare-data with this tokenizer or "
                f"use the tokenizer the data was written with"
            )
        if expected_seq_length is not None and self.seq_length != int(expected_seq_length):
            raise ManifestError(
                f"{self.path}: the shards hold sequences of seq_length {self.seq_length}, but "
                f"seq_length {expected_seq_length} is expected; re-run bd3-prepare-data with "
                f"--seq-length {expected_seq_length}"
            )

    def verify(self, split: str, mode: str = "auto") -> str:
        """Check the split's shard files against the manifest; return the mode actually used.

        "size": each file exists and has the recorded size (catches truncation and most
        replacement, costs one stat per shard); "sha256": also hashes every file (catches any
        corruption; reads the whole split); "auto": sha256 up to AUTO_SHA256_LIMIT_BYTES per
        split, size above; "none": nothing.
        """
        if mode not in VERIFY_MODES:
            raise ValueError(f"verify mode {mode!r} is not one of {', '.join(VERIFY_MODES)}")
        shards = self.split(split)["shards"]
        if mode == "auto":
            total = sum(int(s["bytes"]) for s in shards)
            mode = "sha256" if total <= AUTO_SHA256_LIMIT_BYTES else "size"
        if mode == "none":
            return mode
        for record in shards:
            path = self.directory / record["file"]
            if not path.is_file():
                raise ManifestError(f"{path}: shard listed in {self.path} is missing")
            size = path.stat().st_size
            if size != int(record["bytes"]):
                raise ManifestError(
                    f"{path}: shard is {size} bytes but {self.path.name} records {record['bytes']} "
                    f"— truncated or replaced; restore it or re-run bd3-prepare-data"
                )
            if mode == "sha256":
                digest = file_sha256(path)
                if digest != record["sha256"]:
                    raise ManifestError(
                        f"{path}: sha256 {digest} does not match {self.path.name} "
                        f"({record['sha256']}) — the shard is corrupt or from another run; "
                        f"restore it or re-run bd3-prepare-data"
                    )
        return mode


def _require(data: dict[str, Any], key: str, path: Path) -> Any:
    if key not in data:
        raise ManifestError(
            f"{path}: missing field {key!r}; not a manifest written by bd3-prepare-data"
        )
    return data[key]


def load_manifest(path_or_dir: str | Path) -> Manifest:
    """Read and structurally validate a manifest (a manifest.json path or its directory)."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest; write one with bd3-prepare-data") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(
            f"{path}: not a megatron_bd3 shard manifest (format must be {MANIFEST_FORMAT!r})"
        )
    if data.get("version") != MANIFEST_VERSION:
        raise ManifestError(
            f"{path}: manifest version {data.get('version')} is not {MANIFEST_VERSION}"
        )
    for key in ("seq_length", "dtype", "tokenizer", "splits"):
        _require(data, key, path)
    if data["dtype"] not in DTYPES:
        raise ManifestError(f"{path}: dtype {data['dtype']!r} is not one of {', '.join(DTYPES)}")
    manifest = Manifest(path=path, data=data)
    for name, split in manifest.splits.items():
        total = 0
        for record in _require(split, "shards", path):
            for key in ("file", "first_index", "sequences", "bytes", "sha256"):
                _require(record, key, path)
            if int(record["first_index"]) != total:
                raise ManifestError(
                    f"{path}: split {name!r} shard {record['file']} starts at sample "
                    f"{record['first_index']}, expected {total}"
                )
            expected = expected_shard_bytes(
                int(record["sequences"]), manifest.dtype, manifest.seq_length,
                manifest.document_starts,
            )
            if int(record["bytes"]) != expected:
                raise ManifestError(
                    f"{path}: split {name!r} shard {record['file']} records {record['bytes']} "
                    f"bytes, "
                    f"but {record['sequences']} samples of {manifest.seq_length} {manifest.dtype} "
                    f"take {expected}"
                )
            total += int(record["sequences"])
        if total != int(_require(split, "sequences", path)):
            raise ManifestError(
                f"{path}: split {name!r} says {split['sequences']} sequences but its shards "
                f"hold {total}"
            )
    return manifest


def write_manifest(directory: str | Path, data: dict[str, Any]) -> Path:
    """Write manifest.json atomically (temp file + rename); return its path."""
    path = Path(directory) / MANIFEST_FILE
    tmp = path.with_name(MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
