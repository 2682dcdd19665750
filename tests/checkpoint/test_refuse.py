"""Torn, corrupted or mismatched checkpoints are refused with a clear message, nothing loaded."""

import json
import shutil

import pytest
import torch

from megatron_bd3.checkpoint import CheckpointError, load_model_weights, verify_checkpoint
from megatron_bd3.checkpoint.manager import (
    check_compatible,
    check_resumable,
    layout_change,
    refuse_unresumable,
)
from tests.checkpoint.conftest import TRAIN_ITERS, resume_config
from tests.training.tiny_run import run_trainer, write_config


def copy_checkpoint(trained_run, tmp_path):
    _, _, run_dir = trained_run
    source = run_dir / "ckpt" / f"step_{TRAIN_ITERS:08d}"
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def test_real_checkpoint_verifies_and_records_layout_and_model(trained_run, tmp_path):
    ckpt = copy_checkpoint(trained_run, tmp_path)
    marker = verify_checkpoint(ckpt)
    assert marker["step"] == TRAIN_ITERS
    assert marker["layout"]["dp"] == 2 and marker["layout"]["zero_stage"] == 2
    assert marker["model"]["block_size"] == 4 and marker["model"]["seq_length"] == 32
    assert marker["layout_independent"] and marker["has_ema"]
    assert any(name.startswith("optimizer/state/") for name in marker["files"])  # DeepSpeed
    assert any(name.startswith("model/") for name in marker["files"])
    assert any(name.startswith("reshardable/") for name in marker["files"])
    assert marker["reshardable"] == {"components": ["ema"],
                                     "optimizer_keys": ["exp_avg", "exp_avg_sq", "fp32_param"]}
    assert "ranks/rank_00001.pt" in marker["files"]


def test_torn_and_corrupted_checkpoints_are_refused(trained_run, tmp_path):
    ckpt = copy_checkpoint(trained_run, tmp_path)
    rank_file = ckpt / "ranks" / "rank_00000.pt"
    data = bytearray(rank_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rank_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch in ranks/rank_00000.pt"):
        check_resumable(ckpt, {})
    (ckpt / "complete.json").unlink()
    with pytest.raises(CheckpointError, match="no complete.json: the checkpoint is incomplete"):
        check_resumable(ckpt, {})


def test_mismatched_model_or_layout_is_refused(trained_run, tmp_path):
    ckpt = copy_checkpoint(trained_run, tmp_path)
    marker = json.loads((ckpt / "complete.json").read_text())
    record = {"model": dict(marker["model"]), "layout": dict(marker["layout"])}
    check_compatible(marker, record, ckpt)  # identical: accepted

    for key, value in (("vocab_size", 1024), ("seq_length", 64), ("block_size", 8)):
        wrong = {"model": {**record["model"], key: value}, "layout": record["layout"]}
        with pytest.raises(CheckpointError, match=f"{key}: checkpoint .* != run {value}"):
            check_compatible(marker, wrong, ckpt)
    # another layout is an elastic resume (test_elastic_resume.py) ...
    other = {"model": record["model"], "layout": {**record["layout"], "dp": 1, "tp": 2}}
    check_compatible(marker, other, ckpt)
    assert layout_change(marker, other) == "TP 1 PP 1 DP 2 ZeRO-2 -> TP 2 PP 1 DP 1 ZeRO-2"
    assert layout_change(marker, record) is None
    # ... only with the layout-independent optimizer state, and never onto another backend
    without = {**marker, "reshardable": None}
    with pytest.raises(CheckpointError, match=r"layout differs from this run \(tp: checkpoint 1 "
                                              r"!= run 2; dp: checkpoint 2 != run 1\)\. This "
                                              r"checkpoint has no layout-independent optimizer "
                                              r"state.*checkpoint.init_from="):
        check_compatible(without, other, ckpt)
    backend = {"model": record["model"],
               "layout": {**record["layout"], "optimizer_backend": "megatron"}}
    with pytest.raises(CheckpointError, match="optimizer_backend: checkpoint 'deepspeed' != run "
                                              "'megatron'"):
        check_compatible(marker, backend, ckpt)

    # weights-only loading checks the tensor shapes' config before touching any model
    other = {"model": {**record["model"], "hidden_size": 64}}
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 32 != run 64"):
        load_model_weights(ckpt, [], record=other)



def test_components_the_run_does_not_have_are_refused_by_name(trained_run, tmp_path):
    """The saved rank files hold one entry per component; a run with EMA off cannot resume a
    checkpoint with EMA (and the reverse), and the message names the difference."""
    from megatron_bd3.checkpoint import load_training_state

    ckpt = copy_checkpoint(trained_run, tmp_path)
    marker = json.loads((ckpt / "complete.json").read_text())
    saved = torch.load(ckpt / "ranks" / "rank_00000.pt", weights_only=False)
    assert sorted(saved) == ["clip_range", "ema", "loader", "rng", "trainer"]
    assert saved["trainer"]["step"] == TRAIN_ITERS
    without_ema = {name: object() for name in ("trainer", "clip_range", "loader", "rng")}
    with pytest.raises(CheckpointError, match=r"missing in the checkpoint: \[\]; not in this "
                                              r"run: \['ema'\]"):
        load_training_state(ckpt, stepper=None, components=without_ema, record={},
                            marker=marker)
    extra = {**without_ema, "ema": object(), "other": object()}
    with pytest.raises(CheckpointError, match=r"missing in the checkpoint: \['other'\]"):
        load_training_state(ckpt, stepper=None, components=extra, record={}, marker=marker)


def test_megatron_optimizer_checkpoints_are_not_resumed(tmp_path):
    """A checkpoint written with optimizer.backend=megatron is refused for resume (its optimizer
    state is not restored exactly by megatron-core 0.16 without apex/TE), naming init_from."""
    marker = {"layout": {"optimizer_backend": "megatron", "tp": 1, "pp": 1, "dp": 1}}
    with pytest.raises(CheckpointError, match=r"optimizer.backend=megatron is not supported.*"
                                              r"checkpoint.init_from="):
        refuse_unresumable(marker, tmp_path)
    refuse_unresumable({"layout": {"optimizer_backend": "deepspeed"}}, tmp_path)  # accepted

@pytest.mark.distributed
def test_trainer_refuses_to_resume_with_another_block_size(trained_run, tmp_path):
    base, manifest, run_dir = trained_run
    ckpt = run_dir / "ckpt" / f"step_{TRAIN_ITERS:08d}"
    config = resume_config(
        manifest,
        tmp_path / "run",
        model={"block_size": 8},
        training={"train_iters": TRAIN_ITERS + 2},
    )
    path = write_config(tmp_path / "cfg.yaml", config)
    with pytest.raises(AssertionError) as excinfo:
        run_trainer(path, 2, "--resume", str(ckpt))
    message = str(excinfo.value)
    assert "model differs from this run" in message
    assert "block_size: checkpoint 4 != run 8" in message
