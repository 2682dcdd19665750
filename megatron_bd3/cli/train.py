"""bd3-train: train a BD3-LM (or the AR / MDLM baselines) from a YAML run config.

    bd3-train tiny_cpu                                                # a shipped config
    bd3-train my_run.yaml                                             # a file of yours
    torchrun --nproc-per-node 2 -m megatron_bd3.cli.train tiny_cpu    # 2 processes
    launch/torchrun.sh tiny_cpu training.train_iters=200 optimizer.lr=1e-3
    bd3-train tiny_cpu --resume auto                                  # continue the latest run

Positional `section.key=value` arguments override the YAML (type-checked). `--resume` is a
shortcut for checkpoint.resume (auto: the run's newest intact checkpoint if any, skipping torn or
corrupt ones; none: start fresh; or a checkpoint directory). Relative paths, on the command line
and in the YAML, are taken from the current directory; a config path found nowhere there is looked
up among the shipped configs
(megatron_bd3.paths). From Python: `megatron_bd3.cli.train.train(config)` returns a summary dict.
See docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_bd3.lifetime import (
    children_exit_with_this_process,
    exit_with_parent,
    launched_by_agent,
)
from megatron_bd3.training.config import ConfigError, RunConfig, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bd3-train",
        description="Train a BD3-LM with megatron-core + DeepSpeed from a YAML config.",
        epilog="Overrides: section.key=value, e.g. training.train_iters=200 optimizer.lr=3e-4. "
        "See docs/training.md.",
    )
    parser.add_argument(
        "config",
        help="run config YAML: a path, or a shipped config by name (tiny_cpu, owt_bd3_b4.yaml)",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument(
        "--resume",
        metavar="auto|none|DIR",
        help="checkpoint.resume: auto (default), none, or a checkpoint directory",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="stop after N steps in this invocation (a checkpoint is written)",
    )
    parser.add_argument(
        "--summary-json", metavar="PATH", help="write the final summary as JSON here (rank 0)"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    # the deepspeed launcher passes --local_rank; the rank comes from the environment anyway
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def train(
    config: RunConfig | str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train from a RunConfig or a YAML path (+ overrides); returns the trainer's summary."""
    from megatron_bd3.training.trainer import train as run_training

    if not isinstance(config, RunConfig):
        config = load_config(config, list(overrides))
    elif overrides:
        raise ValueError("pass overrides together with a YAML path, not with a RunConfig")
    return run_training(config, stop_after=stop_after)


def _quiet_known_warnings() -> None:
    """Silence import-time notices that say nothing about this run (apex/TE absent is expected on
    CPU and reported once by the trainer's kernel line)."""
    import warnings

    for message in (
        ".*Transformer Engine and Apex are not installed.*",
        ".*Apex is not installed.*",
        ".*full scope is deprecated.*",
        ".*all_gather_into_tensor.*is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=message)


def is_run_input_error(exc: BaseException) -> bool:
    """Whether `exc` says what is wrong with the run's inputs -- config, checkpoint, data shards,
    manifest, tokenizer, a data layout or saved data position that does not fit -- in its
    message, so one line is the whole report (exit 2). Anything else is a bug and keeps its
    traceback."""
    from megatron_bd3.checkpoint import CheckpointError
    from megatron_bd3.data.loader import LoaderStateError
    from megatron_bd3.data.manifest import ManifestError
    from megatron_bd3.data.shards import ShardError
    from megatron_bd3.data.sources import InputError
    from megatron_bd3.data.tokenizer import TokenizerError

    return isinstance(exc, (ConfigError, CheckpointError, LoaderStateError, ManifestError,
                            ShardError, InputError, TokenizerError))


def main(argv: Sequence[str] | None = None) -> int:
    children_exit_with_this_process()  # no orphan outlives this process (megatron_bd3.lifetime)
    if launched_by_agent():  # the rank ends with its launcher
        exit_with_parent(f"bd3-train: rank {os.environ.get('RANK', '?')}: its launcher (pid "
                         "{parent_pid}) is gone; stopping")
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"bd3-train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        from megatron_bd3.training.config import dump_config

        print(dump_config(config))
        return 0
    _quiet_known_warnings()
    try:
        summary = train(config, stop_after=args.stop_after)
    except Exception as exc:
        if not is_run_input_error(exc):
            raise  # a bug: keep its traceback (exit 1)
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
        where = f"rank {os.environ.get('RANK', '?')}: " if several else ""
        message = " ".join(str(exc).split("\n"))
        print(f"bd3-train: {where}{message}", file=sys.stderr, flush=True)
        return 2
    if args.summary_json and int(os.environ.get("RANK", "0")) == 0:
        Path(args.summary_json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == "__mp_main__":
    # This module re-imported as the main module of a multiprocessing child started with
    # "spawn" (megatron's checkpoint writer starts its Manager so): it ends with its rank.
    exit_with_parent()
