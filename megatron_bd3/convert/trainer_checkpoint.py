"""Trainer checkpoint <-> standalone model directory.

`checkpoint_to_standalone` reads the layout-independent weights (model/ or ema/, megatron-core
dist_checkpointing) of a training checkpoint into one TP=1/PP=1 BD3Model in this process (gloo,
world size 1), whatever TP/PP/VPP, data-parallel size or optimizer it was saved with, maps them
to the standalone network (megatron_bd3.convert.weights) and writes `config.json` +
`model.safetensors`, the tokenizer files and the learned clip range.

`standalone_to_checkpoint` goes the other way and writes a weights-only checkpoint in the
trainer's format (`step_XXXXXXXX/` with `complete.json`, model/ and ema/ dist_checkpointing
directories, `latest`), which a run starts from with `checkpoint.init_from=<dir>`. It cannot be
resumed (there is no optimizer or trainer state); the trainer says so if asked to.

Outputs are written into a temporary sibling directory, checked (parity against the original
model, unless check=False) and only then renamed into place, so a failed conversion leaves no
half-written output behind.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_bd3.checkpoint import CheckpointError, load_model_weights, read_latest
from megatron_bd3.checkpoint.atomic import LATEST, MARKER, begin_save, finish_save, read_marker
from megatron_bd3.convert.config_map import (
    check_same_network,
    run_config_model_section,
    standalone_config_from_megatron,
)
from megatron_bd3.convert.model_card import (
    training_record,
    write_model_card,
    write_training_record,
)
from megatron_bd3.convert.output import ConversionResult, staged_output
from megatron_bd3.convert.parity import (
    DEFAULT_TOLERANCE,
    ParityReport,
    compare_logits,
    random_noisy_batch,
)
from megatron_bd3.convert.weights import (
    EXTRA_STATE_SUFFIX,
    MappingError,
    megatron_to_standalone,
    standalone_to_megatron,
)
from megatron_bd3.standalone.model import BD3Network, NetworkConfig

logger = logging.getLogger(__name__)

__all__ = [
    "ConversionResult",
    "TOKENIZER_SUBDIR",
    "checkpoint_to_standalone",
    "checkpoint_tokenizer",
    "open_checkpoint",
    "resolve_checkpoint_dir",
    "standalone_to_checkpoint",
]

TOKENIZER_SUBDIR = "tokenizer"  # inside a weights-only checkpoint's step directory
_SEED = 1234  # megatron init seed of the temporary models; their weights are always overwritten


# ------------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def single_process_runtime() -> Iterator[None]:
    """megatron parallel state for one process (TP = PP = DP = 1, gloo on CPU), torn down after.

    The launcher environment is ignored on purpose: a conversion is one process even when
    started from inside a torchrun job's shell."""
    from megatron_bd3.parallel import ParallelConfig, parallel_runtime

    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("conversion builds its own single-process model; call it from a "
                           "process without an initialised torch.distributed process group")
    with parallel_runtime(ParallelConfig(seed=_SEED), environ={}):
        yield


def model_config_for_conversion(run_config, vocab_size: int, mask_token_id: int):
    """The BD3Config of `run_config`'s model at TP = PP = 1 in fp32, built by the config layer's
    `build_model_config` (so the network is exactly the one the run trains). The attention
    kernel is SDPA (same math as flex; flex trains only on CUDA) and recompute is off. Document
    masking is off: it changes no weight, the standalone network has none (it attends within
    the one document it is given), and the parity check feeds a batch without documents."""
    from megatron_bd3.training.config import ParallelSection
    from megatron_bd3.training.model_config import build_model_config

    config = copy.deepcopy(run_config)
    config.model.attention_kernel = "sdpa"
    config.model.recompute = None
    config.data.document_mask = False
    config.data.document_position_reset = False
    return build_model_config(config, vocab_size=vocab_size, mask_token_id=mask_token_id,
                              precision="fp32", parallel=ParallelSection())


def _build_model(model_config):
    from megatron_bd3.model import build_bd3_model
    from megatron_bd3.parallel import current_device

    model = build_bd3_model(model_config, pre_process=True, post_process=True)
    # Whole module on this rank's device, as the trainer does: megatron creates its linear
    # layers on the GPU but the torch LayerNorm leaves on the CPU.
    return model.to(current_device()).eval()


def _locate(text: str | None) -> Path | None:
    """A data path from a run config, relative to the working directory as the trainer reads it
    (megatron_bd3.paths; data never falls back to the package). A missing path is returned as is:
    callers try several candidates and say which exist."""
    return Path(text).expanduser() if text else None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A step directory from: a step directory (has complete.json), a checkpoint root (has
    `latest`), or a run directory (its `checkpoints/latest`, or the checkpoint dir named by its
    config.yaml). A directory named step_* without a marker is returned as is (the caller's
    marker check then refuses it as incomplete)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if (path / MARKER).is_file() or path.name.startswith(("step_", ".tmp-step_")):
        return path
    roots = [path, path / "checkpoints"]
    if (path / "config.yaml").is_file():
        from megatron_bd3.training.config import ConfigError, load_config

        with contextlib.suppress(ConfigError):
            roots.append(load_config(path / "config.yaml").checkpoint_dir)
    for root in roots:
        if (root / LATEST).is_file() or any(root.glob("step_*")):
            latest = read_latest(root)  # raises when step_* exist without `latest`
            if latest is not None:
                return latest
    raise CheckpointError(
        f"{path} is not a checkpoint: no {MARKER}, no {LATEST} pointer, no checkpoints/{LATEST}; "
        "pass a step_XXXXXXXX directory, its checkpoint root, or the run directory"
    )


def _run_config_from_marker(marker: dict[str, Any], directory: Path):
    from megatron_bd3.training.config import ConfigError, load_config

    if "config" not in marker or "model" not in marker:
        raise CheckpointError(f"{directory}/{MARKER} has no resolved run config or model "
                              "identity; it was not written by the megatron_bd3 trainer")
    try:
        return load_config(data=marker["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{directory}/{MARKER}: the recorded run config does not load "
                              f"({exc})") from None


def _load_weights(step_dir: Path, model, use_ema: bool, record: dict | None = None) -> None:
    """load_model_weights, with torch's CheckpointException (a BaseException, which the
    manager's `except Exception` lets through) turned into a CheckpointError naming the cause."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        load_model_weights(step_dir, [model], use_ema=use_ema, record=record)
    except CheckpointException as exc:
        causes = "; ".join(f"{type(error).__name__}: {error}"
                           for error, _ in exc.failures.values())
        raise CheckpointError(f"{step_dir}/{'ema' if use_ema else 'model'}: cannot load into the "
                              f"model its run config describes: {causes}") from None


def _rank0_state(directory: Path) -> dict[str, Any] | None:
    """The trainer components' state saved by rank 0 (None for a weights-only checkpoint)."""
    rank0 = directory / "ranks" / "rank_00000.pt"
    if not rank0.is_file():
        return None
    return torch.load(rank0, map_location="cpu", weights_only=False, mmap=True)


def _consumed_samples(directory: Path) -> int | None:
    state = _rank0_state(directory) or {}
    for component in state.values():
        if isinstance(component, dict) and "consumed_samples" in component:
            return int(component["consumed_samples"])
    return None


def learned_clip_range(directory: Path, marker: dict[str, Any], run_config
                        ) -> tuple[float, float, str]:
    """(eps_min, eps_max, where from): the trainer state of rank 0 (the clip search result),
    else the marker of a weights-only checkpoint, else the run config's initial range."""
    state = _rank0_state(directory)
    if state is not None:
        clip = state.get("clip_range")
        if clip is not None:
            return (float(clip["eps_min"]), float(clip["eps_max"]),
                    "trainer state (ranks/rank_00000.pt)")
    if marker.get("clip_range") is not None:
        low, high = marker["clip_range"]
        return float(low), float(high), f"{MARKER}"
    t = run_config.training
    return float(t.clip_eps_min), float(t.clip_eps_max), "run config (initial range)"


def _manifest_tokenizer(run_config) -> dict[str, Any] | None:
    path = _locate(run_config.data.manifest)
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["tokenizer"]
    except (OSError, ValueError, KeyError):
        return None


def _find_tokenizer(explicit: str | Path | None, candidates: list[tuple[str, Path | None]],
                    expected_fingerprint: str | None):
    """(tokenizer or None, note). `explicit` must load; the first existing candidate is used.
    A tokenizer whose fingerprint differs from the one the model was trained with is refused:
    it would turn the model's ids into the wrong text."""
    from megatron_bd3.data import load_tokenizer

    if explicit is not None:
        candidates = [("tokenizer argument", Path(explicit))]
        if not Path(explicit).exists():
            raise FileNotFoundError(f"tokenizer {explicit} does not exist")
    for what, path in candidates:
        if path is None or not path.exists():
            continue
        tokenizer = load_tokenizer(path)
        if expected_fingerprint not in (None, "None") and (
                tokenizer.fingerprint() != expected_fingerprint):
            raise ValueError(
                f"tokenizer {path} ({what}) has fingerprint {tokenizer.fingerprint()[:16]}..., "
                f"but the model was trained with {str(expected_fingerprint)[:16]}...; pass the "
                "tokenizer the run used (--tokenizer)"
            )
        return tokenizer, f"tokenizer from {path} ({what})"
    looked = ", ".join(f"{what}={path}" for what, path in candidates) or "nothing recorded"
    return None, f"no tokenizer found (looked at {looked}); pass --tokenizer to include one"


def _special_ids(tokenizer, marker: dict[str, Any], manifest_tok: dict[str, Any] | None
                 ) -> dict[str, int | None]:
    if tokenizer is not None:
        ids = tokenizer.special_ids
    elif marker.get("special_ids"):
        ids = marker["special_ids"]
    elif manifest_tok is not None:
        ids = manifest_tok.get("special_ids", {})
    else:
        ids = {}
    return {f"{name}_token_id": ids.get(f"{name}_id") for name in ("bos", "eos", "pad")}


def _check_parity_megatron(model, network: BD3Network, what: str, tolerance: float,
                           seed: int) -> ParityReport:
    """megatron forward_logits vs standalone forward_train on one random noisy batch. The
    standalone network runs with the megatron model's L and B (they may differ from its own
    config when weights start a run with another block size)."""
    mc = model.config
    if (network.config.seq_length, network.config.block_size) != (mc.seq_length, mc.block_size):
        twin = BD3Network(dataclasses.replace(network.config, seq_length=mc.seq_length,
                                              block_size=mc.block_size))
        twin.load_state_dict(network.state_dict())
        network = twin.eval()
    x_t, x_0 = random_noisy_batch(mc.vocab_size, mc.mask_token_id, mc.seq_length,
                                  mc.block_size, seed=seed)
    device = next(model.parameters()).device  # the GPU when CUDA is there, else the CPU
    with torch.no_grad():
        original = model.forward_logits(x_t.to(device), x_0.to(device)).cpu()
        converted = network.forward_train(x_t, x_0)
    return compare_logits(original, converted, what, tolerance)


# ------------------------------------------------------------------------------------ checkpoint


def open_checkpoint(checkpoint_dir: str | Path) -> tuple[Path, dict[str, Any], Any]:
    """(step directory, its marker, the run config it recorded) of a step directory, checkpoint
    root or run directory. A torn checkpoint (no marker) or one not written by the trainer is
    refused with a CheckpointError naming it."""
    step_dir = resolve_checkpoint_dir(checkpoint_dir)
    marker = read_marker(step_dir)  # a torn checkpoint has none: refused here
    return step_dir, marker, _run_config_from_marker(marker, step_dir)


def checkpoint_tokenizer(step_dir: Path, marker: dict[str, Any], run_config,
                         explicit: str | Path | None = None):
    """(tokenizer or None, note) of a checkpoint: `explicit`, else the checkpoint's own
    tokenizer/, the run config's data.tokenizer, the data manifest's tokenizer. One whose
    fingerprint differs from the one the model was trained with is refused (ValueError)."""
    return _find_tokenizer(explicit, [
        ("checkpoint tokenizer/", step_dir / TOKENIZER_SUBDIR),
        ("data.tokenizer", _locate(run_config.data.tokenizer)),
        ("data manifest", _locate((_manifest_tokenizer(run_config) or {}).get("source"))),
    ], marker["model"].get("tokenizer_fingerprint"))


def load_checkpoint_network(
    checkpoint_dir: str | Path,
    use_ema: bool | None = None,
    tokenizer: str | Path | None = None,
) -> tuple[BD3Network, Any, dict[str, Any]]:
    """(standalone network, tokenizer or None, info) of a training checkpoint, in memory.

    Must be called inside `single_process_runtime()`; info holds the megatron model under
    "model" (for a parity check), the step directory, the marker and notes."""
    step_dir, marker, run_config = open_checkpoint(checkpoint_dir)
    identity = marker["model"]
    if use_ema is None:
        use_ema = bool(marker.get("has_ema"))
    notes = [f"checkpoint {step_dir} (step {marker.get('step')}, saved with layout "
             f"{marker.get('layout')}), {'EMA' if use_ema else 'raw'} weights"]

    model_config = model_config_for_conversion(run_config, int(identity["vocab_size"]),
                                               int(identity["mask_token_id"]))
    model = _build_model(model_config)
    # verifies the marker, every file's size and checksum, layout independence and EMA presence
    # before reading a tensor
    _load_weights(step_dir, model, use_ema)

    eps_min, eps_max, clip_source = learned_clip_range(step_dir, marker, run_config)
    notes.append(f"clip range [{eps_min:g}, {eps_max:g}] from the {clip_source}")
    tok, note = checkpoint_tokenizer(step_dir, marker, run_config, tokenizer)
    notes.append(note)
    if tok is not None and (tok.vocab_size, tok.mask_id) != (model_config.vocab_size,
                                                              model_config.mask_token_id):
        raise ValueError(f"tokenizer {tok.source} has vocab_size {tok.vocab_size} and mask id "
                         f"{tok.mask_id}; the model has {model_config.vocab_size} and "
                         f"{model_config.mask_token_id}")
    fingerprint = identity.get("tokenizer_fingerprint")
    config = standalone_config_from_megatron(
        model_config, sampling_eps_min=eps_min, sampling_eps_max=eps_max,
        **_special_ids(tok, marker, _manifest_tokenizer(run_config)),
        tokenizer_fingerprint=(tok.fingerprint() if tok is not None
                               else None if fingerprint in (None, "None") else str(fingerprint)),
    )
    tensors = megatron_to_standalone(model.state_dict(), config, model_config.padded_vocab_size)
    network = BD3Network(config)
    network.load_state_dict_strict(tensors, source=str(step_dir))
    info = {"model": model, "step_dir": step_dir, "marker": marker, "notes": notes,
            "use_ema": use_ema,
            "training_record": training_record(
                marker, run_config, use_ema=use_ema, clip_range=(eps_min, eps_max),
                clip_source=clip_source, consumed_samples=_consumed_samples(step_dir),
                manifest_path=_locate(run_config.data.manifest))}
    return network.eval(), tok, info


def checkpoint_to_standalone(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    use_ema: bool | None = None,
    tokenizer: str | Path | None = None,
    *,
    eval_report: str | Path | None = None,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    overwrite: bool = False,
) -> ConversionResult:
    """Training checkpoint -> standalone model directory (config.json with the tokenizer
    fingerprint, model.safetensors, tokenizer files when found, the training record
    bd3_training.json and the model card README.md).

    Args:
        checkpoint_dir: a step directory, a checkpoint root (`latest`) or a run directory.
        output_dir: where to write; must not exist or be empty unless `overwrite`.
        use_ema: True = the EMA weights (an error if the run kept none), False = the raw
            weights, None = EMA when the checkpoint has them.
        tokenizer: tokenizer directory/file to include (default: the checkpoint's own
            tokenizer/, the run config's data.tokenizer, the data manifest's tokenizer; a
            tokenizer whose fingerprint differs from the run's is refused).
        eval_report: a bd3-eval result JSON of this model, summarised in the model card.
        check: compare the written model's logits with the megatron model's on a random batch.
    Raises CheckpointError for a torn/corrupted/mismatched checkpoint, MappingError for weights
    that do not fit the recorded model, ParityError when the check fails.
    """
    with single_process_runtime():
        network, tok, info = load_checkpoint_network(checkpoint_dir, use_ema, tokenizer)
        result = ConversionResult(Path(output_dir), info["step_dir"], notes=info["notes"])
        with staged_output(output_dir, overwrite) as tmp:
            network.save_pretrained(tmp)
            if tok is not None:
                tok.save(tmp)
            write_training_record(tmp, info["training_record"])
            write_model_card(tmp, network, hugging_face=False, layout="standalone directory",
                             record=info["training_record"], eval_report=eval_report)
            if check:
                written = BD3Network.from_pretrained(tmp)
                result.parity.append(_check_parity_megatron(
                    info["model"], written, "megatron checkpoint (TP=1 load) vs standalone",
                    tolerance, seed))
    return result


# ------------------------------------------------------------------------------------ standalone


def _run_config_for(standalone: NetworkConfig, run_config, overrides: Sequence[str],
                    source: Path):
    """A RunConfig: loaded from a path (+ overrides), given, or (None) derived from the
    standalone config (architecture: reference)."""
    from megatron_bd3.training.config import RunConfig, load_config

    if isinstance(run_config, RunConfig):
        if overrides:
            raise ValueError("pass overrides together with a config path, not with a RunConfig")
        return run_config
    if run_config is not None:
        return load_config(run_config, list(overrides))
    data: dict[str, Any] = {"model": run_config_model_section(standalone)}
    if standalone.sampling_eps_min < standalone.sampling_eps_max:
        data["training"] = {"clip_eps_min": standalone.sampling_eps_min,
                            "clip_eps_max": standalone.sampling_eps_max}
    config = load_config(data=data, overrides=list(overrides))
    config.source = f"derived from {source / 'config.json'}"
    return config


def _write_weights_checkpoint(root: Path, step: int, model, record: dict[str, Any],
                              tokenizer) -> Path:
    """A trainer-format checkpoint holding only weights: model/ and ema/ (the same weights,
    so checkpoint.init_from works with init_from_ema either way), tokenizer/ when known."""
    from megatron_bd3.checkpoint.manager import save_model_weights

    tmp = begin_save(root, step)
    save_model_weights(tmp / "model", [model])
    save_model_weights(tmp / "ema", [model])
    if tokenizer is not None:
        tokenizer.save(tmp / TOKENIZER_SUBDIR)
    return finish_save(root, tmp, step, record)


def standalone_to_checkpoint(
    standalone_dir: str | Path,
    output_dir: str | Path,
    run_config=None,
    overrides: Sequence[str] = (),
    *,
    step: int = 0,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    overwrite: bool = False,
) -> ConversionResult:
    """Standalone model directory -> weights-only trainer checkpoint root at `output_dir`
    (`step_XXXXXXXX/` + `latest`), to start a run from with `checkpoint.init_from=output_dir`.

    Args:
        run_config: the run config (YAML path or RunConfig) of the run that will start from the
            weights; its model section must describe the same network (sizes, biases, tying,
            vocabulary, [MASK] id); seq_length and block_size may differ (e.g. MDLM -> BD3).
            None: derived from the standalone config (reference architecture).
        overrides: dotted `section.key=value` overrides applied to the run config.
        check: reload the written checkpoint into a fresh TP=1 model and compare its logits with
            the standalone network's.
    """
    from megatron_bd3.training.model_config import model_identity

    source = Path(standalone_dir)
    network = BD3Network.from_pretrained(source)
    standalone = network.config
    config = _run_config_for(standalone, run_config, overrides, source)
    notes = [f"run config {config.source}"]

    from megatron_bd3.convert.hf import model_tokenizer

    tokenizer = model_tokenizer(source, standalone)
    run_tokenizer, note = _find_tokenizer(None, [("data.tokenizer",
                                                  _locate(config.data.tokenizer))], None)
    if tokenizer is not None and run_tokenizer is not None and (
            tokenizer.fingerprint() != run_tokenizer.fingerprint()):
        raise ValueError(f"the tokenizer in {source} differs from the run config's "
                         f"data.tokenizer {config.data.tokenizer} (fingerprints "
                         f"{tokenizer.fingerprint()[:16]}... vs "
                         f"{run_tokenizer.fingerprint()[:16]}...)")
    tokenizer = tokenizer or run_tokenizer
    manifest_tok = _manifest_tokenizer(config)
    if manifest_tok is not None:
        recorded = (manifest_tok.get("vocab_size"),
                    (manifest_tok.get("special_ids") or {}).get("mask_id"))
        if recorded != (standalone.vocab_size, standalone.mask_token_id):
            raise ValueError(
                f"the run's data manifest {config.data.manifest} has vocab_size {recorded[0]} "
                f"and mask id {recorded[1]}, the weights have vocab_size "
                f"{standalone.vocab_size} and mask id {standalone.mask_token_id}"
            )

    model_config = model_config_for_conversion(config, standalone.vocab_size,
                                               standalone.mask_token_id)
    check_same_network(standalone, standalone_config_from_megatron(model_config),
                       f"the run config {config.source}")
    for name in ("seq_length", "block_size"):
        if getattr(model_config, name) != getattr(standalone, name):
            notes.append(f"{name}: weights {getattr(standalone, name)} -> run "
                         f"{getattr(model_config, name)}")
    state = standalone_to_megatron(network.state_dict(), standalone,
                                   model_config.padded_vocab_size)
    fingerprint = tokenizer.fingerprint() if tokenizer is not None else None
    special_ids = {"bos_id": standalone.bos_token_id, "eos_id": standalone.eos_token_id,
                   "pad_id": standalone.pad_token_id}
    record = {
        "layout": {"tp": 1, "pp": 1, "vpp": None, "dp": 1, "optimizer_backend": None,
                   "zero_stage": None},
        "model": model_identity(config, model_config, fingerprint),
        "config": config.to_dict(),
        "world_size": 1,
        "layout_independent": True,
        "has_ema": True,
        "weights_only": True,
        "converted_from": {"kind": "standalone", "path": str(source.resolve())},
        "clip_range": [standalone.sampling_eps_min, standalone.sampling_eps_max],
        "special_ids": special_ids,
    }

    result = ConversionResult(Path(output_dir), source, notes=notes)
    with single_process_runtime(), staged_output(output_dir, overwrite) as tmp:
        model = _build_model(model_config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith(EXTRA_STATE_SUFFIX)]
        if missing or unexpected:
            raise MappingError(f"megatron model for {config.source}: missing {missing}, "
                               f"unexpected {unexpected}")
        step_dir = _write_weights_checkpoint(tmp, step, model, record, tokenizer)
        result.notes.append(f"checkpoint {Path(output_dir) / step_dir.name} (weights only; "
                            f"start a run from it with checkpoint.init_from={output_dir})")
        if check:
            for use_ema in (False, True):
                fresh = _build_model(model_config)
                _load_weights(step_dir, fresh, use_ema, record={"model": record["model"]})
                result.parity.append(_check_parity_megatron(
                    fresh, network,
                    f"standalone vs written checkpoint ({'ema' if use_ema else 'model'}/)",
                    tolerance, seed))
    if tokenizer is None:
        result.notes.append(f"{note} (the checkpoint carries none)")
    return result
