"""Documents -> fixed-length training sequences, and the train/validation/test split by document.

BD3-LM trains on sequences of exactly L tokens (the [x_t ; x_0] attention mask has a fixed size
2L): documents are concatenated with EOS after each one and the stream is cut into pieces, with no
padding (docs/method.md §1.2, §2.2). By default a sequence attends across the documents packed
into it, as in the reference's `wrap=True` data path:
  - `insert_eos=True`: EOS after every document (the reference's `insert_{train,valid}_eos`);
  - `insert_special=True`: every chunk of L-2 content tokens becomes BOS + chunk + EOS (the
    reference's `insert_{train,valid}_special`); off by default, as for the OWT models, which are
    trained without BOS/EOS at chunk boundaries so generation is not pushed to stop at L.
The tail of a split's stream that does not fill a whole sequence is dropped (as the reference
does) and its token count is reported, never silently lost.

Document boundaries: the packer knows where each document starts, so it also returns, per
sequence, document-start flags [L] (1 at the first token of every document that begins inside the
sequence). `bd3-prepare-data --document-boundaries` stores them with the tokens, and the loader
turns them into per-token document ids for document masking (`data.document_mask`,
docs/method.md §1.4). They never come from token values: an EOS id may also occur inside a
document's text, and without `insert_eos` there is no EOS at all. With `insert_special` the BOS
and EOS framing a sequence belong to its first and last document.
"""

from __future__ import annotations

import hashlib

import numpy as np

TRAIN = "train"
VALIDATION = "validation"
TEST = "test"
SPLITS = (TRAIN, VALIDATION, TEST)


def document_split(
    text: str, val_fraction: float, split_seed: int, test_fraction: float = 0.0
) -> str:
    """The split of a document: `validation` with probability `val_fraction`, `test` with
    probability `test_fraction`, `train` otherwise, by a keyed hash.

    The decision depends only on the document's text and the seed — not on its position, the
    input order or the number of worker processes — so it is reproducible, and identical copies of
    a document always land in the same split (no leakage between splits through duplicates). The
    hash value h in [0, 1) picks validation for h < val_fraction and test for the next
    test_fraction: a test split is carved out of train only, and the validation documents are the
    same with or without one.
    """
    if val_fraction <= 0.0 and test_fraction <= 0.0:
        return TRAIN
    if val_fraction >= 1.0:
        return VALIDATION
    digest = hashlib.blake2b(
        text.encode("utf-8"), digest_size=8, key=int(split_seed).to_bytes(8, "little")
    ).digest()
    value = int.from_bytes(digest, "little")
    if value < val_fraction * 2.0**64:
        return VALIDATION
    if value < (val_fraction + test_fraction) * 2.0**64:
        return TEST
    return TRAIN


def document_ids_from_starts(starts: np.ndarray) -> np.ndarray:
    """[..., L] document-start flags -> [..., L] int64 per-token document ids, 0 at the first
    token. A flag at position 0 changes nothing: the first token opens id 0 either way (a
    sequence may begin inside a document that started in an earlier one)."""
    ids = np.cumsum(starts, axis=-1, dtype=np.int64)
    return ids - ids[..., :1]


class SequencePacker:
    """Concatenate documents (EOS after each) and cut the stream into sequences of `seq_length`.

    Counters (for the manifest): `documents`, `document_tokens` (tokens entering the stream, EOS
    included), `sequences`, and after `finish()` the dropped tail `dropped_tail_tokens`.
    """

    def __init__(
        self,
        seq_length: int,
        *,
        bos_id: int,
        eos_id: int,
        insert_eos: bool = True,
        insert_special: bool = False,
        dtype: np.dtype | type = np.uint32,
    ) -> None:
        minimum = 3 if insert_special else 1
        if seq_length < minimum:
            raise ValueError(
                f"seq_length {seq_length} is too short: at least {minimum} "
                f"({'BOS + 1 token + EOS' if insert_special else '1 token'})"
            )
        self.seq_length = seq_length
        self.content_length = seq_length - 2 if insert_special else seq_length
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.insert_eos = insert_eos
        self.insert_special = insert_special
        self.dtype = np.dtype(dtype)
        self._pending: list[np.ndarray] = []
        self._pending_starts: list[np.ndarray] = []  # 0/1 flags, parallel to _pending
        self._pending_length = 0
        self._eos = np.array([eos_id], dtype=self.dtype)
        self.documents = 0
        self.document_tokens = 0
        self.sequences = 0
        self.dropped_tail_tokens = 0
        self._finished = False

    def add(self, tokens: np.ndarray) -> np.ndarray:
        """Add one document's tokens; return the sequences completed by it, [n, seq_length]."""
        return self.add_with_document_starts(tokens)[0]

    def add_with_document_starts(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add one document's tokens; return the sequences completed by it, [n, seq_length],
        and their document-start flags, uint8 [n, seq_length] (see the module docstring)."""
        if self._finished:
            raise RuntimeError("SequencePacker.add after finish()")
        tokens = np.asarray(tokens, dtype=self.dtype)
        added = len(tokens) + (1 if self.insert_eos else 0)
        self._pending.append(tokens)
        if self.insert_eos:
            self._pending.append(self._eos)
        starts = np.zeros(added, dtype=np.uint8)
        starts[:1] = 1  # an empty document without EOS adds no token and starts nothing
        self._pending_starts.append(starts)
        self.documents += 1
        self.document_tokens += added
        self._pending_length += added
        if self._pending_length < self.content_length:
            empty = np.empty((0, self.seq_length), dtype=self.dtype)
            return empty, np.empty((0, self.seq_length), dtype=np.uint8)
        stream = np.concatenate(self._pending)
        stream_starts = np.concatenate(self._pending_starts)
        count = len(stream) // self.content_length
        cut = count * self.content_length
        chunks = stream[:cut].reshape(count, self.content_length)  # [n, content_length]
        chunk_starts = stream_starts[:cut].reshape(count, self.content_length)
        rest = stream[cut:]
        self._pending = [rest] if len(rest) else []
        self._pending_starts = [stream_starts[cut:]] if len(rest) else []
        self._pending_length = len(rest)
        self.sequences += count
        if not self.insert_special:
            return chunks, chunk_starts
        out = np.empty((count, self.seq_length), dtype=self.dtype)  # [n, L] = BOS, chunk, EOS
        out[:, 0] = self.bos_id
        out[:, 1:-1] = chunks
        out[:, -1] = self.eos_id
        out_starts = np.zeros((count, self.seq_length), dtype=np.uint8)
        out_starts[:, 2:-1] = chunk_starts[:, 1:]  # BOS and the first content token: one document
        return out, out_starts

    def finish(self) -> int:
        """End of the stream: drop the incomplete tail and return its length in tokens."""
        self._finished = True
        self.dropped_tail_tokens = self._pending_length
        self._pending = []
        self._pending_starts = []
        self._pending_length = 0
        return self.dropped_tail_tokens
