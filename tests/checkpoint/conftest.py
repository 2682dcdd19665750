"""A trained 2-process run (DP=2, ZeRO-2, dropout on) shared by the checkpoint tests."""

import pytest

from megatron_bd3.paths import shipped_config
from tests.training.tiny_run import prepare_tiny_data, run_trainer, tiny_config, write_config

TRAIN_ITERS, INTERVAL = 8, 4


def resume_config(manifest, run_dir, **overrides):
    sections = {
        "model": {"dropout": 0.1},
        "training": {"train_iters": TRAIN_ITERS},
        "checkpoint": {"interval": INTERVAL},
        "deepspeed": {"config": str(shipped_config("deepspeed/zero2.json"))},
    }
    for key, value in overrides.items():
        sections.setdefault(key, {}).update(value)
    return tiny_config(manifest, run_dir, **sections)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(base dir, manifest, run dir) of an uninterrupted 8-step run with checkpoints at 4 and 8."""
    base = tmp_path_factory.mktemp("ckpt")
    manifest = prepare_tiny_data(base)
    run_dir = base / "uninterrupted"
    config = write_config(run_dir / "cfg.yaml", resume_config(manifest, run_dir))
    run_trainer(config, 2, "--resume", "none")
    return base, manifest, run_dir
