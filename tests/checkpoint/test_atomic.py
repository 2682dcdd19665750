"""Atomic checkpoint directories: marker, checksums, `latest`, torn/corrupt checkpoints refused."""

import json

import pytest

from megatron_bd3.checkpoint.atomic import (
    MARKER,
    CheckpointError,
    begin_save,
    finish_save,
    list_checkpoints,
    prune,
    read_latest,
    verify_checkpoint,
)


def save(root, step, payload=b"weights"):
    tmp = begin_save(root, step)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "a.bin").write_bytes(payload)
    (tmp / "b.txt").write_text(f"step {step}")
    return finish_save(root, tmp, step, {"layout": {"tp": 1}, "model": {"vocab_size": 7}})


def test_save_writes_marker_with_checksums_and_moves_latest(tmp_path):
    first = save(tmp_path, 10)
    assert first.name == "step_00000010" and read_latest(tmp_path) == first
    marker = verify_checkpoint(first)
    assert marker["step"] == 10 and set(marker["files"]) == {"sub/a.bin", "b.txt"}
    assert marker["model"] == {"vocab_size": 7}
    second = save(tmp_path, 20)
    assert read_latest(tmp_path) == second
    assert not list(tmp_path.glob(".tmp-*"))


def test_torn_checkpoint_without_marker_is_refused(tmp_path):
    ckpt = save(tmp_path, 5)
    (ckpt / MARKER).unlink()
    with pytest.raises(CheckpointError, match="has no complete.json: the checkpoint is incomplete"):
        verify_checkpoint(ckpt)


def test_corrupted_or_truncated_files_are_refused(tmp_path):
    ckpt = save(tmp_path, 5)
    (ckpt / "sub" / "a.bin").write_bytes(b"weightz")  # same size, different bytes
    with pytest.raises(CheckpointError, match="checksum mismatch in sub/a.bin"):
        verify_checkpoint(ckpt)
    (ckpt / "sub" / "a.bin").write_bytes(b"w")
    with pytest.raises(CheckpointError, match="has 1 bytes"):
        verify_checkpoint(ckpt)
    (ckpt / "b.txt").unlink()
    with pytest.raises(CheckpointError, match="b.txt listed in complete.json is missing"):
        verify_checkpoint(ckpt)


def test_interrupted_save_leaves_previous_latest_and_is_cleaned_up(tmp_path):
    good = save(tmp_path, 1)
    tmp = begin_save(tmp_path, 2)  # a save that dies before finish_save
    (tmp / "half.bin").write_bytes(b"x")
    assert read_latest(tmp_path) == good
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    save(tmp_path, 3)
    assert not tmp.exists()  # stale temporary directories are removed by the next save


def test_latest_pointer_errors_and_pruning(tmp_path):
    assert read_latest(tmp_path) is None
    for step in (1, 2, 3, 4):
        save(tmp_path, step)
    prune(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="not a step_XXXXXXXX name"):
        read_latest(tmp_path)
    (tmp_path / "latest").unlink()
    with pytest.raises(CheckpointError, match="no 'latest' pointer"):
        read_latest(tmp_path)
    marker = json.loads((tmp_path / "step_00000004" / MARKER).read_text())
    assert marker["format"] == 1
