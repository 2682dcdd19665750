"""Training metrics: a console line per interval and a tqdm bar on rank 0, JSON lines, wandb.

wandb defaults to offline mode (WANDB_MODE=offline unless the config says online); if wandb
cannot start (no network, no key) the run goes on without it and says so once. The JSON-lines
file `<run dir>/metrics.jsonl` records every logged step. A resume at step S first drops the
records of steps after S (the resumed run logs them again; see `drop_records_after`), then appends,
so every step appears once.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch


def memory_usage_gib(device_type: str) -> float:
    """Max allocated GPU memory, or current resident memory (RSS) of this process on CPU."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/statm") as handle:
            resident_pages = int(handle.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def format_line(metrics: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {metrics['step']:>6d}/{total_steps}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
        parts.append(f"ppl {metrics.get('ppl', math.nan):.2f}")
    parts.append(f"lr {metrics['lr']:.3e}")
    gn = metrics.get("grad_norm")
    parts.append("grad_norm n/a" if gn is None else f"grad_norm {gn:.3f}")
    parts.append(f"tok/s {metrics['tokens_per_s']:.3g}")
    parts.append(f"MFU {100 * metrics['mfu']:.2f}%")
    parts.append(f"mem {metrics['mem_gib']:.2f}GiB")
    if "clip" in metrics:
        parts.append(f"t~U[{metrics['clip'][0]:.3g},{metrics['clip'][1]:.3g}]")
    return " | ".join(parts)


class MetricsLogger:
    """Rank-0 sink for metrics; every method is a no-op on other ranks."""

    def __init__(
        self,
        *,
        rank: int,
        run_dir: Path,
        run_name: str,
        total_steps: int,
        start_step: int,
        show_tqdm: bool,
        wandb_mode: str,
        wandb_project: str,
        wandb_entity: str | None,
        config_dict: dict[str, Any],
        resumed_at: int | None = None,
    ) -> None:
        self.active = rank == 0
        self.total_steps = total_steps
        self._bar = None
        self._wandb = None
        self._jsonl = None
        if not self.active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        dropped = 0
        if resumed_at is not None:
            dropped = drop_records_after(run_dir / "metrics.jsonl", resumed_at)
        self._jsonl = open(run_dir / "metrics.jsonl", "a")
        if show_tqdm and total_steps > start_step:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=run_name,
                dynamic_ncols=True,
                file=sys.stderr,
                leave=False,
            )
        if wandb_mode != "disabled":
            self._wandb = self._start_wandb(
                run_dir, run_name, wandb_mode, wandb_project, wandb_entity, config_dict
            )
        if dropped:
            self.info(
                f"metrics.jsonl: dropped {dropped} record(s) after step {resumed_at}, the step "
                f"this run resumes from (they are logged again)"
            )

    @classmethod
    def from_config(
        cls, config, *, rank: int, start_step: int, resumed_at: int | None = None
    ) -> MetricsLogger:
        """The logger a run config describes (`logging` section; outputs in the run directory)."""
        log = config.logging
        return cls(
            rank=rank,
            run_dir=config.run_dir,
            run_name=log.run_name,
            total_steps=config.training.train_iters,
            start_step=start_step,
            show_tqdm=log.tqdm,
            wandb_mode=log.wandb.mode,
            wandb_project=log.wandb.project,
            wandb_entity=log.wandb.entity,
            config_dict=config.to_dict(),
            resumed_at=resumed_at,
        )

    def _start_wandb(self, run_dir, run_name, mode, project, entity, config_dict):
        os.environ.setdefault("WANDB_MODE", mode)
        if mode == "offline":
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb

            return wandb.init(
                project=project,
                entity=entity,
                name=run_name,
                mode=mode,
                dir=str(run_dir),
                config=config_dict,
                resume="allow",
                id=_wandb_id(run_dir),
            )
        except Exception as exc:  # no network/key: keep training, say it once
            self.info(f"wandb disabled ({type(exc).__name__}: {exc})")
            return None

    def info(self, message: str) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, metrics: dict[str, Any], *, console: bool = True) -> None:
        if not self.active:
            return
        record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in metrics.items()}
        record["time"] = time.time()
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if console and "tokens_per_s" in metrics:
            self.info(format_line(metrics, self.total_steps))
        if self._wandb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self._wandb.log(flat, step=int(metrics["step"]))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:  # never fail a finished run on logging
                pass


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite the JSON-lines file `path` without the records of steps after `step` (training and
    validation alike) and without lines that are not JSON (a write cut short by a kill); returns
    how many lines went. The new file replaces the old one atomically (a crash leaves either)."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) \
                and record["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as handle:
            handle.write("".join(line + "\n" for line in kept))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    return dropped


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id
