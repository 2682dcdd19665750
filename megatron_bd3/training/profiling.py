"""Optional torch.profiler window over training steps (`logging.profile_steps: [start, end]`).

The Megatron-LM `--profile --profile-step-start/--profile-step-end` equivalent: steps
start..end-1 (1-based step numbers, as logged) run under torch.profiler with CPU and, on a GPU,
CUDA activities. Each rank writes `<run dir>/profile/rank_XXXXX.json` (a Chrome / Perfetto trace)
and `rank_XXXXX.txt` (the ops with the most self time); rank 0 also logs the first lines.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger("megatron_bd3.train")

TOP_OPS = 25


class StepProfiler:
    """Call `before_step(step)` before and `after_step(step)` after each training step."""

    def __init__(self, window: Sequence[int] | None, out_dir: Path, rank: int,
                 device_type: str) -> None:
        if window is not None:
            if len(window) != 2:
                raise ValueError(f"logging.profile_steps {list(window)} must be [start, end]")
            start, end = window
            if not 1 <= start < end:
                raise ValueError(f"logging.profile_steps {list(window)} must be [start, end] "
                                 f"with 1 <= start < end (steps start..end-1 are profiled)")
        self.window = tuple(window) if window is not None else None
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.device_type = device_type
        self._profiler = None

    def before_step(self, step: int) -> None:
        """`step` = the number the coming step will be logged with."""
        if self.window is None or self._profiler is not None or step != self.window[0]:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device_type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._profiler = profile(activities=activities, record_shapes=False)
        self._profiler.__enter__()

    def after_step(self, step: int) -> None:
        """`step` = the number of the step that just finished."""
        if self._profiler is None or step < self.window[1] - 1:
            return
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        name = f"rank_{self.rank:05d}"
        profiler.export_chrome_trace(str(self.out_dir / f"{name}.json"))
        key = "self_cuda_time_total" if self.device_type == "cuda" else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=key, row_limit=TOP_OPS,
                                              max_name_column_width=60)
        (self.out_dir / f"{name}.txt").write_text(
            f"steps {self.window[0]}..{self.window[1] - 1}, sorted by {key}\n{table}\n")
        if self.rank == 0:
            logger.info("profile of steps %d..%d written to %s\n%s", self.window[0],
                        self.window[1] - 1, self.out_dir,
                        "\n".join(table.splitlines()[: 3 + 12]))
