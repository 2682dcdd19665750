"""What `bd3-eval` measures: a trainer checkpoint or a standalone model directory.

A trainer checkpoint (a step directory, a checkpoint root or a run directory) is evaluated with
megatron chunks built for the evaluation's own TP/PP layout and loaded from the checkpoint's
layout-independent weights (EMA by default, raw on request), whatever layout it was trained in.
A standalone directory (config.json + model.safetensors) is evaluated with the torch-only
network, data parallel only. Both give the same numbers (tests/evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_bd3.standalone.model import CONFIG_FILE, BD3Network, NetworkConfig


class EvalInputError(ValueError):
    """Bad input to the evaluation: the message names the file, field or value; exit code 2."""


@dataclass
class EvalSource:
    """One model to evaluate, before any process group exists."""

    kind: str  # "checkpoint" | "standalone"
    path: Path  # the step directory, or the standalone directory
    use_ema: bool
    seq_length: int
    block_size: int
    vocab_size: int
    mask_token_id: int
    preset: str  # "bd3" | "ar" | "mdlm" (standalone: inferred from B)
    ignore_bos: bool  # the run's training.ignore_bos (standalone: as given)
    tokenizer: Any  # BD3Tokenizer or None
    tokenizer_fingerprint: str | None
    clip_range: tuple[float, float]
    run_config: Any = None  # RunConfig (checkpoint)
    marker: dict[str, Any] | None = None  # complete.json (checkpoint)
    network_config: NetworkConfig | None = None  # standalone

    @property
    def document_mask(self) -> bool:
        """Whether the model was trained with document masking (data.document_mask): it is then
        evaluated with it, so every evaluation set must give document ids. Standalone models
        have no document masking (their network attends across a whole sequence)."""
        if self.run_config is None:
            return False
        return bool(getattr(self.run_config.data, "document_mask", False))

    def describe(self) -> str:
        what = (f"checkpoint {self.path} (step {self.marker.get('step')}, "
                f"{'EMA' if self.use_ema else 'raw'} weights)" if self.kind == "checkpoint"
                else f"standalone model {self.path}")
        return (f"{what}: {self.preset}, L {self.seq_length}, B {self.block_size}, vocab "
                f"{self.vocab_size}")

    def record(self) -> dict[str, Any]:
        """What the result JSON says about the model."""
        out = {"kind": self.kind, "path": str(self.path), "weights": "EMA" if self.use_ema
               else "raw", "preset": self.preset, "seq_length": self.seq_length,
               "block_size": self.block_size, "vocab_size": self.vocab_size,
               "mask_token_id": self.mask_token_id, "ignore_bos": self.ignore_bos,
               "tokenizer_fingerprint": self.tokenizer_fingerprint,
               "clip_range": list(self.clip_range)}
        if self.marker is not None:
            out["step"] = self.marker.get("step")
            out["trained_layout"] = self.marker.get("layout")
        return out

    def standalone_network(self) -> BD3Network:
        """The torch-only network of this model (a checkpoint is converted in this process:
        call before any process group exists)."""
        if self.kind == "standalone":
            return BD3Network.from_pretrained(self.path).eval()
        from megatron_bd3.convert.trainer_checkpoint import (
            load_checkpoint_network,
            single_process_runtime,
        )

        with single_process_runtime():
            network, _, _ = load_checkpoint_network(self.path, self.use_ema)
        return network


def open_source(path: str | Path, *, raw_weights: bool = False, tokenizer: str | Path | None = None,
                ignore_bos: bool | None = None) -> EvalSource:
    """The model at `path`: a standalone directory (has config.json) or a trainer checkpoint.
    `ignore_bos` None takes the run's training.ignore_bos (standalone models: False)."""
    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"{path} does not exist (give a trainer checkpoint: step, checkpoint "
                             "root or run directory; or a standalone model directory)")
    if (path / CONFIG_FILE).is_file() and not (path / "complete.json").is_file():
        return _open_standalone(path, raw_weights, tokenizer, ignore_bos)
    return _open_checkpoint(path, raw_weights, tokenizer, ignore_bos)


def _open_standalone(path: Path, raw_weights: bool, tokenizer, ignore_bos) -> EvalSource:
    from megatron_bd3.data.tokenizer import find_model_tokenizer

    if raw_weights:
        raise EvalInputError(f"--raw-weights applies to trainer checkpoints; {path} is a "
                             "standalone model directory (it holds one set of weights)")
    try:
        config = NetworkConfig.load(path)
    except (OSError, ValueError) as error:
        raise EvalInputError(str(error)) from None
    try:  # --tokenizer, else the directory's own (in it or in its tokenizer/), as bd3-sample;
        # refused unless it has the fingerprint the model records
        tok = find_model_tokenizer(path, tokenizer, config.tokenizer_fingerprint)
    except (OSError, ValueError) as error:
        raise EvalInputError(f"the tokenizer of {path}: {error}") from None
    if tok is not None and (tok.vocab_size, tok.mask_id) != (config.vocab_size,
                                                              config.mask_token_id):
        raise EvalInputError(
            f"tokenizer {tok.source} has vocab_size {tok.vocab_size} and mask id {tok.mask_id}; "
            f"the model {path} has {config.vocab_size} and {config.mask_token_id}")
    preset = ("ar" if config.block_size == 1 else
              "mdlm" if config.block_size == config.seq_length else "bd3")
    return EvalSource(
        kind="standalone", path=path, use_ema=False, seq_length=config.seq_length,
        block_size=config.block_size, vocab_size=config.vocab_size,
        mask_token_id=config.mask_token_id, preset=preset, ignore_bos=bool(ignore_bos),
        tokenizer=tok, tokenizer_fingerprint=(tok.fingerprint() if tok is not None
                                              else config.tokenizer_fingerprint),
        clip_range=(config.sampling_eps_min, config.sampling_eps_max), network_config=config,
    )


def _open_checkpoint(path: Path, raw_weights: bool, tokenizer, ignore_bos) -> EvalSource:
    from megatron_bd3.checkpoint import CheckpointError
    from megatron_bd3.convert.trainer_checkpoint import (
        checkpoint_tokenizer,
        learned_clip_range,
        open_checkpoint,
    )

    try:
        step_dir, marker, run_config = open_checkpoint(path)
    except CheckpointError as error:
        raise EvalInputError(str(error)) from None
    if not marker.get("layout_independent"):
        raise EvalInputError(f"{step_dir} was saved without layout-independent weights "
                             "(checkpoint.save_layout_independent=false); it cannot be evaluated")
    use_ema = not raw_weights
    if use_ema and not marker.get("has_ema"):
        raise EvalInputError(f"{step_dir} has no EMA weights (training.ema_decay was 0); pass "
                             "--raw-weights")
    try:
        tok, _ = checkpoint_tokenizer(step_dir, marker, run_config, tokenizer)
    except (OSError, ValueError) as error:
        raise EvalInputError(f"{step_dir}: {error}") from None
    identity = marker["model"]
    eps_min, eps_max, _ = learned_clip_range(step_dir, marker, run_config)
    if ignore_bos is None:
        ignore_bos = run_config.training.ignore_bos
    return EvalSource(
        kind="checkpoint", path=step_dir, use_ema=use_ema,
        seq_length=int(identity["seq_length"]), block_size=int(identity["block_size"]),
        vocab_size=int(identity["vocab_size"]), mask_token_id=int(identity["mask_token_id"]),
        preset=str(identity.get("preset", "bd3")), ignore_bos=bool(ignore_bos), tokenizer=tok,
        tokenizer_fingerprint=identity.get("tokenizer_fingerprint"),
        clip_range=(eps_min, eps_max), run_config=run_config, marker=marker,
    )
