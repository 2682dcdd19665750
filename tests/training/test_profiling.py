"""logging.profile_steps: a torch.profiler window over real training steps."""

import json

import pytest

from megatron_bd3.training.profiling import StepProfiler
from tests.training.tiny_run import prepare_tiny_data, run_trainer, tiny_config, write_config


@pytest.mark.distributed
def test_profile_window_writes_trace_and_table(tmp_path):
    manifest = prepare_tiny_data(tmp_path)
    run_dir = tmp_path / "run"
    config = tiny_config(manifest, run_dir, logging={"profile_steps": [2, 4]},
                         checkpoint={"interval": 0, "save_final": False})
    out = run_trainer(write_config(run_dir / "cfg.yaml", config), 1, "--resume", "none")
    profile = run_dir / "run" / "profile"
    table = (profile / "rank_00000.txt").read_text()
    assert table.startswith("steps 2..3, sorted by self_cpu_time_total")
    assert "aten::" in table and "mm" in table  # the layers' matmuls were recorded
    trace = json.loads((profile / "rank_00000.json").read_text())
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])
    assert "profile of steps 2..3 written to" in out


@pytest.mark.parametrize("window", [(0, 3), (3, 3), (5, 2), [2], [1, 2, 3]])
def test_profile_window_is_validated(tmp_path, window):
    with pytest.raises(ValueError, match="profile_steps"):
        StepProfiler(window, tmp_path, 0, "cpu")


def test_no_window_profiles_nothing(tmp_path):
    profiler = StepProfiler(None, tmp_path / "p", 0, "cpu")
    for step in range(1, 4):
        profiler.before_step(step)
        profiler.after_step(step)
    assert not (tmp_path / "p").exists()
