"""Metrics logging: JSON lines + console line; wandb offline by default and never fatal."""

import json

from megatron_bd3.training.logging import MetricsLogger, format_line


def make_logger(tmp_path, mode, rank=0):
    return MetricsLogger(
        rank=rank,
        run_dir=tmp_path / "run",
        run_name="t",
        total_steps=10,
        start_step=0,
        show_tqdm=False,
        wandb_mode=mode,
        wandb_project="p",
        wandb_entity=None,
        config_dict={"a": 1},
    )


def test_offline_wandb_and_jsonl(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = make_logger(tmp_path, "offline")
    metrics = {
        "step": 1,
        "loss": 2.0,
        "ppl": 7.389,
        "lr": 1e-3,
        "grad_norm": None,
        "tokens_per_s": 100.0,
        "mfu": 0.25,
        "mem_gib": 0.5,
        "clip": (0.45, 0.95),
    }
    logger.log(metrics)
    logger.close()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == 2.0 and records[0]["clip"] == [0.45, 0.95]
    out = capsys.readouterr().out
    assert "step      1/10 | loss 2.0000 | ppl 7.39 | lr 1.000e-03 | grad_norm n/a" in out
    assert "MFU 25.00%" in out and "t~U[0.45,0.95]" in out
    assert list((tmp_path / "run").glob("wandb/offline-run-*")), "wandb offline run not written"


def test_online_wandb_without_credentials_does_not_stop_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "10")
    logger = make_logger(tmp_path, "online")
    logger.log({"step": 1, "val_nll": 1.0})
    logger.close()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("val_nll") == 1


def test_other_ranks_log_nothing(tmp_path):
    logger = make_logger(tmp_path, "offline", rank=1)
    logger.log({"step": 1, "val_nll": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_format_line_without_loss():
    line = format_line(
        {"step": 3, "lr": 0.0, "grad_norm": 1.5, "tokens_per_s": 5.0, "mfu": 0.0, "mem_gib": 1.0}, 9
    )
    assert line.startswith("step      3/9 | lr 0.000e+00 | grad_norm 1.500")
