"""Run configuration: one YAML file per run, loaded into typed, validated dataclasses.

A run file has the sections `model, parallel, data, optimizer, schedule, training, validation,
checkpoint, logging, deepspeed`. A file may start from another one with `base: other.yaml`
(resolved next to the file, else a shipped config by name; chains allowed; megatron_bd3.paths
has the rules): the base is loaded first and the file's keys are
deep-merged on top, so a block-size variant is a few lines. Command-line overrides use dotted
keys, `training.train_iters=200 optimizer.lr=3e-4`, and are type-checked like file values.

Every error names the file, the dotted key and what would be right, e.g.
`configs/x.yaml: unknown key 'training.trian_iters' (did you mean 'training.train_iters'?)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from megatron_bd3.paths import resolve_path


class ConfigError(ValueError):
    """A run configuration is malformed; the message names the file and the key."""


# ------------------------------------------------------------------------------------ sections


@dataclass
class ModelConfig:
    """Transformer shape and BD3 knobs; vocabulary size and [MASK] id come from the data.

    The megatron BD3Config of a run is built from this section, `parallel` and the diffusion keys
    of `training` by one function, megatron_bd3.training.model_config.build_model_config. The
    fields after `recompute` refine the chosen architecture; null keeps its value.
    """

    preset: Literal["bd3", "ar", "mdlm"] = "bd3"
    # reference: the BD3-LM/MDLM DiT backbone (pre-LN LayerNorm, GELU-tanh MLP with biases, qkv/out
    # without bias, untied embeddings, output bias); megatron: megatron-core's GPT defaults.
    architecture: Literal["reference", "megatron"] = "reference"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None -> multi-head attention (no GQA)
    ffn_hidden_size: Optional[int] = None  # None -> 4 * hidden_size
    seq_length: int = 64
    # Block size B (the paper's L'). ar: forced to 1; mdlm: null or seq_length.
    block_size: Optional[int] = 4
    dropout: float = 0.1
    # keyed: dropout masks and initial weights are hashes of (training.seed, step, sample,
    # position, layer) / (training.seed, parameter name, index): the same on every layout
    # (docs/training.md §5); torch: megatron's generators (faster dropout, layout-dependent).
    dropout_rng: Literal["keyed", "torch"] = "keyed"
    init_rng: Literal["keyed", "torch"] = "keyed"
    attention_kernel: Literal["auto", "sdpa", "flex"] = "auto"
    recompute: Optional[Literal["full", "selective"]] = None
    layernorm_epsilon: Optional[float] = None  # reference 1e-5; megatron 1e-5
    rotary_base: Optional[int] = None  # RoPE base; both architectures 10000
    output_layer_bias: Optional[bool] = None  # reference true; megatron false
    tie_embeddings: Optional[bool] = None  # input embedding = output projection; both false
    init_method_std: Optional[float] = None  # weight init std; megatron's 0.02
    # B = L: train on x_t alone (L tokens; the same loss as [x_t ; x_0], see BD3Config).
    single_stream_mdlm: bool = True

    @property
    def effective_block_size(self) -> int:
        if self.preset == "ar":
            return 1
        if self.preset == "mdlm" or self.block_size is None:
            return self.seq_length
        return self.block_size


@dataclass
class ParallelSection:
    """Model-parallel sizes; data parallel = world size / (TP * PP * CP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    # Context parallelism: each CP rank holds L / CP positions of both streams (zig-zag chunks
    # of whole blocks) and exchanges the clean keys/values (docs/training.md §4).
    context_parallel_size: int = 1
    # How (megatron's cp_comm_type): "p2p" around the ring (less memory; no attention dropout),
    # "all_gather" (one all-gather per layer, the configured attention kernel), or "auto": the
    # ring on CPU, the all-gather with CUDA (model.config.resolve_cp_comm_type).
    context_parallel_comm: Literal["auto", "all_gather", "p2p"] = "auto"


@dataclass
class DataConfig:
    """Where the tokenised shards are (the manifest written by bd3-prepare-data)."""

    manifest: str = "runs/data/manifest.json"
    tokenizer: Optional[str] = None  # None -> the tokenizer named in the manifest
    train_split: str = "train"
    valid_split: str = "validation"
    num_workers: int = 0
    # Attention within documents only (docs/training.md "Document masking"): needs shards
    # prepared with --document-boundaries. Off: the reference's wrapping, attention across the
    # documents packed into a sequence.
    document_mask: bool = False
    # With document_mask: RoPE positions restart at 0 at every document.
    document_position_reset: bool = False


@dataclass
class OptimizerConfig:
    """AdamW hyper-parameters (paper §4.3) and which optimizer implementation runs them."""

    backend: Literal["deepspeed", "megatron"] = "deepspeed"
    name: Literal["adamw"] = "adamw"
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_grad: float = 1.0  # 0 disables clipping; always written explicitly to DeepSpeed
    # torch.optim.AdamW inside DeepSpeed (no JIT build). None -> True on CPU, False on GPU.
    torch_adam: Optional[bool] = None
    # Optimizer state on the CPU. None -> whatever the DeepSpeed JSON says.
    cpu_offload: Optional[bool] = None
    # megatron-core DistributedOptimizer (GPU only, optimizer.backend=megatron).
    use_distributed_optimizer: bool = True


@dataclass
class ScheduleConfig:
    """Learning rate: linear warm-up from 0, then constant (paper) or cosine to min_lr."""

    warmup_steps: int = 2500
    decay: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0
    decay_steps: Optional[int] = None  # cosine length after warm-up; None -> to train_iters


@dataclass
class TrainingConfig:
    """The training loop and the diffusion objective (paper §2.2)."""

    train_iters: int = 1000
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seed: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    ema_decay: float = 0.9999  # 0 disables EMA
    noise_schedule: str = "loglinear"
    antithetic_sampling: bool = True
    resample: bool = True
    ignore_bos: bool = True
    clip_eps_min: float = 1e-3  # initial clip range [beta, omega] for t
    clip_eps_max: float = 1.0
    fix_clipping: bool = False  # True: never let the clip search move the range


@dataclass
class ClipSearchConfig:
    """Data-driven clip-range search on validation data (paper §2.4)."""

    enabled: bool = True
    num_batches: int = 100
    widths: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    delta: float = 0.05


@dataclass
class ValidationConfig:
    """NELBO validation (§6.1) every `interval` steps, with EMA weights."""

    interval: int = 10000  # 0 disables periodic validation
    num_batches: Optional[int] = None  # None -> the whole split
    micro_batch_size: Optional[int] = None  # None -> training.micro_batch_size
    use_ema: bool = True
    at_end: bool = True
    seed: int = 1
    clip_search: ClipSearchConfig = field(default_factory=ClipSearchConfig)


@dataclass
class CheckpointConfig:
    """Periodic/final atomic checkpoints and resume."""

    dir: Optional[str] = None  # None -> <logging.output_dir>/<logging.run_name>/checkpoints
    interval: int = 500  # 0 disables periodic checkpoints
    keep_last: Optional[int] = 2  # None keeps all
    save_final: bool = True
    save_initial: bool = False  # also save the weights before the first step (step_00000000)
    resume: str = "auto"  # auto | none | <checkpoint dir>
    init_from: Optional[str] = None  # load model weights only (new layout ok), e.g. MDLM -> BD3
    init_from_ema: bool = True  # take the EMA weights of init_from (the released weights are EMA)
    # also write the layout-independent weights and training state (elastic resume, init_from)
    save_layout_independent: bool = True


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "megatron_bd3"
    entity: Optional[str] = None


@dataclass
class LoggingConfig:
    interval: int = 10
    run_name: str = "bd3"
    output_dir: str = "runs"
    tqdm: bool = True
    # Peak FLOP/s of one device for MFU. None -> a documented default (see flops.py).
    peak_flops_per_device: Optional[float] = None
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # [start, end]: steps start..end-1 run under torch.profiler; traces in <run dir>/profile.
    profile_steps: Optional[list[int]] = None


@dataclass
class DeepSpeedSection:
    """The DeepSpeed JSON (ZeRO stage, offload, engine options) and dotted-key overrides of it."""

    config: Optional[str] = "deepspeed/zero1.json"  # a path, or a shipped JSON by name
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    # Where the config came from (for error messages and the checkpoint record); not a YAML key.
    source: str = field(default="<defaults>", metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (YAML/JSON-serialisable), without internal fields."""
        out = dataclasses.asdict(self)
        out.pop("source", None)
        return out

    @property
    def checkpoint_dir(self) -> Path:
        if self.checkpoint.dir:
            return Path(self.checkpoint.dir)
        return Path(self.logging.output_dir) / self.logging.run_name / "checkpoints"

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.output_dir) / self.logging.run_name


# ------------------------------------------------------------------------- typed construction


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a field type; raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping (section), got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value)
            except ValueError:
                raise bad from None
            if as_float.is_integer():
                return int(as_float)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _public_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in _public_fields(cls)]
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known: {names}"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
    kwargs = {name: _coerce(data[name], hints[name], f"{prefix}{name}") for name in data}
    return cls(**kwargs)


# ------------------------------------------------------------------------ files and overrides


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if (
            isinstance(value, dict)
            and isinstance(out.get(key), dict)
            and key != "overrides"
        ):
            out[key] = _deep_merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML run file, following `base:` links; returns the merged raw mapping."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"{path}: `base:` cycle: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data)}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: `base:` must be a file name, got {base!r}")
    try:
        base_path = resolve_path(base, "base", relative_to=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return _deep_merge(load_yaml_tree(base_path, (*_seen, resolved)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {text!r}: key must be dotted, e.g. training.train_iters=200")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    tree = _deep_merge(tree, {})
    for text in overrides:
        parts, value = parse_override(text)
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return tree


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    data: dict[str, Any] | None = None,
) -> RunConfig:
    """Load a run config from a YAML file (or a raw mapping), apply overrides, validate.

    `path` is resolved by megatron_bd3.paths: as given, else a shipped config by name
    (`tiny_cpu`, `tiny_cpu.yaml`)."""
    if path is not None:
        path = resolve_path(path, "config")
    source = str(path) if path is not None else "<dict>"
    tree = load_yaml_tree(path) if path is not None else dict(data or {})
    if data is not None and path is not None:
        tree = _deep_merge(tree, data)
    tree.pop("base", None)
    tree = apply_overrides(tree, list(overrides or []))
    try:
        config = _build(RunConfig, tree, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    config.source = source
    try:
        validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


# ------------------------------------------------------------------------------- validation


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _validate_context_parallel(config: RunConfig) -> None:
    """parallel.context_parallel_size > 1: what the CP layout (model/context_parallel.py) needs.
    Keyed dropout and data.document_mask work under CP (docs/training.md §4)."""
    m, cp = config.model, config.parallel.context_parallel_size
    block_size = m.effective_block_size
    _require(
        block_size != m.seq_length,
        f"parallel.context_parallel_size {cp}: "
        + ("model.preset mdlm has" if m.preset == "mdlm" else "model.block_size = model.seq_length "
           f"({m.seq_length}) gives")
        + " one block (B = L), which cannot be cut on block edges; use "
        "parallel.context_parallel_size 1",
    )
    _require(
        m.seq_length % (2 * cp * block_size) == 0,
        f"parallel.context_parallel_size {cp} cuts model.seq_length {m.seq_length} into {2 * cp} "
        f"chunks of whole blocks; model.seq_length must be a multiple of 2 x "
        f"context_parallel_size x block_size = {2 * cp * block_size}",
    )


def validate(config: RunConfig) -> None:
    """Checks that need no runtime knowledge (world size, device, model code)."""
    m, t, o, s, v = (
        config.model,
        config.training,
        config.optimizer,
        config.schedule,
        config.validation,
    )
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        _require(getattr(m, name) > 0, f"model.{name} must be > 0, got {getattr(m, name)}")
    _require(
        m.hidden_size % m.num_attention_heads == 0,
        f"model.hidden_size {m.hidden_size} is not a multiple of model.num_attention_heads "
        f"{m.num_attention_heads}",
    )
    if m.preset == "bd3":
        _require(m.block_size is not None, "model.block_size is required for preset bd3")
    if m.preset != "ar" and m.block_size is not None:
        _require(m.block_size > 0, f"model.block_size must be > 0, got {m.block_size}")
        _require(
            m.seq_length % m.block_size == 0,
            f"model.seq_length {m.seq_length} is not a multiple of model.block_size {m.block_size}",
        )
        if m.preset == "mdlm":
            _require(
                m.block_size == m.seq_length,
                f"model.preset mdlm needs model.block_size == model.seq_length ({m.seq_length}) "
                f"or null, got {m.block_size}",
            )
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    # BD3Config's refusal, here so that bd3-train says it in one line: megatron reruns the
    # layers during backward, outside the forward that holds the micro-batch's dropout key
    _require(
        not (m.dropout_rng == "keyed" and m.dropout > 0 and m.recompute == "full"),
        f"model.recompute full with model.dropout_rng keyed and model.dropout {m.dropout} is not "
        "supported (the recomputation runs outside the forward that holds the dropout key); use "
        "model.recompute selective or null, model.dropout_rng torch, or model.dropout 0",
    )

    p = config.parallel
    for name in (
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"
    ):
        _require(getattr(p, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    if p.context_parallel_size > 1:
        _validate_context_parallel(config)
    if p.virtual_pipeline_model_parallel_size is not None:
        _require(
            p.pipeline_model_parallel_size > 1,
            "parallel.virtual_pipeline_model_parallel_size needs "
            "parallel.pipeline_model_parallel_size > 1",
        )
        chunks = p.pipeline_model_parallel_size * p.virtual_pipeline_model_parallel_size
        _require(
            m.num_layers % chunks == 0,
            f"model.num_layers {m.num_layers} is not divisible by PP x VPP = {chunks}",
        )
    elif p.pipeline_model_parallel_size > 1:
        _require(
            m.num_layers % p.pipeline_model_parallel_size == 0,
            f"model.num_layers {m.num_layers} is not divisible by "
            f"parallel.pipeline_model_parallel_size {p.pipeline_model_parallel_size}",
        )
    _require(
        m.num_attention_heads % p.tensor_model_parallel_size == 0,
        f"model.num_attention_heads {m.num_attention_heads} is not divisible by "
        f"parallel.tensor_model_parallel_size {p.tensor_model_parallel_size}",
    )
    if p.sequence_parallel:
        _require(
            p.tensor_model_parallel_size > 1,
            "parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1",
        )
        # the stream ([x_t ; x_0], or x_t alone for B = L with single_stream_mdlm) of a
        # context-parallel rank is cut into TP slices of whole rows
        single_stream = m.effective_block_size == m.seq_length and m.single_stream_mdlm
        name = "model.seq_length" if single_stream else "2 x model.seq_length"
        rows = (1 if single_stream else 2) * m.seq_length // p.context_parallel_size
        if p.context_parallel_size > 1:
            name += " / parallel.context_parallel_size"
        _require(
            rows % p.tensor_model_parallel_size == 0,
            f"parallel.sequence_parallel splits {name} = {rows} rows over "
            f"parallel.tensor_model_parallel_size {p.tensor_model_parallel_size}; it must be a "
            "multiple of it",
        )

    _require(t.train_iters >= 0, f"training.train_iters must be >= 0, got {t.train_iters}")
    _require(
        t.micro_batch_size >= 1, f"training.micro_batch_size must be >= 1, got {t.micro_batch_size}"
    )
    _require(
        t.global_batch_size % t.micro_batch_size == 0,
        f"training.global_batch_size {t.global_batch_size} is not a multiple of "
        f"training.micro_batch_size {t.micro_batch_size}",
    )
    _require(0.0 <= t.ema_decay < 1.0, f"training.ema_decay must be in [0, 1), got {t.ema_decay}")
    _require(
        0.0 <= t.clip_eps_min < t.clip_eps_max <= 1.0,
        f"training.clip_eps_min/max must satisfy 0 <= min < max <= 1, got "
        f"{t.clip_eps_min}, {t.clip_eps_max}",
    )

    _require(o.lr > 0, f"optimizer.lr must be > 0, got {o.lr}")
    _require(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optimizer.betas must be two numbers in [0, 1), got {o.betas}",
    )
    _require(o.eps > 0, f"optimizer.eps must be > 0, got {o.eps}")
    _require(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
    _require(o.clip_grad >= 0, f"optimizer.clip_grad must be >= 0 (0 = off), got {o.clip_grad}")

    _require(s.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
    _require(0 <= s.min_lr <= o.lr, f"schedule.min_lr must be in [0, optimizer.lr], got {s.min_lr}")
    if s.decay_steps is not None:
        _require(s.decay_steps > 0, f"schedule.decay_steps must be > 0, got {s.decay_steps}")

    d = config.data
    _require(
        d.document_mask or not d.document_position_reset,
        "data.document_position_reset needs data.document_mask: true",
    )
    _require(v.interval >= 0, f"validation.interval must be >= 0, got {v.interval}")
    cs = v.clip_search
    _require(
        cs.num_batches >= 1,
        f"validation.clip_search.num_batches must be >= 1, got {cs.num_batches}",
    )
    _require(0 < cs.delta <= 1, f"validation.clip_search.delta must be in (0, 1], got {cs.delta}")
    _require(
        all(0 < w <= 1 for w in cs.widths),
        f"validation.clip_search.widths must lie in (0, 1], got {cs.widths}",
    )

    c = config.checkpoint
    _require(c.interval >= 0, f"checkpoint.interval must be >= 0, got {c.interval}")
    if c.keep_last is not None:
        _require(c.keep_last >= 1, f"checkpoint.keep_last must be >= 1 or null, got {c.keep_last}")
    _require(
        config.logging.interval >= 1,
        f"logging.interval must be >= 1, got {config.logging.interval}",
    )

    if o.backend == "megatron":
        _require(
            not o.cpu_offload,
            "optimizer.cpu_offload needs optimizer.backend=deepspeed "
            "(e.g. deepspeed.config=deepspeed/zero2_offload.json)",
        )


def dump_config(config: RunConfig) -> str:
    """The fully resolved config as YAML (what a checkpoint and the run directory record)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
