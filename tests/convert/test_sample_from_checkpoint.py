"""bd3-sample --checkpoint: one command from a trainer checkpoint to samples, equal to
bd3-convert followed by bd3-sample on the converted directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_bd3.cli.convert import main as convert_main
from megatron_bd3.cli.sample import main as sample_main
from tests.convert.test_checkpoint_conversion import assert_same_files

SAMPLE_ARGS = ["--num-samples", "3", "--batch-size", "2", "--length", "36", "--seed", "5",
               "--quiet"]


def _records(path: Path) -> list[dict]:
    """The JSONL records without their wall-clock field."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        del record["seconds"]
    return records


@pytest.mark.distributed  # uses the checkpoints trained by the 2-rank worker
@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_checkpoint_samples_equal_convert_then_sample(trained, tmp_path, weights):
    run_dir = str(trained["pp2"]["run_dir"])
    raw = ["--raw-weights"] if weights == "raw" else []
    converted, kept = tmp_path / "converted", tmp_path / "kept"
    assert convert_main(["--checkpoint", run_dir, "--to", "standalone",
                         "--output", str(converted), *raw]) == 0
    assert sample_main([str(converted), *SAMPLE_ARGS, "--output", str(tmp_path / "two.jsonl")]) == 0
    assert sample_main(["--checkpoint", run_dir, *raw, "--save-standalone", str(kept),
                        *SAMPLE_ARGS, "--output", str(tmp_path / "one.jsonl")]) == 0
    two_step, one_step = _records(tmp_path / "two.jsonl"), _records(tmp_path / "one.jsonl")
    assert one_step == two_step
    assert len(one_step) == 3 and all(r["num_tokens"] == 36 for r in one_step)
    assert all(isinstance(r["text"], str) for r in one_step)  # the run's tokenizer came along
    assert_same_files(kept, converted)  # EMA or raw as asked, exactly what bd3-convert writes

    # without --save-standalone the conversion goes to a temporary directory: same samples
    assert sample_main(["--checkpoint", run_dir, *raw, *SAMPLE_ARGS,
                        "--output", str(tmp_path / "tmp.jsonl")]) == 0
    assert _records(tmp_path / "tmp.jsonl") == two_step


def test_exactly_one_model_input(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with pytest.raises(SystemExit) as info:
        sample_main(["--quiet"])
    assert info.value.code == 2
    assert "give a standalone MODEL_DIR or --checkpoint RUN_OR_CKPT_DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        sample_main([str(model_dir), "--checkpoint", str(tmp_path), "--quiet"])
    assert info.value.code == 2
    assert (f"give either MODEL_DIR ({model_dir}) or --checkpoint ({tmp_path}), not both"
            in capsys.readouterr().err)
    for flag in (["--raw-weights"], ["--save-standalone", str(tmp_path / "keep")],
                 ["--parity-tolerance", "1e-3"]):
        with pytest.raises(SystemExit):
            sample_main([str(model_dir), *flag])
        assert f"{flag[0]} only applies to --checkpoint" in capsys.readouterr().err


def test_missing_or_invalid_checkpoint_is_named(tmp_path, capsys):
    absent = tmp_path / "no_such_run"
    with pytest.raises(SystemExit) as info:
        sample_main(["--checkpoint", str(absent), "--quiet"])
    assert info.value.code == 2
    assert f"--checkpoint {absent} does not exist" in capsys.readouterr().err
    # an existing directory that is not a checkpoint: the converter's own error, with the path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as info:
        sample_main(["--checkpoint", str(empty), "--quiet"])
    assert info.value.code == 2
    assert f"--checkpoint {empty}: {empty} is not a checkpoint" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit):
        sample_main(["--checkpoint", str(empty), "--save-standalone", str(busy), "--quiet"])
    assert f"--save-standalone {busy} exists and is not an empty directory" in (
        capsys.readouterr().err)
    assert (busy / "keep.txt").read_text() == "user data"


@pytest.mark.distributed  # uses the checkpoints trained by the 2-rank worker
def test_failed_parity_check_samples_nothing(trained, tmp_path, capsys):
    """The check runs: a bound below the fp32 summation-order differences fails it (exit 1)."""
    out, kept = tmp_path / "samples.jsonl", tmp_path / "kept"
    with pytest.raises(SystemExit) as info:
        sample_main(["--checkpoint", str(trained["pp2"]["run_dir"]), "--parity-tolerance",
                     "1e-12", "--save-standalone", str(kept), "--quiet", "--output", str(out)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "parity megatron checkpoint (TP=1 load) vs standalone: max abs diff" in err
    assert "not sampling" in err
    assert not out.exists() and not kept.exists()
