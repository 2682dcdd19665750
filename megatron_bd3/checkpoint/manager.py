"""Save and restore a whole training run; load model weights into any TP/PP layout.

A checkpoint directory `step_XXXXXXXX/` holds:

    complete.json          marker: step, layout, model identity, resolved config, file checksums
    ds/state/...           DeepSpeed engine checkpoint (module, ZeRO optimizer partitions)
    optim/                 megatron optimizer (optimizer.backend=megatron; dist_checkpointing)
    ranks/rank_XXXXX.pt    per rank: EMA shadow (this rank's shards), every RNG, trainer state
                           (step, consumed samples, clip range, data-loader position)
    model/  ema/           layout-independent weights and EMA weights: megatron-core
                           dist_checkpointing (sharded_state_dict with global layer offsets and
                           TP partition dims), so they load into a different TP/PP/VPP layout

Resume (`load_training_state`) needs the same layout and the same model identity (shape
fields, vocabulary, sequence length, block size) and refuses otherwise, saying how to start a new
run from the weights instead (`checkpoint.init_from`, `load_model_weights`). Everything is
verified (marker, sizes, checksums) before the first tensor is read.

Entry points that save need an `if __name__ == "__main__":` guard: dist_checkpointing's default
save strategy starts worker processes.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_bd3.checkpoint.atomic import (
    CheckpointError,
    begin_save,
    finish_save,
    prune,
    read_latest,
    verify_distributed,
)
from megatron_bd3.checkpoint.rng import capture_rng_state, restore_rng_state
from megatron_bd3.parallel import apply_cpu_compat

logger = logging.getLogger(__name__)

DS_TAG = "state"
# megatron's distributed optimizer: one ShardedTensor per contiguous buffer shard (reshardable
# over DP only, like the DeepSpeed state); megatron-core 0.16's default "fully_sharded_model_space"
# builds flattened ShardedTensors its own dist_checkpointing refuses (measured on an H100).
MEGATRON_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}

# Model identity fields whose change makes a resume meaningless. For init_from (weights only)
# only the ones that change tensor shapes must match.
SHAPE_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "vocab_size",
)
LAYOUT_KEYS = ("tp", "pp", "vpp", "dp", "optimizer_backend", "zero_stage")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _has_sharded_state(chunks: list[torch.nn.Module]) -> bool:
    return all(hasattr(c, "sharded_state_dict") for c in chunks)


def _chunk_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"


def _sharded_model_state(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    return {_chunk_key(i, len(chunks)): c.sharded_state_dict() for i, c in enumerate(chunks)}


@contextlib.contextmanager
def _full_parameters(chunks: list[torch.nn.Module], zero3: bool, modify: bool = False):
    """Under ZeRO-3 gather the partitioned parameters for the block (no-op otherwise)."""
    if not zero3:
        yield
        return
    import deepspeed

    params = [p for c in chunks for p in c.parameters()]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def _dist_save(sharded: dict[str, Any], directory: Path) -> None:
    from megatron.core import dist_checkpointing

    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    # On CPU the save path needs megatron_bd3.parallel's compatibility layer (two CUDA calls in
    # dist_checkpointing's writers); it is normally active already, applying it is idempotent.
    apply_cpu_compat()
    dist_checkpointing.save(sharded, str(directory))


def _stepper_kind(stepper) -> str:
    return "deepspeed" if hasattr(stepper, "engine") else "megatron"


def save_training_state(
    root: str | Path,
    step: int,
    *,
    stepper,
    chunks: list[torch.nn.Module],
    ema,
    train_state: dict[str, Any],
    record: dict[str, Any],
    keep_last: int | None = None,
    layout_independent: bool = True,
) -> Path:
    """Write a complete checkpoint atomically (all ranks call this); returns its directory.

    `record` goes into complete.json: at least {"layout": {...}, "model": {...}}.
    """
    root = Path(root)
    # Saving must not change the run: the RNG states are captured first and put back at the end
    # (the savers may draw random numbers), so a resumed run continues exactly like this one.
    rng_state = capture_rng_state()
    tmp = begin_save(root, step)
    zero3 = getattr(stepper, "zero_stage", None) == 3

    # 1) optimizer + module state (layout-dependent, exact resume)
    if _stepper_kind(stepper) == "deepspeed":
        stepper.engine.save_checkpoint(
            str(tmp / "ds"), tag=DS_TAG, client_state={}, save_latest=False
        )
    else:
        model_sharded = _sharded_model_state(chunks)
        _dist_save(
            {"optimizer": stepper.optimizer.sharded_state_dict(
                model_sharded, metadata=MEGATRON_OPTIMIZER_METADATA)},
            tmp / "optim",
        )

    # 2) per-rank state: EMA shards, RNG, trainer state
    rank_dir = tmp / "ranks"
    if _rank() == 0:
        rank_dir.mkdir(exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    torch.save(
        {
            "ema": ema.state_dict() if ema is not None else None,
            "rng": rng_state,
            "train_state": train_state,
        },
        rank_dir / f"rank_{_rank():05d}.pt",
    )

    # 3) layout-independent weights (and EMA weights) for resharding / export
    has_sharded = layout_independent and _has_sharded_state(chunks)
    if has_sharded:
        with _full_parameters(chunks, zero3):
            _dist_save(_sharded_model_state(chunks), tmp / "model")
        if ema is not None:
            with ema.swap_in(), _full_parameters(chunks, zero3):
                _dist_save(_sharded_model_state(chunks), tmp / "ema")
    record = {**record, "layout_independent": has_sharded, "has_ema": ema is not None}
    final = finish_save(root, tmp, step, record)
    prune(root, keep_last, protect=final)
    restore_rng_state(rng_state)
    return final


def resolve_resume(root: str | Path, resume: str) -> Path | None:
    """checkpoint.resume -> the directory to resume from (None = start fresh)."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        return read_latest(Path(root))
    path = Path(resume)
    if (path / "latest").is_file() and not (path / "complete.json").exists():
        return read_latest(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint.resume={resume}: no such checkpoint directory")
    return path


def _compare(kind: str, saved: dict[str, Any], current: dict[str, Any], keys, directory) -> None:
    problems = [
        f"{key}: checkpoint {saved.get(key)!r} != run {current.get(key)!r}"
        for key in keys
        if key in saved or key in current
        if saved.get(key) != current.get(key)
    ]
    if problems:
        raise CheckpointError(f"{directory}: {kind} differs from this run ({'; '.join(problems)})")


def check_compatible(marker: dict[str, Any], record: dict[str, Any], directory: Path) -> None:
    """Refuse a resume whose model identity or parallel layout differs from this run."""
    _compare(
        "model",
        marker.get("model", {}),
        record.get("model", {}),
        sorted(set(marker.get("model", {})) | set(record.get("model", {}))),
        directory,
    )
    try:
        _compare(
            "layout", marker.get("layout", {}), record.get("layout", {}), LAYOUT_KEYS, directory
        )
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}. Resuming needs the same layout (optimizer state is partitioned by it); "
            f"to continue from these weights in a new layout set checkpoint.init_from={directory} "
            f"and checkpoint.resume=none (weights and EMA are resharded, the optimizer restarts)"
        ) from None


def check_resumable(directory: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Verify a checkpoint and that this run can resume from it; returns its marker.

    Cheap enough to run before the model and optimizer are built, so a mismatch is refused
    before any expensive set-up.
    """
    directory = Path(directory)
    marker = verify_distributed(directory)
    check_compatible(marker, record, directory)
    refuse_unresumable(marker, directory)
    return marker


def refuse_unresumable(marker: dict[str, Any], directory: Path) -> None:
    """Refuse checkpoints whose optimizer state cannot be restored exactly.

    megatron-core's optimizer (GPU only), measured on an H100 with megatron-core 0.16.1 and
    neither apex nor TE: its DistributedOptimizer cannot rebuild a fresh optimizer's state
    (state_dict() asserts on the missing AdamW `step`), and with placeholder states the resumed
    run's loss left the uninterrupted one's (step 10: 9.42 vs 9.95). A resume that is not exact
    is refused rather than continued silently; the weights stay usable through init_from."""
    if (marker.get("layout") or {}).get("optimizer_backend") == "megatron":
        raise CheckpointError(
            f"{directory}: resuming a run trained with optimizer.backend=megatron is not "
            "supported (megatron-core 0.16 cannot restore its optimizer state exactly without "
            "apex/TE; docs/bench/gpu.md). Start a new run from these weights with "
            f"checkpoint.init_from={directory}, or train with optimizer.backend=deepspeed, "
            "whose resume is exact."
        )


def load_training_state(
    directory: str | Path,
    *,
    stepper,
    chunks: list[torch.nn.Module],
    ema,
    record: dict[str, Any],
    restore_rng: bool = True,
    marker: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore optimizer, module, EMA (and RNG) states; return the trainer state of this rank.

    With `restore_rng=False` the RNG states are returned under the key "rng" instead, for the
    caller to restore right before its first step (anything in between may draw numbers).
    """
    directory = Path(directory)
    if marker is None:  # else: verified and checked by the caller (see check_resumable)
        marker = verify_distributed(directory)
        check_compatible(marker, record, directory)
    rank_file = directory / "ranks" / f"rank_{_rank():05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{directory}: {rank_file.name} is missing")
    per_rank = torch.load(rank_file, map_location="cpu", weights_only=False)
    if (per_rank["ema"] is None) != (ema is None):
        raise CheckpointError(
            f"{directory}: EMA {'absent' if per_rank['ema'] is None else 'present'} in the "
            f"checkpoint but training.ema_decay says {'on' if ema is not None else 'off'}"
        )

    if _stepper_kind(stepper) == "deepspeed":
        path, _ = stepper.engine.load_checkpoint(
            str(directory / "ds"),
            tag=DS_TAG,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise CheckpointError(f"{directory}: DeepSpeed found no engine state under ds/{DS_TAG}")
    else:  # megatron-core's optimizer: see refuse_unresumable
        refuse_unresumable(marker, directory)
        raise CheckpointError(f"{directory}: no optimizer-state loader for "
                              f"{type(stepper).__name__}")
    if ema is not None:
        ema.load_state_dict(per_rank["ema"])
    state = dict(per_rank["train_state"])
    if restore_rng:
        restore_rng_state(per_rank["rng"])
    else:
        state["rng"] = per_rank["rng"]
    return state


def load_model_weights(
    directory: str | Path,
    chunks: list[torch.nn.Module],
    *,
    use_ema: bool = False,
    record: dict[str, Any] | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Load the layout-independent weights (or EMA weights) into `chunks`, whatever the TP/PP/VPP
    layout they were saved from. Call before wrapping the chunks in DeepSpeed. Returns the
    checkpoint's marker."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    directory = Path(directory)
    marker = verify_distributed(directory) if check else {}
    if check and record is not None:
        _compare(
            "model shape", marker.get("model", {}), record.get("model", {}), SHAPE_KEYS, directory
        )
    if check and not marker.get("layout_independent"):
        raise CheckpointError(
            f"{directory} was saved without layout-independent weights "
            f"(checkpoint.save_layout_independent=false); it can only be resumed in its own layout"
        )
    sub = "ema" if use_ema else "model"
    if use_ema and check and not marker.get("has_ema"):
        raise CheckpointError(f"{directory} has no EMA weights (training.ema_decay was 0)")
    if not _has_sharded_state(chunks):
        raise CheckpointError("the model has no sharded_state_dict(); cannot reshard into it")
    try:
        state = dist_checkpointing.load(
            _sharded_model_state(chunks), str(directory / sub), strict=StrictHandling.RAISE_ALL
        )
    except Exception as exc:  # dist_checkpointing raises several types; name the checkpoint
        raise CheckpointError(f"{directory}/{sub}: cannot load into this model: {exc}") from exc
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(state[_chunk_key(index, len(chunks))], strict=True)
    return marker
