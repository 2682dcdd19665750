"""checkpoint.resume=auto skips a torn or corrupt newest checkpoint, resumes from the newest intact
one, and refuses (naming every checkpoint) when none is intact; an explicit directory that is not
intact is refused. A real resume after the fallback logs every step once in metrics.jsonl."""

import json
import shutil

import pytest

from megatron_bd3.checkpoint import CheckpointError
from megatron_bd3.checkpoint.manager import select_resume
from tests.checkpoint.conftest import INTERVAL, TRAIN_ITERS, resume_config
from tests.training.tiny_run import read_metrics, run_trainer, train_losses, write_config


def copy_run(trained_run, tmp_path):
    """A copy of the shared 8-step run (checkpoints at 4 and 8, metrics); never the original."""
    _, _, run_dir = trained_run
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def record_of(checkpoint):
    marker = json.loads((checkpoint / "complete.json").read_text())
    return {"model": marker["model"], "layout": marker["layout"]}


def test_auto_skips_a_corrupt_newest_checkpoint(trained_run, tmp_path):
    ckpt = copy_run(trained_run, tmp_path) / "ckpt"
    newest, older = ckpt / f"step_{TRAIN_ITERS:08d}", ckpt / f"step_{INTERVAL:08d}"
    record = record_of(newest)
    assert select_resume(ckpt, "auto", record)[::2] == (newest, [])  # intact: the newest

    flip_a_byte(newest / "ranks" / "rank_00001.pt")
    directory, marker, skipped = select_resume(ckpt, "auto", record)
    assert directory == older and marker["step"] == INTERVAL
    assert len(skipped) == 1 and f"{newest}: checksum mismatch in ranks/rank_00001.pt" in skipped[0]
    # explicitly named, the corrupt checkpoint is refused
    with pytest.raises(CheckpointError, match="checksum mismatch in ranks/rank_00001.pt"):
        select_resume(ckpt, str(newest), record)


def test_auto_refuses_when_no_checkpoint_is_intact(trained_run, tmp_path):
    ckpt = copy_run(trained_run, tmp_path) / "ckpt"
    newest, older = ckpt / f"step_{TRAIN_ITERS:08d}", ckpt / f"step_{INTERVAL:08d}"
    record = record_of(newest)
    files = sorted((newest / "model").rglob("*"))
    shard = next(p for p in files if p.is_file() and p.stat().st_size)
    with open(shard, "r+b") as handle:  # truncated: a torn write
        handle.truncate(shard.stat().st_size // 2)
    (older / "complete.json").unlink()  # torn before its marker
    with pytest.raises(CheckpointError) as excinfo:
        select_resume(ckpt, "auto", record)
    message = str(excinfo.value)
    assert "none of the 2 checkpoint(s)" in message and "refusing to start from scratch" in message
    assert f"{newest}: file {shard.relative_to(newest)} has" in message
    assert f"{older} has no complete.json" in message
    assert select_resume(tmp_path / "empty", "auto", record) == (None, None, [])  # a new run


def test_a_mismatch_is_refused_not_skipped(trained_run, tmp_path):
    ckpt = copy_run(trained_run, tmp_path) / "ckpt"
    record = record_of(ckpt / f"step_{TRAIN_ITERS:08d}")
    record["model"] = {**record["model"], "block_size": 8}
    with pytest.raises(CheckpointError, match="block_size: checkpoint 4 != run 8"):
        select_resume(ckpt, "auto", record)


@pytest.mark.distributed
def test_trainer_falls_back_and_logs_every_step_once(trained_run, tmp_path):
    """Two processes: the newest checkpoint (step 8) is corrupt, `--resume auto` resumes from step
    4, says what it skipped, and trains to step 8 again: the losses equal the uninterrupted run's
    and metrics.jsonl (copied with steps 1-8 already in it) holds every step once."""
    _, manifest, uninterrupted = trained_run
    run_dir = copy_run(trained_run, tmp_path)
    newest = run_dir / "ckpt" / f"step_{TRAIN_ITERS:08d}"
    flip_a_byte(newest / "ranks" / "rank_00000.pt")
    config = write_config(tmp_path / "cfg.yaml", resume_config(manifest, run_dir))
    out = run_trainer(config, 2, "--resume", "auto")
    assert "checkpoint.resume=auto skips a checkpoint that is not intact" in out
    assert f"{newest}: checksum mismatch in ranks/rank_00000.pt" in out
    assert f"resumed from {run_dir / 'ckpt' / f'step_{INTERVAL:08d}'} at step {INTERVAL}" in out
    assert "metrics.jsonl: dropped" in out

    records = read_metrics(run_dir)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, TRAIN_ITERS + 1))
    assert [r["step"] for r in records if "val_nll" in r] == [TRAIN_ITERS]
    expected, got = train_losses(uninterrupted), train_losses(run_dir)
    for step in range(1, TRAIN_ITERS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step
