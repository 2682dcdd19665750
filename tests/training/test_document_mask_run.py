"""data.document_mask end to end: document ids travel from the shards to every pipeline stage in
training and validation, and bd3-eval evaluates the checkpoint with them (the model refuses a
forward without document ids, so a path that dropped them would fail). One run serves both (the
evaluation half is here rather than in tests/evaluation to train once)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_bd3.cli.eval import main as eval_main
from megatron_bd3.data.corpus import default_corpus_path
from megatron_bd3.data.writer import PrepareOptions, prepare_shards
from megatron_bd3.training.config import ConfigError, load_config
from megatron_bd3.training.model_config import build_model_config
from tests.training.tiny_run import (
    prepare_tiny_data,
    run_trainer,
    tiny_config,
    train_losses,
    val_records,
    write_config,
)


def test_data_keys_reach_the_model_config_and_reset_needs_the_mask():
    config = load_config(data={"model": {"seq_length": 16, "block_size": 4},
                               "data": {"document_mask": True, "document_position_reset": True}})
    model_config = build_model_config(config, vocab_size=300, mask_token_id=4, precision="fp32")
    assert model_config.document_mask and model_config.document_position_reset
    assert not build_model_config(load_config(data={"model": {"seq_length": 16, "block_size": 4}}),
                                  vocab_size=300, mask_token_id=4, precision="fp32").document_mask
    with pytest.raises(ConfigError, match="data.document_position_reset needs data.document_mask"):
        load_config(data={"data": {"document_position_reset": True}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step PP = 2 run with document masking and position reset, validated at the end."""
    base = tmp_path_factory.mktemp("document_mask")
    manifest = prepare_tiny_data(base, document_boundaries=True)
    run = base / "run"
    config = tiny_config(
        manifest, run, data={"document_mask": True, "document_position_reset": True},
        parallel={"pipeline_model_parallel_size": 2}, training={"train_iters": 2},
        checkpoint={"interval": 0},
        validation={"interval": 0, "at_end": True, "num_batches": 1,
                    "clip_search": {"enabled": False}},
    )
    run_trainer(write_config(base / "cfg.yaml", config), 2, "--resume", "none")
    return base, manifest.parent, run


@pytest.mark.distributed
def test_pipeline_run_with_document_mask_trains_and_validates(trained):
    _, _, run = trained
    losses = train_losses(run)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    (record,) = val_records(run)
    assert math.isfinite(record["val_nll"])


@pytest.mark.distributed
def test_checkpoint_is_evaluated_with_document_ids(trained, tmp_path):
    _, data, run = trained
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(default_corpus_path().read_text().splitlines()[:12]) + "\n")
    args = ["--nelbo-samples", "1", "--batch-size", "8", "--no-progress", "--no-plots",
            "--raw-weights"]
    ckpt = str(run / "ckpt")
    assert eval_main([ckpt, "--data", str(data), *args, "--output", str(tmp_path / "a")]) == 0
    assert eval_main([ckpt, "--data", f"few={text}", "--text-mode", "line", *args,
                      "--output", str(tmp_path / "b")]) == 0
    for name in ("a", "b"):
        row = json.loads((tmp_path / name / "eval.json").read_text())["likelihood"][0]
        assert math.isfinite(row["nll"]) and row["sequences"] > 0


@pytest.mark.distributed
def test_eval_refuses_shards_without_boundaries_in_one_line(trained, tmp_path, capsys):
    base, _, run = trained
    plain = tmp_path / "plain"
    prepare_shards(["default"], base / "tok", plain, PrepareOptions(seq_length=32, progress=False))
    assert eval_main([str(run / "ckpt"), "--data", str(plain), "--raw-weights"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bd3-eval:"), lines
    assert "--document-boundaries" in lines[0]


@pytest.mark.distributed
def test_context_parallel_run_with_document_mask_matches_the_pipeline_run(trained, tmp_path):
    """The same run at CP = 2 (document ids [b, L] on both CP ranks, each rank's masks and RoPE
    positions at its global positions): the losses and validation NLL of the PP = 2 run above;
    both checkpoints convert to standalone networks (parity-checked) with the same weights."""
    from megatron_bd3.convert.trainer_checkpoint import checkpoint_to_standalone
    from megatron_bd3.standalone.model import BD3Network

    base, data, run = trained
    cp_run = base / "cp2"
    config = tiny_config(
        data / "manifest.json", cp_run,
        data={"document_mask": True, "document_position_reset": True},
        parallel={"context_parallel_size": 2}, training={"train_iters": 2},
        checkpoint={"interval": 0},
        # one validation batch of 4 sequences: at PP = 2 it was 2 micro-batches of 2
        validation={"interval": 0, "at_end": True, "num_batches": 1, "micro_batch_size": 4,
                    "clip_search": {"enabled": False}},
    )
    run_trainer(write_config(base / "cfg_cp2.yaml", config), 2, "--resume", "none")
    losses, reference = train_losses(cp_run), train_losses(run)
    assert sorted(losses) == sorted(reference) == [1, 2]
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    (record,), (expected,) = val_records(cp_run), val_records(run)
    assert record["val_nll"] == pytest.approx(expected["val_nll"], rel=1e-5)

    networks = {}
    for name, directory in (("pp2", run), ("cp2", cp_run)):
        result = checkpoint_to_standalone(directory / "ckpt", tmp_path / name, use_ema=False)
        assert result.parity and all(report.ok for report in result.parity)
        networks[name] = BD3Network.from_pretrained(tmp_path / name).state_dict()
    assert networks["cp2"].keys() == networks["pp2"].keys()
    for key, value in networks["cp2"].items():
        torch.testing.assert_close(value, networks["pp2"][key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.distributed
def test_context_parallel_evaluation_with_document_ids(trained, tmp_path):
    """bd3-eval --context-parallel-size 2 of the document-masked checkpoint: the bound of one
    process (the same document ids, noise and sequences)."""
    from tests.dist_launcher import REPO_ROOT, run_distributed

    _, data, run = trained
    args = [str(run / "ckpt"), "--data", str(data), "--nelbo-samples", "1", "--batch-size", "8",
            "--no-progress", "--no-plots", "--raw-weights"]
    assert eval_main([*args, "--output", str(tmp_path / "one")]) == 0
    run_distributed(REPO_ROOT / "megatron_bd3" / "cli" / "eval.py", 2, *args,
                    "--context-parallel-size", "2", "--output", str(tmp_path / "cp2"))
    one, cp2 = (json.loads((tmp_path / name / "eval.json").read_text())["likelihood"][0]
                for name in ("one", "cp2"))
    assert cp2["tokens"] == one["tokens"] and cp2["sequences"] == one["sequences"] > 0
    assert cp2["nll"] == pytest.approx(one["nll"], rel=1e-5)
