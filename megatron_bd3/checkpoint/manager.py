"""Save and restore a whole training run; load model weights into any TP/PP layout.

A checkpoint directory `step_XXXXXXXX/` holds:

    complete.json          marker: step, layout, model identity, resolved config, file checksums
    optimizer/...          the stepper's own state (Stepper.save_state): the DeepSpeed engine
                           checkpoint (module, ZeRO partitions) or megatron's optimizer
    ranks/rank_XXXXX.pt    per rank: {name: component.state_dict()} of the components the
                           trainer hands over (trainer state, EMA shards, data-loader position,
                           clip range, every RNG)
    model/  ema/           layout-independent weights and EMA weights: megatron-core
                           dist_checkpointing (sharded_state_dict with global layer offsets and
                           TP partition dims), so they load into a different TP/PP/VPP layout
    reshardable/           the optimizer state and the EMA shadows the same way (reshard.py)

Resume (`load_training_state`) needs the same model identity (shape fields, vocabulary, sequence
length, block size) and optimizer backend. In the same layout it restores the stepper's own state
and every rank's file exactly. In another layout (DP size, TP, PP/VPP, ZeRO stage: an elastic
resume, `layout_change`) it loads the weights from model/ (the trainer does, before the optimizer
is built), the optimizer state and sharded components from reshardable/, the replicated
components from rank 0's file, and has the per-rank ones re-derived (see reshard.py).
Everything is verified (marker, sizes, checksums) before the first tensor is read.

The manager knows no component by name: whatever has `state_dict()`/`load_state_dict()` goes in a
rank file, and a resume refuses a checkpoint whose component names differ from the run's (e.g.
EMA on in one and off in the other). The optimizer's state is the stepper's business
(megatron_bd3.training.parallelize.Stepper): the manager gives it a directory.

Entry points that save need an `if __name__ == "__main__":` guard: dist_checkpointing's default
save strategy starts worker processes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from megatron_bd3.checkpoint.atomic import (
    CheckpointError,
    begin_save,
    finish_save,
    prune,
    read_latest,
    resume_candidates,
    verify_distributed,
)
from megatron_bd3.checkpoint.reshard import (
    RESHARDABLE_DIR,
    describe_layout,
    layout_rule,
    load_reshardable,
    save_reshardable,
)
from megatron_bd3.checkpoint.rng import capture_rng_state, restore_rng_state
from megatron_bd3.parallel import apply_cpu_compat

logger = logging.getLogger(__name__)

OPTIMIZER_DIR = "optimizer"


class Stateful(Protocol):
    """A piece of a run's state that goes into every rank's file."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

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
LAYOUT_KEYS = ("tp", "pp", "vpp", "cp", "dp", "optimizer_backend", "zero_stage")
# Layout keys added later, with the value a checkpoint that lacks them was saved with.
LAYOUT_DEFAULTS = {"cp": 1}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _has_sharded_state(chunks: list[torch.nn.Module]) -> bool:
    return all(hasattr(c, "sharded_state_dict") for c in chunks)


def _chunk_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"


def sharded_model_state(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """The chunks' megatron sharded state dicts, keyed model / model0, model1, ... (VPP)."""
    return {_chunk_key(i, len(chunks)): c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_sharded(sharded: dict[str, Any], directory: Path) -> None:
    """dist_checkpointing.save of `sharded` into `directory` (all ranks call it)."""
    from megatron.core import dist_checkpointing

    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    # On CPU the save path needs megatron_bd3.parallel's compatibility layer (two CUDA calls in
    # dist_checkpointing's writers); it is normally active already, applying it is idempotent.
    apply_cpu_compat()
    dist_checkpointing.save(sharded, str(directory))


def save_model_weights(directory: Path, chunks: list[torch.nn.Module]) -> None:
    """Layout-independent weights of `chunks` into `directory` (loadable by load_model_weights
    into any TP/PP/VPP layout)."""
    save_sharded(sharded_model_state(chunks), directory)


def save_training_state(
    root: str | Path,
    step: int,
    *,
    stepper,
    components: Mapping[str, Stateful],
    ema=None,
    record: dict[str, Any],
    keep_last: int | None = None,
    layout_independent: bool = True,
) -> Path:
    """Write a complete checkpoint atomically (all ranks call this); returns its directory.

    `stepper` (a megatron_bd3.training.parallelize.Stepper) saves the optimizer and module state;
    every component's state_dict() goes into this rank's file; `ema`, when given, also writes the
    EMA weights as layout-independent weights. With `layout_independent`, the weights and, where
    the stepper can give it, the optimizer and sharded-component state are also written for an
    elastic resume (reshard.py). `record` goes into complete.json: at least
    {"layout": {...}, "model": {...}}.
    """
    root = Path(root)
    # Saving must not change the run: the component states (the RNG ones included) are taken
    # first, and every RNG is put back at the end (the savers may draw random numbers), so a
    # resumed run continues exactly like this one.
    guard = capture_rng_state()
    states = {name: component.state_dict() for name, component in components.items()}
    tmp = begin_save(root, step)

    # 1) optimizer + module state (layout-dependent, exact resume)
    stepper.save_state(tmp / OPTIMIZER_DIR)

    # 2) per-rank state of every component
    rank_dir = tmp / "ranks"
    if _rank() == 0:
        rank_dir.mkdir(exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    torch.save(states, rank_dir / f"rank_{_rank():05d}.pt")

    # 3) layout-independent weights (and EMA weights) for resharding / export
    chunks = stepper.chunks
    has_sharded = layout_independent and _has_sharded_state(chunks)
    if has_sharded:
        with stepper.gathered_parameters():
            save_model_weights(tmp / "model", chunks)
        if ema is not None:
            with ema.swap_in(), stepper.gathered_parameters():
                save_model_weights(tmp / "ema", chunks)
    reshardable = None
    if has_sharded and stepper.reshardable:
        sharded = {name: c for name, c in components.items()
                   if getattr(c, "layout_rule", None) == "sharded"}
        reshardable = save_reshardable(tmp / RESHARDABLE_DIR, stepper=stepper,
                                       sharded_components=sharded)
    record = {**record, "layout_independent": has_sharded, "has_ema": ema is not None,
              "reshardable": reshardable}
    final = finish_save(root, tmp, step, record)
    prune(root, keep_last, protect=final)
    restore_rng_state(guard)
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


def _same_on_every_rank(paths: list[Path]) -> list[Path]:
    """Rank 0's list: every rank then verifies the same checkpoints in the same order (the
    verification is collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return paths
    box: list[Any] = [[str(p) for p in paths]]
    dist.broadcast_object_list(box, src=0)
    return [Path(p) for p in box[0]]


def select_resume(
    root: str | Path, resume: str, record: dict[str, Any]
) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """checkpoint.resume -> (directory, its verified marker, why newer checkpoints were skipped).

    `auto` takes the newest intact checkpoint (marker, sizes, checksums) among those
    `resume_candidates` lists, skipping torn or corrupt ones, and refuses with one message naming
    every candidate when none is intact: a run that has checkpoints never silently restarts from
    scratch. An explicit directory is verified and refused when it is not intact. Either way the
    chosen checkpoint must match this run (check_compatible): a mismatch is never skipped.
    All ranks call this.
    """
    if resume != "auto":
        directory = resolve_resume(root, resume)
        if directory is None:
            return None, None, []
        return directory, check_resumable(directory, record), []
    candidates = _same_on_every_rank(resume_candidates(Path(root)))
    skipped: list[str] = []
    for directory in candidates:
        try:
            marker = verify_distributed(directory)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        check_compatible(marker, record, directory)
        refuse_unresumable(marker, directory)
        return directory, marker, skipped
    if candidates:
        raise CheckpointError(
            f"checkpoint.resume=auto: none of the {len(candidates)} checkpoint(s) in {root} is "
            f"intact ({'; '.join(skipped)}); refusing to start from scratch over them: restore "
            f"one, pass checkpoint.resume=none to start a new run, or use another checkpoint.dir"
        )
    return None, None, []


def _compare(kind: str, saved: dict[str, Any], current: dict[str, Any], keys, directory) -> None:
    problems = [
        f"{key}: checkpoint {saved.get(key)!r} != run {current.get(key)!r}"
        for key in keys
        if key in saved or key in current
        if saved.get(key) != current.get(key)
    ]
    if problems:
        raise CheckpointError(f"{directory}: {kind} differs from this run ({'; '.join(problems)})")


def _layout(record: dict[str, Any]) -> dict[str, Any]:
    """A marker's or run record's layout, keys it predates (cp) at their defaults."""
    return {**LAYOUT_DEFAULTS, **record.get("layout", {})}


def layout_change(marker: dict[str, Any], record: dict[str, Any]) -> str | None:
    """None when the checkpoint was written in this run's layout; else "old -> new" (an elastic
    resume, see reshard.py)."""
    saved, current = _layout(marker), _layout(record)
    if all(saved.get(key) == current.get(key) for key in LAYOUT_KEYS):
        return None
    return f"{describe_layout(saved)} -> {describe_layout(current)}"


def check_compatible(marker: dict[str, Any], record: dict[str, Any], directory: Path) -> None:
    """Refuse a resume whose model identity or optimizer backend differs from this run, or whose
    layout differs when the checkpoint has no layout-independent training state."""
    _compare(
        "model",
        marker.get("model", {}),
        record.get("model", {}),
        sorted(set(marker.get("model", {})) | set(record.get("model", {}))),
        directory,
    )
    _compare("layout", marker.get("layout", {}), record.get("layout", {}),
             ("optimizer_backend",), directory)
    if layout_change(marker, record) is None or marker.get("reshardable"):
        return
    try:
        _compare("layout", _layout(marker), _layout(record), LAYOUT_KEYS, directory)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}. This checkpoint has no layout-independent optimizer state "
            f"(checkpoint.save_layout_independent was false, or the optimizer backend cannot give "
            f"it), so it resumes only in its own layout; to continue from its weights in a new "
            f"layout set checkpoint.init_from={directory} and checkpoint.resume=none (weights and "
            f"EMA are resharded, the optimizer restarts)"
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
    components: Mapping[str, Stateful],
    record: dict[str, Any],
    marker: dict[str, Any] | None = None,
) -> None:
    """Restore the stepper's optimizer and module state and every component's state; returns
    None in the same layout, else one line saying what was resharded, carried and re-derived.

    The component names must be those the checkpoint was saved with (a missing or extra one is
    refused by name). Components load in the order given. In another layout (layout_change) the
    model weights must already be in the chunks (load_model_weights before the stepper was
    built); the rest follows each component's layout_rule (reshard.py).
    """
    directory = Path(directory)
    if marker is None:  # else: verified and checked by the caller (see check_resumable)
        marker = verify_distributed(directory)
        check_compatible(marker, record, directory)
    refuse_unresumable(marker, directory)
    change = layout_change(marker, record)
    # in another layout this rank may have no file of its own: the replicated components are
    # the same in every rank's file, rank 0's is used
    rank_file = directory / "ranks" / f"rank_{0 if change else _rank():05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{directory}: {rank_file.name} is missing")
    per_rank = torch.load(rank_file, map_location="cpu", weights_only=False)
    saved, wanted = set(per_rank), set(components)
    if saved != wanted:
        raise CheckpointError(
            f"{directory}: the checkpoint holds state for {sorted(saved)}, this run has "
            f"{sorted(wanted)} (missing in the checkpoint: {sorted(wanted - saved)}; not in this "
            f"run: {sorted(saved - wanted)}); e.g. training.ema_decay must be on in both or off "
            "in both"
        )
    if change is None:
        stepper.load_state(directory / OPTIMIZER_DIR)
        for name, component in components.items():
            component.load_state_dict(per_rank[name])
        return None
    rules = {name: layout_rule(name, component) for name, component in components.items()}
    sharded = {name: components[name] for name, rule in rules.items() if rule == "sharded"}
    load_reshardable(directory / RESHARDABLE_DIR, stepper=stepper, sharded_components=sharded,
                     saved=marker["reshardable"])
    step = int(marker["step"])
    for name, component in components.items():
        if rules[name] == "replicated":
            component.load_state_dict(per_rank[name])
        elif rules[name] == "per_rank":
            component.rederive(step)
    saved_keys = ", ".join(marker["reshardable"]["optimizer_keys"]) or "none yet"

    def named(rule):
        return ", ".join(name for name, r in rules.items() if r == rule) or "none"

    return (f"layout {change}: resharded weights, optimizer state ({saved_keys}; step count) "
            f"and {named('sharded')}; carried {named('replicated')}; re-derived {named('per_rank')}"
            f" from (training.seed, step {step}): per-rank streams cannot follow a layout change")


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
            sharded_model_state(chunks), str(directory / sub), strict=StrictHandling.RAISE_ALL
        )
    except Exception as exc:  # dist_checkpointing raises several types; name the checkpoint
        raise CheckpointError(f"{directory}/{sub}: cannot load into this model: {exc}") from exc
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(state[_chunk_key(index, len(chunks))], strict=True)
    return marker
