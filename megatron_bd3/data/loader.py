"""The training/validation data loader: exact, resumable, layout-independent micro-batches.

Each rank builds a `BD3DataLoader` for its data-parallel rank and iterates micro-batches:

    {"tokens": LongTensor [b, L],               token ids of each sample
     "sample_index": LongTensor [b],            index of the sample in the split (its shard key)
     "global_batch_position": LongTensor [b],   position 0..G-1 of the sample in its global batch
     "document_ids": LongTensor [b, L]}         only with document_ids=True (data.document_mask):
                                                per-token document ids, 0 at each sample's first
                                                token, from the document starts the packer stored
                                                (packing.py); never from token values

Which samples a micro-batch holds is pure arithmetic on (seed, epoch, step) — see layout.py — and
samples are read by index from the tar shards (shards.ShardReader). Hence:
  - every sample is visited exactly once per epoch across all ranks (up to the documented
    remainder policy, whose count is logged), every rank yields the same number of micro-batches;
  - the loader's position is one integer (micro-batches consumed), `state_dict()` /
    `load_state_dict()` resume exactly — mid-epoch, across epoch boundaries, with any
    `num_workers` — and a global-batch-aligned state can even resume under another dp_size with
    the same global batch size;
  - `num_workers` DataLoader workers split the micro-batch sequence round-robin (worker w makes
    micro-batches w, w+n, ...), and torch's in-order collection restores the exact order.
Iterating is endless over epochs unless `max_epochs` is given; one live iterator at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_bd3.data.layout import BatchLayout
from megatron_bd3.data.manifest import load_manifest
from megatron_bd3.data.packing import document_ids_from_starts
from megatron_bd3.data.shards import ShardError, ShardReader
from megatron_bd3.lifetime import exit_with_parent_worker

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class LoaderStateError(ValueError):
    """The data cannot serve this run: its layout or a saved position does not fit the split."""


class _MicroBatchStream(IterableDataset):
    """Micro-batches start, start+1, ... (< stop) of one rank; split round-robin across workers."""

    def __init__(
        self,
        reader: ShardReader,
        layout: BatchLayout,
        dp_rank: int,
        start: int,
        stop: int | None,
        vocab_size: int,
        document_ids: bool = False,
    ) -> None:
        super().__init__()
        self.document_ids = document_ids
        self.reader = reader
        self.layout = layout
        self.dp_rank = dp_rank
        self.start = start
        self.stop = stop
        self.vocab_size = vocab_size

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        layout = self.layout
        global_batch = layout.global_batch_size
        order_epoch, order = -1, np.empty(0, dtype=np.int64)
        micro_step = self.start + worker
        while self.stop is None or micro_step < self.stop:
            epoch, step, microbatch = layout.locate(micro_step)
            if epoch != order_epoch:
                order_epoch, order = epoch, layout.epoch_order(epoch)
            positions = layout.positions(self.dp_rank, microbatch)  # [b]
            indices = order[step * global_batch + positions]  # [b]
            tokens, starts = self.reader.read_with_document_starts(indices)  # [b, L] each
            top = int(tokens.max())
            if top >= self.vocab_size:
                raise ShardError(
                    f"{self.reader.directory}: a sample among {indices.tolist()} holds token id "
                    f"{top} >= vocab_size {self.vocab_size}; the shard is corrupt or was written "
                    f"with another tokenizer"
                )
            # numpy, in the shard dtype: a worker's batch crosses the process boundary as a small
            # pickle (uint16 tokens are 4x smaller than int64), far cheaper than torch's shared-
            # memory tensors; the main process makes the LongTensors (_to_tensors).
            batch = {"tokens": tokens, "sample_index": indices, "global_batch_position": positions}
            if self.document_ids:
                batch["document_starts"] = starts  # uint8 [b, L]; ids made in _to_tensors
            yield batch
            micro_step += workers


def _unchanged(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """collate_fn of the worker DataLoader: keep numpy (see _MicroBatchStream.__iter__)."""
    return batch


def _to_tensors(batch: dict[str, np.ndarray], pin_memory: bool) -> dict[str, torch.Tensor]:
    out = {
        "tokens": torch.from_numpy(batch["tokens"].astype(np.int64)),  # [b, L]
        "sample_index": torch.from_numpy(np.asarray(batch["sample_index"], dtype=np.int64)),  # [b]
        "global_batch_position": torch.from_numpy(
            np.asarray(batch["global_batch_position"], dtype=np.int64)
        ),  # [b]
    }
    if "document_starts" in batch:
        out["document_ids"] = torch.from_numpy(document_ids_from_starts(batch["document_starts"]))
    if pin_memory:
        out = {key: value.pin_memory() for key, value in out.items()}
    return out


class BD3DataLoader:
    """Micro-batches of one split for one data-parallel rank (see the module docstring).

    Args:
        manifest_path_or_dir: manifest.json written by bd3-prepare-data, or its directory.
        split: "train" or "validation".
        micro_batch_size, num_microbatches, dp_size: global batch G = their product.
        dp_rank: this rank's index in 0..dp_size-1.
        seed: shuffle seed (>= 0); epoch e's order depends on (seed, e) only.
        num_workers: DataLoader worker processes (0 = read in this process).
        expected_tokenizer_fingerprint / expected_seq_length: refuse data written for another
            tokenizer / sequence length (ManifestError naming both values).
        shuffle: False visits samples in index order (e.g. a deterministic validation pass).
        remainder: "drop" or "wrap" when the split size is not a multiple of G (layout.py).
        document_ids: also yield per-token "document_ids" (data.document_mask); the data must
            have been prepared with --document-boundaries (ManifestError otherwise).
        max_epochs: stop after this many epochs (None: endless).
        verify: shard check at construction: "auto" | "sha256" | "size" | "none" (manifest.py).
        prefetch_factor, multiprocessing_context: passed to torch's DataLoader; pin_memory: pin
            the batch tensors (for CUDA hosts).
    """

    # its state is the same on every rank and loads into any layout at a global-batch boundary
    # (load_state_dict), which is how a checkpoint carries it across a layout change
    layout_rule = "replicated"

    def __init__(
        self,
        manifest_path_or_dir: str | Path,
        split: str,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        num_workers: int = 0,
        num_microbatches: int = 1,
        expected_tokenizer_fingerprint: str | None = None,
        expected_seq_length: int | None = None,
        *,
        shuffle: bool = True,
        remainder: str = "drop",
        max_epochs: int | None = None,
        verify: str = "auto",
        prefetch_factor: int = 4,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
        document_ids: bool = False,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers {num_workers} must be >= 0")
        if max_epochs is not None and max_epochs < 1:
            raise ValueError(f"max_epochs {max_epochs} must be >= 1 or None")
        self.manifest = load_manifest(manifest_path_or_dir)
        self.manifest.check(expected_tokenizer_fingerprint, expected_seq_length)
        if document_ids:
            self.manifest.require_document_starts()
        self.document_ids = document_ids
        split_info = self.manifest.split(split)
        self.verified = self.manifest.verify(split, verify)
        self.split = split
        self.dp_rank = dp_rank
        self.num_workers = num_workers
        self.max_epochs = max_epochs
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context
        self.reader = ShardReader(
            self.manifest.directory,
            split_info["shards"],
            self.manifest.seq_length,
            self.manifest.dtype,
            document_starts=self.manifest.document_starts,
        )
        try:
            self.layout = BatchLayout(
                num_samples=self.reader.num_samples,
                micro_batch_size=micro_batch_size,
                num_microbatches=num_microbatches,
                dp_size=dp_size,
                seed=seed,
                shuffle=shuffle,
                remainder=remainder,
            )
        except ValueError as exc:
            raise LoaderStateError(f"{self.manifest.path} split {split!r}: {exc}") from None
        self._micro_step = 0
        self._generation = 0
        layout = self.layout
        summary = (
            f"{self.manifest.path} split {split!r}: {layout.num_samples} samples of "
            f"{self.seq_length} tokens, global batch {layout.global_batch_size} "
            f"(micro {micro_batch_size} x microbatches {num_microbatches} x dp {dp_size}), "
            f"{layout.steps_per_epoch} steps/epoch"
        )
        if layout.samples_dropped_per_epoch:
            logger.warning(
                "%s; remainder 'drop': %d samples per epoch are not visited (a different "
                "set each epoch when shuffled)",
                summary,
                layout.samples_dropped_per_epoch,
            )
        elif layout.samples_repeated_per_epoch:
            logger.warning(
                "%s; remainder 'wrap': %d samples per epoch are visited twice",
                summary,
                layout.samples_repeated_per_epoch,
            )
        else:
            logger.info("%s; no remainder", summary)

    # ------------------------------------------------------------------ sizes
    @property
    def seq_length(self) -> int:
        return self.manifest.seq_length

    @property
    def num_samples(self) -> int:
        return self.layout.num_samples

    @property
    def global_batch_size(self) -> int:
        return self.layout.global_batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.layout.steps_per_epoch

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.layout.micro_batches_per_epoch

    @property
    def samples_dropped_per_epoch(self) -> int:
        return self.layout.samples_dropped_per_epoch

    @property
    def samples_repeated_per_epoch(self) -> int:
        return self.layout.samples_repeated_per_epoch

    @property
    def tokenizer_fingerprint(self) -> str:
        return str(self.manifest.tokenizer.get("fingerprint"))

    # ------------------------------------------------------------------ position
    @property
    def micro_step(self) -> int:
        """Micro-batches this rank has handed out since the start of training."""
        return self._micro_step

    @property
    def epoch(self) -> int:
        """Epoch of the next micro-batch."""
        return self.layout.locate(self._micro_step)[0]

    @property
    def global_step(self) -> int:
        """Global batches completed (an optimizer step's worth of micro-batches on every rank)."""
        return self._micro_step // self.layout.num_microbatches

    def _stop(self) -> int | None:
        return None if self.max_epochs is None else self.max_epochs * self.micro_batches_per_epoch

    def reset(self, epoch: int = 0) -> None:
        """Position the loader at the start of `epoch` (e.g. before each validation pass)."""
        self._micro_step = epoch * self.micro_batches_per_epoch
        self._generation += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._generation += 1
        return self._iterate(self._generation)

    def _iterate(self, generation: int) -> Iterator[dict[str, torch.Tensor]]:
        stop = self._stop()
        if stop is not None and self._micro_step >= stop:
            return
        stream = _MicroBatchStream(
            self.reader,
            self.layout,
            self.dp_rank,
            self._micro_step,
            stop,
            int(self.manifest.tokenizer["vocab_size"]),
            self.document_ids,
        )
        if self.num_workers == 0:
            source: Any = stream
        else:
            source = DataLoader(
                stream,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_unchanged,
                prefetch_factor=self.prefetch_factor,
                multiprocessing_context=self.multiprocessing_context,
                worker_init_fn=exit_with_parent_worker,  # no orphan outlives a killed rank
            )
        for batch in source:
            if generation != self._generation:
                raise RuntimeError(
                    "this BD3DataLoader iterator is stale: a newer iterator was created or the "
                    "loader was reset/reloaded; iterate with one iterator at a time"
                )
            epoch, step, microbatch = self.layout.locate(self._micro_step)
            if step == 0 and microbatch == 0:
                self._log_epoch_start(epoch)
            self._micro_step += 1  # counted as consumed the moment it is handed out
            yield _to_tensors(batch, self.pin_memory)

    def _log_epoch_start(self, epoch: int) -> None:
        layout = self.layout
        message = f"{self.split} epoch {epoch}: {layout.steps_per_epoch} global batches"
        if layout.samples_dropped_per_epoch:
            message += f", {layout.samples_dropped_per_epoch} samples left out (remainder 'drop')"
        if layout.samples_repeated_per_epoch:
            message += f", {layout.samples_repeated_per_epoch} samples repeated (remainder 'wrap')"
        logger.info(message)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The exact position plus what it is only meaningful with (identical on every rank)."""
        layout = self.layout
        epoch, step, microbatch = layout.locate(self._micro_step)
        return {
            "version": STATE_VERSION,
            "micro_step": self._micro_step,
            "epoch": epoch,
            "step_in_epoch": step,
            "microbatch": microbatch,
            "global_step": self.global_step,
            "split": self.split,
            "num_samples": layout.num_samples,
            "seed": layout.seed,
            "shuffle": layout.shuffle,
            "remainder": layout.remainder,
            "global_batch_size": layout.global_batch_size,
            "micro_batch_size": layout.micro_batch_size,
            "num_microbatches": layout.num_microbatches,
            "dp_size": layout.dp_size,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "seq_length": self.seq_length,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken.

        The data (split, size, tokenizer, L) and the sample order (seed, shuffle, remainder,
        global batch size) must match. The per-rank layout may differ (other dp_size /
        micro_batch_size / num_microbatches) only when `state` sits on a global-batch boundary.
        """
        if state.get("version") != STATE_VERSION:
            raise LoaderStateError(
                f"loader state version {state.get('version')} is not {STATE_VERSION}")
        layout = self.layout
        mine = {
            "split": self.split,
            "num_samples": layout.num_samples,
            "seed": layout.seed,
            "shuffle": layout.shuffle,
            "remainder": layout.remainder,
            "global_batch_size": layout.global_batch_size,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "seq_length": self.seq_length,
        }
        wrong = [
            f"{k} {state.get(k)!r} (this loader: {v!r})"
            for k, v in mine.items()
            if state.get(k) != v
        ]
        if wrong:
            raise LoaderStateError(
                "cannot resume: the saved loader state differs in " + "; ".join(wrong))
        same_layout = all(
            state.get(k) == getattr(layout, k)
            for k in ("micro_batch_size", "num_microbatches", "dp_size")
        )
        if same_layout:
            micro_step = int(state["micro_step"])
        elif int(state["microbatch"]) == 0:
            micro_step = int(state["global_step"]) * layout.num_microbatches
        else:
            raise LoaderStateError(
                f"cannot resume mid-global-batch (micro-batch {state['microbatch']} of "
                f"{state['num_microbatches']}) under a different layout (micro_batch_size/"
                f"num_microbatches/dp_size {state['micro_batch_size']}/{state['num_microbatches']}/"
                f"{state['dp_size']} -> {layout.micro_batch_size}/{layout.num_microbatches}/"
                f"{layout.dp_size}); save at a global-batch boundary"
            )
        self._micro_step = micro_step
        self._generation += 1
