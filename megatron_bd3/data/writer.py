"""Text -> token shards: the library side of `bd3-prepare-data`.

Pipeline: documents are read in input order (sources.py), tokenized in worker processes in
batches whose results are consumed in submission order (so the output never depends on the number
of workers or on scheduling), assigned to train/validation/test by a keyed hash of their text
(packing.document_split), packed per split into sequences of exactly L tokens
(packing.SequencePacker) and written as deterministic webdataset tar shards (shards.py), then the
manifest is written last (manifest.py). Same inputs + tokenizer + options => byte-identical shards
and manifest.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_bd3.data.manifest import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    write_manifest,
)
from megatron_bd3.data.packing import (
    SPLITS,
    TEST,
    TRAIN,
    VALIDATION,
    SequencePacker,
    document_split,
)
from megatron_bd3.data.shards import (
    KEY_DIGITS,
    SAMPLE_EXTENSION,
    TarShardWriter,
    choose_dtype,
)
from megatron_bd3.data.sources import (
    InputError,
    InputRecord,
    SourceOptions,
    expand_inputs,
    iter_all_documents,
    total_skips,
)
from megatron_bd3.data.tokenizer import BD3Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareOptions:
    """Options of `prepare_shards` (the CLI flags of bd3-prepare-data, one to one)."""

    seq_length: int
    samples_per_shard: int = 4096
    val_fraction: float = 0.05
    split_seed: int = 0
    test_fraction: float = 0.0
    insert_eos: bool = True
    insert_special: bool = False
    document_boundaries: bool = False  # store document-start flags (data.document_mask)
    dtype: str = "auto"
    workers: int = 1
    source: SourceOptions = field(default_factory=SourceOptions)
    documents_per_task: int = 64
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction {self.val_fraction} must be in [0, 1)")
        if not 0.0 <= self.test_fraction < 1.0 - self.val_fraction:
            raise ValueError(
                f"test_fraction {self.test_fraction} must be in [0, 1 - val_fraction) = "
                f"[0, {1.0 - self.val_fraction:g}): the train split needs documents"
            )
        if self.split_seed < 0:
            raise ValueError(f"split_seed {self.split_seed} must be >= 0")
        if self.workers < 1:
            raise ValueError(f"workers {self.workers} must be >= 1")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard {self.samples_per_shard} must be >= 1")
        minimum = 3 if self.insert_special else 1
        if self.seq_length < minimum:
            raise ValueError(f"seq_length {self.seq_length} must be at least {minimum}")

    def recorded(self) -> dict[str, Any]:
        """The options that determine the output (workers and progress do not)."""
        return {
            "samples_per_shard": self.samples_per_shard,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "split_seed": self.split_seed,
            "insert_eos": self.insert_eos,
            "insert_special": self.insert_special,
            "source": asdict(self.source),
        }


# ------------------------------------------------------------------ tokenization workers
_WORKER_TOKENIZER: BD3Tokenizer | None = None


def _init_worker(tokenizer_path: str, in_pool: bool = False) -> None:
    global _WORKER_TOKENIZER
    if in_pool:
        # One process per core already: HF tokenizers' own thread pool would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path)


def _tokenize_batch(
    texts: list[str], val_fraction: float, split_seed: int, test_fraction: float
) -> list[tuple[str, np.ndarray]]:
    """(split, token ids as uint32) per document, in order."""
    assert _WORKER_TOKENIZER is not None
    encoded = _WORKER_TOKENIZER.encode_batch(texts)
    return [
        (
            document_split(text, val_fraction, split_seed, test_fraction),
            np.asarray(ids, dtype=np.uint32),
        )
        for text, ids in zip(texts, encoded, strict=True)
    ]


def _batches(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for document in documents:
        batch.append(document)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenized(
    batches: Iterable[list[str]], tokenizer_path: str, options: PrepareOptions
) -> Iterator[list[tuple[str, np.ndarray]]]:
    """Tokenize batches, in parallel when workers > 1, yielding results in submission order."""
    args = (options.val_fraction, options.split_seed, options.test_fraction)
    if options.workers == 1:
        _init_worker(tokenizer_path)
        for batch in batches:
            yield _tokenize_batch(batch, *args)
        return
    method = "fork" if sys.platform.startswith("linux") else None
    context = multiprocessing.get_context(method)
    pool = context.Pool(options.workers, initializer=_init_worker, initargs=(tokenizer_path, True))
    with pool:
        pending: deque = deque()
        for batch in batches:  # bounded look-ahead keeps memory flat on large inputs
            pending.append(pool.apply_async(_tokenize_batch, (batch, *args)))
            if len(pending) >= 4 * options.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ------------------------------------------------------------------ output directory
def _prepare_output(output_dir: Path, overwrite: bool) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    ours = [output_dir / MANIFEST_FILE]
    for split in SPLITS:
        ours += sorted(output_dir.glob(f"{split}-*.tar")) + sorted(
            output_dir.glob(f"{split}-*.tar.tmp")
        )
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds prepared data ({existing[0].name}, ...); pass --overwrite "
            f"to replace it or choose another --output"
        )
    for path in existing:  # only files this tool writes, never the directory itself
        path.unlink()


# ------------------------------------------------------------------ entry point
def prepare_shards(
    inputs: Sequence[str],
    tokenizer_path: str | Path,
    output_dir: str | Path,
    options: PrepareOptions,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize `inputs` (paths, globs or "default") into shards under `output_dir`.

    Returns the manifest (also written to `output_dir/manifest.json`). Raises InputError for bad
    inputs, FileExistsError for an occupied output directory without `overwrite`.
    """
    from tqdm import tqdm

    output_dir = Path(output_dir)
    paths = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = choose_dtype(tokenizer.vocab_size, options.dtype)
    _prepare_output(output_dir, overwrite)

    packers = {
        split: SequencePacker(
            options.seq_length,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
            insert_eos=options.insert_eos,
            insert_special=options.insert_special,
        )
        for split in SPLITS
    }
    writers = {
        split: TarShardWriter(
            output_dir, split, options.seq_length, dtype, options.samples_per_shard,
            document_starts=options.document_boundaries,
        )
        for split in SPLITS
    }
    unk_tokens = dict.fromkeys(SPLITS, 0)
    records: list[InputRecord] = []
    documents = iter_all_documents(paths, options.source, records)
    progress = tqdm(unit="doc", desc="tokenizing", disable=not options.progress, dynamic_ncols=True)
    try:
        batches = _batches(documents, options.documents_per_task)
        for results in _tokenized(batches, str(tokenizer_path), options):
            for split, ids in results:
                if tokenizer.unk_id is not None:
                    unk_tokens[split] += int(np.count_nonzero(ids == tokenizer.unk_id))
                sequences, starts = packers[split].add_with_document_starts(ids)
                if len(sequences):
                    writers[split].write(
                        sequences, starts if options.document_boundaries else None
                    )
            progress.update(len(results))
            progress.set_postfix(
                sequences=sum(w.num_samples for w in writers.values()), refresh=False
            )
        for split in SPLITS:
            packers[split].finish()
            writers[split].close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        progress.close()

    splits: dict[str, Any] = {}
    warnings: list[str] = []
    for split in SPLITS:
        packer, writer = packers[split], writers[split]
        if (split == VALIDATION and options.val_fraction == 0.0) or (
            split == TEST and options.test_fraction == 0.0
        ):
            continue
        splits[split] = {
            "documents": packer.documents,
            "document_tokens": packer.document_tokens,
            "sequences": writer.num_samples,
            "tokens": writer.num_samples * options.seq_length,
            "dropped_tail_tokens": packer.dropped_tail_tokens,
            "unk_tokens": unk_tokens[split],
            "shards": writer.records,
        }
        if packer.dropped_tail_tokens:
            logger.info(
                "%s: dropped the last %d tokens (less than one sequence of %d)",
                split,
                packer.dropped_tail_tokens,
                options.seq_length,
            )
        if unk_tokens[split]:
            warnings.append(
                f"{split}: {unk_tokens[split]} tokens are <unk> (the tokenizer does not "
                f"cover some characters; enable byte fallback when training it)"
            )
    if splits[TRAIN]["sequences"] == 0:
        for writer in writers.values():
            writer.abort()
        raise InputError(
            f"the train split has {packers[TRAIN].document_tokens} tokens, fewer than one sequence "
            f"of seq_length {options.seq_length}; give more text or a smaller --seq-length"
        )
    for split, flag in ((VALIDATION, "--val-fraction"), (TEST, "--test-fraction")):
        if split in splits and splits[split]["sequences"] == 0:
            warnings.append(
                f"{split}: {packers[split].documents} documents, "
                f"{packers[split].document_tokens} tokens: fewer than one sequence of "
                f"{options.seq_length}; raise {flag} for a usable {split} split"
            )
    for warning in warnings:
        logger.warning(warning)

    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "seq_length": options.seq_length,
        "dtype": dtype,
        "sample": {"key_digits": KEY_DIGITS, "extension": SAMPLE_EXTENSION, "byte_order": "little"},
        "tokenizer": tokenizer.describe(),
        "options": options.recorded(),
        "inputs": [record.as_dict() for record in records],
        "skipped": total_skips(records).as_dict(),
        "splits": splits,
        "warnings": warnings,
    }
    if options.document_boundaries:
        manifest["document_starts"] = True
    write_manifest(output_dir, manifest)
    return manifest
