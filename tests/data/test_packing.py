"""EOS insertion, wrapping into L-token sequences (reference semantics), the split by document."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_bd3.data.packing import TRAIN, VALIDATION, SequencePacker, document_split

BOS, EOS = 1, 2


def reference_wrap(documents, seq_length, insert_eos, insert_special):
    """The reference's wrapping written out plainly: concatenate (EOS after each document), cut
    into chunks of L (or L-2 framed by BOS/EOS), drop the incomplete tail."""
    stream: list[int] = []
    for doc in documents:
        stream.extend(doc)
        if insert_eos:
            stream.append(EOS)
    size = seq_length - 2 if insert_special else seq_length
    sequences = []
    for start in range(0, len(stream) - size + 1, size):
        chunk = stream[start : start + size]
        sequences.append([BOS, *chunk, EOS] if insert_special else chunk)
    return sequences, len(stream) - len(sequences) * size


@pytest.mark.parametrize("insert_eos", [True, False])
@pytest.mark.parametrize("insert_special", [False, True])
@pytest.mark.parametrize("seq_length", [3, 8, 33])
def test_packer_matches_the_reference_wrapping(insert_eos, insert_special, seq_length):
    rng = np.random.default_rng(seq_length)
    documents = [list(rng.integers(5, 100, size=rng.integers(0, 40))) for _ in range(60)]
    packer = SequencePacker(
        seq_length, bos_id=BOS, eos_id=EOS, insert_eos=insert_eos, insert_special=insert_special
    )
    produced = [row.tolist() for doc in documents for row in packer.add(np.array(doc))]
    dropped = packer.finish()
    expected, expected_dropped = reference_wrap(documents, seq_length, insert_eos, insert_special)
    assert produced == expected
    assert dropped == expected_dropped == packer.dropped_tail_tokens
    assert packer.sequences == len(expected) and packer.documents == 60
    assert packer.document_tokens == sum(len(d) for d in documents) + (60 if insert_eos else 0)


def test_packer_rejects_impossible_lengths():
    with pytest.raises(ValueError, match="seq_length 2 is too short"):
        SequencePacker(2, bos_id=BOS, eos_id=EOS, insert_special=True)
    packer = SequencePacker(4, bos_id=BOS, eos_id=EOS)
    packer.finish()
    with pytest.raises(RuntimeError):
        packer.add(np.array([5]))


def test_document_split_is_a_keyed_hash_of_the_text():
    docs = [f"document number {i} with some text" for i in range(4000)]
    splits = [document_split(d, 0.1, 0) for d in docs]
    share = splits.count(VALIDATION) / len(docs)
    assert 0.08 < share < 0.12  # binomial(4000, 0.1): sd 0.005
    assert splits == [document_split(d, 0.1, 0) for d in reversed(docs)][::-1]  # order-free
    other_seed = [document_split(d, 0.1, 1) for d in docs]
    assert other_seed != splits
    # A larger fraction only moves documents into validation (thresholded hash).
    larger = [document_split(d, 0.3, 0) for d in docs]
    assert all(b == VALIDATION for a, b in zip(splits, larger, strict=True) if a == VALIDATION)
    assert document_split("x", 0.0, 0) == TRAIN
