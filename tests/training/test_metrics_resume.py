"""A resume at step S drops metrics.jsonl's records after S before appending: each step once."""

import json

from megatron_bd3.training.logging import MetricsLogger, drop_records_after


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def test_drop_records_after_keeps_steps_up_to_the_resume_and_other_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": float(s)} for s in range(1, 7)]
    records.insert(4, {"step": 4, "val_nll": 1.0})
    records.append({"step": 6, "val_nll": 0.9})
    write_lines(path, [json.dumps(r) for r in records] + ['{"step": 7, "lo'])  # torn last line
    assert drop_records_after(path, 4) == 4  # steps 5, 6, the validation at 6, the torn line
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == records[:5]
    assert drop_records_after(path, 4) == 0  # nothing more to drop
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    assert drop_records_after(tmp_path / "absent.jsonl", 3) == 0


def make_logger(tmp_path, resumed_at, rank=0):
    return MetricsLogger(
        rank=rank, run_dir=tmp_path / "run", run_name="t", total_steps=10, start_step=3,
        show_tqdm=False, wandb_mode="disabled", wandb_project="p", wandb_entity=None,
        config_dict={}, resumed_at=resumed_at,
    )


def test_resumed_logger_rewrites_then_appends(tmp_path, capsys):
    path = tmp_path / "run" / "metrics.jsonl"
    write_lines(path, [json.dumps({"step": s, "val_nll": 1.0}) for s in range(1, 6)])
    make_logger(tmp_path, None).close()  # not a resume: untouched
    assert len(path.read_text().splitlines()) == 5
    make_logger(tmp_path, 3, rank=1).close()  # other ranks never touch the file
    assert len(path.read_text().splitlines()) == 5

    logger = make_logger(tmp_path, 3)
    logger.log({"step": 4, "val_nll": 2.0})
    logger.close()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert "metrics.jsonl: dropped 2 record(s) after step 3" in capsys.readouterr().out
