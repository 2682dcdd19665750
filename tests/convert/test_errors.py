"""Torn, corrupted and mismatched inputs are refused with a message naming the problem, and a
failed conversion writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_bd3.checkpoint import CheckpointError
from megatron_bd3.checkpoint.atomic import MARKER
from megatron_bd3.cli.convert import main as convert_main
from megatron_bd3.convert.trainer_checkpoint import (
    checkpoint_to_standalone,
    standalone_to_checkpoint,
)

pytestmark = pytest.mark.distributed  # uses the checkpoints trained by the 2-rank worker


@pytest.fixture
def step_copy(trained, tmp_path) -> Path:
    """A private copy of the TP=2 checkpoint (root with `latest`) to damage."""
    source = Path(trained["tp2"]["checkpoint"])
    root = tmp_path / "root"
    shutil.copytree(source, root / source.name)
    (root / "latest").write_text(source.name + "\n")
    return root / source.name


def test_checksum_mismatch_is_refused(step_copy, tmp_path):
    victim = max((step_copy / "ema").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    victim.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=f"checksum mismatch in ema/{victim.name}"):
        checkpoint_to_standalone(step_copy.parent, out)
    assert not out.exists()


def test_missing_marker_is_refused(step_copy, tmp_path):
    (step_copy / MARKER).unlink()
    with pytest.raises(CheckpointError, match="has no complete.json: the checkpoint is incomplete"):
        checkpoint_to_standalone(step_copy, tmp_path / "out")


def test_torn_save_directory_is_refused(step_copy, tmp_path):
    """What a crash mid-save leaves: a .tmp-step_* directory without the marker."""
    torn = step_copy.parent / f".tmp-{step_copy.name}"
    step_copy.rename(torn)
    (torn / MARKER).unlink()
    with pytest.raises(CheckpointError, match="incomplete .torn write"):
        checkpoint_to_standalone(torn, tmp_path / "out")


def test_missing_weight_file_is_refused(step_copy, tmp_path):
    next((step_copy / "model").glob("*.distcp")).unlink()
    with pytest.raises(CheckpointError, match=r"file model/__\d_\d\.distcp listed in complete.json "
                                              "is missing"):
        checkpoint_to_standalone(step_copy, tmp_path / "out", use_ema=False)


def test_root_without_latest_is_refused(step_copy, tmp_path):
    (step_copy.parent / "latest").unlink()
    with pytest.raises(CheckpointError, match="has step_\\* directories but no 'latest' pointer"):
        checkpoint_to_standalone(step_copy.parent, tmp_path / "out")


def test_checkpoint_that_does_not_match_its_recorded_model_is_refused(step_copy, tmp_path):
    marker = json.loads((step_copy / MARKER).read_text())
    marker["config"]["model"]["hidden_size"] = 32  # the weights are 64 wide
    (step_copy / MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="ema: cannot load into the model its run config "
                                              "describes: .*Global shape mismatch"):
        checkpoint_to_standalone(step_copy, tmp_path / "out")


def test_run_config_for_another_network_is_refused(trained, tmp_path):
    record = trained["pp2"]
    ours = tmp_path / "ours"
    checkpoint_to_standalone(record["run_dir"], ours)
    with pytest.raises(ValueError, match=r"num_layers: weights 2 != the run config .* 4"):
        standalone_to_checkpoint(ours, tmp_path / "ckpt", record["config"],
                                 ["model.num_layers=4"])
    assert not (tmp_path / "ckpt").exists()
    # the CLI says the same and exits 2
    assert convert_main(["--standalone", str(ours), "--to", "checkpoint", "--config",
                         str(record["config"]), "--output", str(tmp_path / "ckpt"),
                         "model.hidden_size=32"]) == 2


def test_extra_or_missing_standalone_tensor_is_named(trained, tmp_path, capsys):
    ours = tmp_path / "ours"
    checkpoint_to_standalone(trained["pp2"]["run_dir"], ours)
    tensors = load_file(str(ours / "model.safetensors"))
    tensors["layers.0.attn.out.bias"] = torch.zeros(64)
    del tensors["final_norm.bias"]
    save_file(tensors, str(ours / "model.safetensors"))
    assert convert_main(["--standalone", str(ours), "--to", "reference",
                         "--output", str(tmp_path / "ref")]) == 2
    err = capsys.readouterr().err
    assert "missing tensor(s) final_norm.bias" in err
    assert "unexpected tensor(s) layers.0.attn.out.bias" in err
    assert not (tmp_path / "ref").exists()


def test_parity_failure_writes_nothing(trained, tmp_path, capsys):
    """The check can fail: a bound below the fp32 summation-order differences is exceeded."""
    out = tmp_path / "out"
    assert convert_main(["--checkpoint", str(trained["pp2"]["run_dir"]), "--to", "standalone",
                         "--output", str(out), "--tolerance", "1e-12"]) == 1
    assert "parity megatron checkpoint (TP=1 load) vs standalone: max abs diff" in (
        capsys.readouterr().err)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.converting-*"))


def test_cli_refuses_bad_combinations_and_non_empty_outputs(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        convert_main(["--reference", str(tmp_path), "--to", "checkpoint", "--output", "x"])
    assert info.value.code == 2
    assert "--reference converts to standalone or hf, not --to checkpoint" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    assert convert_main(["--checkpoint", str(trained["pp2"]["run_dir"]), "--to", "standalone",
                         "--output", str(busy)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "user data"
