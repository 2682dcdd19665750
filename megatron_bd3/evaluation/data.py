"""Evaluation sets: shard manifests, or raw files tokenized with the model's tokenizer.

`--data [NAME=]PATH[@SPLIT]`:
- PATH is a `bd3-prepare-data` output (its directory or manifest.json): the split (default
  `validation`) is read from its shards. The manifest's tokenizer fingerprint and sequence length
  must be the model's (else one clear error), and its shards are verified.
- anything else is one or more input files (globs; text / jsonl / parquet, read by the same
  readers and options as `bd3-prepare-data`), tokenized with the model's tokenizer and wrapped to
  the model's L as the reference does for zero-shot evaluation: documents concatenated with EOS
  after each, cut into L-token sequences, no BOS/EOS inserted at sequence edges, the incomplete
  tail dropped and counted.

Every set reports its documents, tokens, sequences and what was dropped or skipped.

A model trained with document masking (data.document_mask) is evaluated with it: the set is then
opened with `document_ids=True` and also gives per-token document ids — from the shards'
document starts (data prepared with --document-boundaries; refused otherwise), or from the
packer's own boundaries for raw files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_bd3.evaluation.source import EvalInputError


@dataclass
class EvalDataset:
    """A fixed, ordered set of L-token sequences, read by index."""

    name: str
    source: str
    seq_length: int
    num_sequences: int
    stats: dict[str, Any] = field(default_factory=dict)
    _read: Callable[[np.ndarray], np.ndarray] | None = None
    _read_document_ids: Callable[[np.ndarray], np.ndarray] | None = None

    def read(self, indices) -> np.ndarray:
        """Sequences `indices` as an int64 array [n, L]."""
        return np.asarray(self._read(np.asarray(indices, dtype=np.int64)), dtype=np.int64)

    @property
    def has_document_ids(self) -> bool:
        """Whether the set was opened with document ids (for a document-masked model)."""
        return self._read_document_ids is not None

    def read_document_ids(self, indices) -> np.ndarray:
        """Per-token document ids of sequences `indices`, int64 [n, L]."""
        if self._read_document_ids is None:
            raise ValueError(f"evaluation set {self.name} was opened without document ids")
        ids = self._read_document_ids(np.asarray(indices, dtype=np.int64))
        return np.asarray(ids, dtype=np.int64)


def parse_data_argument(text: str) -> tuple[str, str, str | None]:
    """`[NAME=]PATH[@SPLIT]` -> (name, path, split or None)."""
    name, sep, rest = text.partition("=")
    if not sep:
        name, rest = "", text
    path, at, split = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if not path:
        raise EvalInputError(f"--data {text!r}: no path (expected [NAME=]PATH[@SPLIT])")
    if not name:
        stem = Path(path.rstrip("/")).name
        name = Path(path).parent.name if stem == "manifest.json" else stem
    return name, path, split or None


def _manifest_path(path: str) -> Path | None:
    candidate = Path(path)
    if candidate.is_dir() and (candidate / "manifest.json").is_file():
        return candidate / "manifest.json"
    if candidate.name == "manifest.json":
        return candidate
    return None


def open_dataset(
    text: str,
    *,
    seq_length: int,
    tokenizer,
    tokenizer_fingerprint: str | None,
    source_options=None,
    document_ids: bool = False,
) -> EvalDataset:
    """The set `--data text` names (see the module docstring); EvalInputError on bad input.
    `document_ids`: the set also gives per-token document ids (a document-masked model)."""
    name, path, split = parse_data_argument(text)
    manifest = _manifest_path(path)
    if manifest is not None:
        return _manifest_dataset(name, manifest, split or "validation", seq_length,
                                 tokenizer_fingerprint, document_ids)
    if split is not None:
        raise EvalInputError(f"--data {text!r}: @{split} applies to a bd3-prepare-data directory "
                             f"or manifest.json; {path} is not one")
    return _text_dataset(name, path, seq_length, tokenizer, source_options, document_ids)


def _manifest_dataset(name: str, path: Path, split: str, seq_length: int,
                      fingerprint: str | None, document_ids: bool = False) -> EvalDataset:
    from megatron_bd3.data.manifest import ManifestError, load_manifest
    from megatron_bd3.data.shards import ShardError, ShardReader

    try:
        manifest = load_manifest(path)
        manifest.check(fingerprint, seq_length)
        if document_ids:
            manifest.require_document_starts()
        info = manifest.split(split)
        manifest.verify(split)
        reader = ShardReader(manifest.directory, info["shards"], manifest.seq_length,
                             manifest.dtype, document_starts=manifest.document_starts)
    except (ManifestError, ShardError, OSError, ValueError) as error:
        raise EvalInputError(f"--data {name}: {error}") from None
    stats = {key: info.get(key) for key in ("documents", "tokens", "sequences",
                                              "dropped_tail_tokens") if key in info}
    stats["split"] = split
    return EvalDataset(name, f"{path} split {split!r}", manifest.seq_length, reader.num_samples,
                       stats, reader.read, reader.read_document_ids if document_ids else None)


def _text_dataset(name: str, pattern: str, seq_length: int, tokenizer,
                  source_options, document_ids: bool = False) -> EvalDataset:
    from megatron_bd3.data.packing import SequencePacker, document_ids_from_starts
    from megatron_bd3.data.sources import (
        InputError,
        SourceOptions,
        expand_inputs,
        iter_all_documents,
        total_skips,
    )

    if tokenizer is None:
        raise EvalInputError(f"--data {name}: raw files need the model's tokenizer, and none was "
                             "found with the model; pass --tokenizer")
    options = source_options or SourceOptions()
    try:
        paths = expand_inputs([pattern])
    except (InputError, OSError, ValueError) as error:
        raise EvalInputError(f"--data {name}: {error}") from None
    packer = SequencePacker(seq_length, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                            insert_eos=True, insert_special=False, dtype=np.int64)
    records: list = []
    sequences, starts = [], []
    try:
        for document in iter_all_documents(paths, options, records):
            ids = np.asarray(tokenizer.encode(document), dtype=np.int64)
            packed, packed_starts = packer.add_with_document_starts(ids)
            sequences.append(packed)
            starts.append(packed_starts)
    except (InputError, OSError, ValueError) as error:
        raise EvalInputError(f"--data {name}: {error}") from None
    packer.finish()
    tokens = np.concatenate(sequences) if sequences else np.empty((0, seq_length), np.int64)
    documents = (document_ids_from_starts(np.concatenate(starts)) if sequences
                 else np.empty((0, seq_length), np.int64))
    stats = {"documents": packer.documents, "tokens": packer.document_tokens,
             "sequences": int(len(tokens)), "dropped_tail_tokens": packer.dropped_tail_tokens,
             "skipped": total_skips(records).as_dict(), "files": [r.path for r in records]}
    if len(tokens) == 0:
        raise EvalInputError(
            f"--data {name}: {packer.document_tokens} tokens in {packer.documents} documents do "
            f"not fill one sequence of L = {seq_length} tokens")
    return EvalDataset(name, f"{pattern} (tokenized, wrapped to L = {seq_length})", seq_length,
                       len(tokens), stats, lambda indices: tokens[indices],
                       (lambda indices: documents[indices]) if document_ids else None)
