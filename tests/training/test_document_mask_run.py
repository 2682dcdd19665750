"""The trainer with data.document_mask: document ids travel from the shards to every pipeline
stage, in training and in validation (the model refuses a forward without them)."""

from __future__ import annotations

import math

import pytest

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


@pytest.mark.distributed
def test_pipeline_run_with_document_mask_trains_and_validates(tmp_path):
    manifest = prepare_tiny_data(tmp_path, document_boundaries=True)
    run = tmp_path / "run"
    config = tiny_config(
        manifest, run, data={"document_mask": True, "document_position_reset": True},
        parallel={"pipeline_model_parallel_size": 2}, training={"train_iters": 2},
        checkpoint={"interval": 0},
        validation={"interval": 0, "at_end": True, "num_batches": 1,
                    "clip_search": {"enabled": False}},
    )
    run_trainer(write_config(tmp_path / "cfg.yaml", config), 2, "--resume", "none")
    losses = train_losses(run)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    (record,) = val_records(run)
    assert math.isfinite(record["val_nll"])
