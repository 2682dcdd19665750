"""megatron_bd3.paths: one rule for every path a run names (docs/training.md, "Paths")."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from megatron_bd3.paths import SHIPPED_CONFIGS, resolve_path, shipped_config_names
from megatron_bd3.training.config import ConfigError, load_config


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "text, key, shipped",
    [
        ("tiny_cpu.yaml", "config", "tiny_cpu.yaml"),
        ("tiny_cpu", "config", "tiny_cpu.yaml"),
        ("configs/tiny_cpu.yaml", "config", "tiny_cpu.yaml"),  # the checkout-era spelling
        ("owt_bd3_b16.yaml", "base", "owt_bd3_b16.yaml"),
        ("deepspeed/zero1.json", "deepspeed.config", "deepspeed/zero1.json"),
        ("configs/deepspeed/zero2.json", "deepspeed.config", "deepspeed/zero2.json"),
        ("zero3_offload", "deepspeed.config", "deepspeed/zero3_offload.json"),
    ],
)
def test_a_config_path_missing_here_names_a_shipped_config(in_tmp, text, key, shipped):
    assert resolve_path(text, key) == SHIPPED_CONFIGS / shipped


def test_a_file_in_the_current_directory_wins_over_the_shipped_one(in_tmp):
    (in_tmp / "tiny_cpu.yaml").write_text("training: {train_iters: 7}\n")
    (in_tmp / "deepspeed").mkdir()
    (in_tmp / "deepspeed" / "zero1.json").write_text("{}")
    assert resolve_path("tiny_cpu.yaml", "config").resolve() == in_tmp / "tiny_cpu.yaml"
    assert resolve_path("deepspeed/zero1.json", "deepspeed.config").resolve() == (
        in_tmp / "deepspeed" / "zero1.json"
    )
    assert load_config("tiny_cpu.yaml").training.train_iters == 7
    assert load_config("tiny_cpu").training.train_iters == 300  # no file named tiny_cpu here


def test_base_resolves_next_to_the_including_file_then_among_the_shipped(in_tmp):
    sub = in_tmp / "sub"
    sub.mkdir()
    (sub / "mine.yaml").write_text("base: owt_bd3_b16.yaml\nmodel: {block_size: 8}\n")
    cfg = load_config(sub / "mine.yaml")
    assert (cfg.model.block_size, cfg.model.seq_length) == (8, 1024)  # shipped base underneath
    (sub / "owt_bd3_b16.yaml").write_text("model: {seq_length: 64, block_size: 4}\n")
    cfg = load_config(sub / "mine.yaml")
    assert (cfg.model.block_size, cfg.model.seq_length) == (8, 64)  # the neighbour wins


def test_data_and_output_paths_never_fall_back_to_the_package(in_tmp):
    # a file of that name exists among the shipped configs, but data is never looked up there
    with pytest.raises(ConfigError) as excinfo:
        resolve_path("tiny_cpu.yaml", "data.manifest")
    message = str(excinfo.value)
    assert message.startswith("data.manifest: tiny_cpu.yaml does not exist; tried ")
    assert str(in_tmp / "tiny_cpu.yaml") in message and "never looked up" in message
    assert resolve_path("runs/out", "logging.output_dir") == Path("runs/out")  # need not exist
    assert not (in_tmp / "runs").exists()


def test_a_path_found_nowhere_names_the_key_and_every_place_tried(in_tmp):
    with pytest.raises(ConfigError) as excinfo:
        resolve_path("deepspeed/zero9.json", "deepspeed.config")
    message = str(excinfo.value)
    assert message.startswith("deepspeed.config: deepspeed/zero9.json does not exist; tried ")
    assert str(in_tmp / "deepspeed" / "zero9.json") in message
    assert str(SHIPPED_CONFIGS / "deepspeed" / "zero9.json") in message
    assert "deepspeed/zero1.json" in message and "tiny_cpu.yaml" not in message
    (in_tmp / "c.yaml").write_text(textwrap.dedent("base: nowhere.yaml\n"))
    with pytest.raises(ConfigError, match=r"c.yaml: base: nowhere.yaml does not exist; tried "):
        load_config("c.yaml")


def test_every_shipped_name_resolves_from_an_empty_directory(in_tmp):
    names = shipped_config_names()
    assert "tiny_cpu.yaml" in names and "deepspeed/zero1.json" in names
    for name in names:
        key = "deepspeed.config" if name.startswith("deepspeed/") else "config"
        assert resolve_path(name, key).is_file()
